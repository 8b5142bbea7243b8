"""Result files: one JSON line per finished cell in results/<run-id>/results.jsonl.

    lorabench report results/<run-id>      # reads what this module wrote

A row is written the moment its cell ends, flushed and fsync'd, so a run killed at any point
keeps every finished cell. Reading tolerates a truncated last line (a kill during a write):
it is reported and skipped, never half-parsed.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import psutil

SCHEMA = 1
RESULTS_FILE = "results.jsonl"
ENVIRONMENT_FILE = "environment.json"
PLAN_FILE = "plan.json"
LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another live process is writing into this run directory."""


def new_run_id() -> str:
    """Sortable by time (UTC, to the second), unique by a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def append_row(run_dir: Path, row: dict[str, Any]) -> None:
    line = json.dumps(row, sort_keys=True, allow_nan=False) + "\n"
    with open(run_dir / RESULTS_FILE, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_rows(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, warnings). A line that does not parse is reported in warnings and skipped."""
    path = Path(run_dir) / RESULTS_FILE
    rows, warnings = [], []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            last = i == len(lines) or (i == len(lines) - 1 and lines[-1] == "")
            what = "truncated last line (the run was killed while writing it)" if last else "unreadable line"
            warnings.append(f"{path}:{i}: {what}; ignored")
    return rows, warnings


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def rewrite_rows(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Replace results.jsonl by exactly `rows` (atomically: a kill leaves the old or the new file)."""
    path = Path(run_dir) / RESULTS_FILE
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def final_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last row of each cell, by cell key."""
    return {r["cell_key"]: r for r in rows}


class RunLock:
    """A lock file in the run directory holding the owner's pid and host.

    A second process is refused while the owner lives; a lock left by a dead process on this host
    is taken over. The lock is removed on exit, in `finally`.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.took_over: str | None = None   # the stale owner, when there was one

    def _owner(self) -> tuple[int, str] | None:
        try:
            pid, host = self.path.read_text(encoding="utf-8").split()
            return int(pid), host
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "RunLock":
        me = f"{os.getpid()} {socket.gethostname()}\n"
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = self._owner()
            if owner is not None:
                pid, host = owner
                if host != socket.gethostname():
                    raise RunDirLocked(f"{self.path.parent} is locked by process {pid} on host {host}; "
                                       f"if that run is over, delete {self.path}") from None
                if _alive(pid):
                    raise RunDirLocked(f"{self.path.parent} is in use by process {pid} (lock {self.path}); "
                                       "wait for it to finish") from None
            self.took_over = f"process {owner[0]}" if owner else "an unreadable lock"
            tmp = self.path.with_suffix(f".{os.getpid()}")
            tmp.write_text(me, encoding="utf-8")
            os.replace(tmp, self.path)
            return self
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        return self

    def __exit__(self, *exc) -> bool:
        try:
            if self._owner() == (os.getpid(), socket.gethostname()):
                self.path.unlink()
        except OSError:
            pass
        return False


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

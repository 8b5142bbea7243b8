"""A run directory and everything in it: the plan, one JSON line per cell, environment, calibration, lock.

    lorabench report results/<run-id>      # reads what this module wrote

No file name of a run directory is spelled outside this module. A row is appended the moment its
cell ends, flushed and fsync'd, so a run killed at any point keeps every finished cell. Reading
tolerates a truncated last line (a kill during a write): it is reported and skipped, never
half-parsed, and removed when the run is resumed.

The lock is `filelock`'s: an flock(2) on `.lock`, which the kernel releases when its holder dies,
even by SIGKILL, so a dead run's lock never needs breaking by hand and no pid is ever trusted to
say whether a lock is live. The holder's pid sits beside it in `.owner`, to name it in a refusal,
and an `.owner` left by a killed run tells the next one it took over.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from ..errors import InputError
from ..files import write_json
from ..plan.cells import Cell, CellError
from .rows import Row, final_rows


class RunDirError(InputError):
    """A run directory that cannot be used as asked; the message says why."""


class RunDirLocked(RunDirError):
    """Another live process is writing into this run directory."""


def writable_dir(path: Path, flag: str) -> None:
    """Refuse an output directory that cannot be one (a file stands at it or above it)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise RunDirError(f"{flag} {path}: {p} is a file, not a directory")
            return


def new_run_id() -> str:
    """Sortable by time (UTC, to the second), unique by a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _line(row: Row) -> str:
    return json.dumps(row.to_json(), sort_keys=True, allow_nan=False) + "\n"


class RunDir:
    RESULTS, PLAN, ENVIRONMENT, CALIBRATION = (
        "results.jsonl",
        "plan.json",
        "environment.json",
        "calibration.json",
    )
    LOCK, OWNER = ".lock", ".owner"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.took_over: str | None = None  # set by lock(): the dead owner whose lock was left

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def create(cls, out: Path, run_id: str | None = None) -> "RunDir":
        run = cls(Path(out) / (run_id or new_run_id()))
        run.path.mkdir(parents=True)
        return run

    @classmethod
    def open(cls, path: Path, *, need: str = "plan") -> "RunDir":
        """An existing run directory that has its plan (`need="plan"`) or its results (`need="results"`)."""
        run = cls(path)
        file = run.PLAN if need == "plan" else run.RESULTS
        if not (run.path / file).is_file():
            raise RunDirError(f"{path}: no {file} here; pass a run directory made by `lorabench run`")
        return run

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def results_path(self) -> Path:
        return self.path / self.RESULTS

    # ---- plan, environment, calibration -------------------------------------------------------

    def write_plan(self, plan: dict[str, Any]) -> None:
        write_json(self.path / self.PLAN, plan)

    def plan(self) -> dict[str, Any]:
        try:
            plan = json.loads((self.path / self.PLAN).read_text(encoding="utf-8"))
            plan["cells"] = [Cell.from_dict(c) for c in plan["cells"]]
        except (OSError, ValueError, KeyError, TypeError, CellError) as e:
            raise RunDirError(f"{self.path}: unreadable {self.PLAN} ({e})") from None
        return plan

    def write_environment(self, env: dict[str, Any]) -> None:
        """The first cell's environment, once: the machine's facts for the whole run."""
        if env and not (self.path / self.ENVIRONMENT).exists():
            write_json(self.path / self.ENVIRONMENT, env)

    def write_calibration(self, calibration: dict[str, Any]) -> None:
        write_json(self.path / self.CALIBRATION, calibration)

    def calibrated(self) -> bool:
        return (self.path / self.CALIBRATION).exists()

    # ---- rows ----------------------------------------------------------------------------------

    def append(self, row: Row) -> None:
        with open(self.results_path, "a", encoding="utf-8") as f:
            f.write(_line(row))
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> tuple[list[Row], list[str]]:
        """(rows, warnings) of every line written; a line that does not parse is reported and skipped."""
        if not self.results_path.exists():
            return [], []
        rows, warnings = [], []
        lines = self.results_path.read_text(encoding="utf-8").split("\n")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(Row.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError):  # JSONDecodeError, CellError, a bad status
                last = i == len(lines) or (i == len(lines) - 1 and lines[-1] == "")
                what = (
                    "truncated last line (the run was killed while writing it)" if last else "unreadable line"
                )
                warnings.append(f"{self.results_path}:{i}: {what}; ignored")
        return rows, warnings

    def final_rows(self) -> tuple[list[Row], list[str]]:
        """The last row of each cell, and the warnings of reading them."""
        rows, warnings = self.rows()
        return final_rows(rows), warnings

    def rewrite(self, rows: list[Row]) -> None:
        """Replace the results by exactly `rows` (atomically: a kill leaves the old or the new file)."""
        tmp = self.results_path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(_line(r) for r in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.results_path)

    def pending(self, cells: list[Cell], retry_failed: bool = False) -> tuple[list[Cell], int, list[str]]:
        """(those of the plan's `cells` still to run, cells that keep their row, warnings). Drops a
        torn line, and with `retry_failed` the rows of failed cells, before anything is appended."""
        rows, warnings = self.rows()
        keep = [r for r in final_rows(rows) if not (retry_failed and not r.ok)]
        if warnings or len(keep) != len(rows):
            self.rewrite(keep)
        done = {r.key for r in keep}
        return [c for c in cells if c.key() not in done], len(done), warnings

    # ---- one writer ----------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator["RunDir"]:
        """Hold the run directory for writing; RunDirLocked while another live process holds it."""
        owner_path = self.path / self.OWNER
        lock = FileLock(self.path / self.LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            owner = _read(owner_path) or "another process"
            raise RunDirLocked(
                f"{self.path} is in use by {owner} (lock {self.path / self.LOCK}); wait for it to finish"
            ) from None
        try:
            stale = _read(owner_path)
            self.took_over = stale  # its holder is gone: the kernel released its flock
            owner_path.write_text(f"process {os.getpid()} on {socket.gethostname()}\n", encoding="utf-8")
            yield self
        finally:
            owner_path.unlink(missing_ok=True)
            lock.release()

    @classmethod
    def load(cls, dirs: list[Path]) -> tuple[list[Row], list[str]]:
        """The final rows of several run directories (shards, repeats), and the warnings of reading them."""
        rows, warnings = [], []
        for d in dirs:
            r, w = cls.open(d, need="results").final_rows()
            rows += r
            warnings += w
        if not rows:
            raise RunDirError(f"{', '.join(map(str, dirs))}: no result rows")
        return rows, warnings

    # ---- merge ---------------------------------------------------------------------------------

    @classmethod
    def merge(cls, dirs: list[Path], out: Path) -> tuple["RunDir", list[Row], int]:
        """Combine the run directories of the shards of one matrix into `out` (new): (run, rows,
        cells of the matrix that no shard has a row for). Refuses other matrices, other code
        versions and cells that appear twice, before anything is written."""
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RunDirError(f"--out {out}: exists and is not an empty directory; merge into a new one")
        shards = [cls(d) for d in dirs]
        plans, rows = [], []
        for s in shards:
            try:
                plans.append(json.loads((s.path / cls.PLAN).read_text(encoding="utf-8")))
            except (OSError, ValueError):
                raise RunDirError(
                    f"{s.path}: no readable {cls.PLAN}; pass run directories made by `lorabench run --shard`"
                ) from None
            rows.append(s.final_rows())
        for s, p in zip(shards[1:], plans[1:]):
            for key, what in (
                ("matrix_id", "ran a different matrix than"),
                ("lorabench_commit", "was made by"),
            ):
                if p.get(key) != plans[0].get(key):
                    hint = (
                        "merge only shards of one matrix"
                        if key == "matrix_id"
                        else "merge only shards of one code version"
                    )
                    raise RunDirError(
                        f"{s.path} {what} {shards[0].path} ({p.get(key)} vs {plans[0].get(key)}); {hint}"
                    )
        owner: dict[str, Path] = {}
        for s, (shard_rows, _) in zip(shards, rows):
            for r in shard_rows:
                if r.key in owner:
                    raise RunDirError(
                        f"cell {r.cell.model} {r.label} is in both {owner[r.key]} and {s.path}; "
                        "were the shards of one --shard K/N split?"
                    )
                owner[r.key] = s.path
        matrix = plans[0]["matrix"]
        order = {Cell.from_dict(c).key(): i for i, c in enumerate(matrix)}
        merged = sorted(
            (r for shard_rows, _ in rows for r in shard_rows), key=lambda r: order.get(r.key, len(order))
        )
        out.mkdir(parents=True, exist_ok=True)
        run = cls(out)
        run.rewrite(merged)
        run.write_plan(
            {
                **plans[0],
                "run_id": out.name,
                "shard": None,
                "cells": matrix,
                "merged_from": [str(d) for d in dirs],
            }
        )
        env = next((s.path / cls.ENVIRONMENT for s in shards if (s.path / cls.ENVIRONMENT).exists()), None)
        if env is not None:
            (out / cls.ENVIRONMENT).write_text(env.read_text(encoding="utf-8"), encoding="utf-8")
        return run, merged, len(set(order) - set(owner))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None

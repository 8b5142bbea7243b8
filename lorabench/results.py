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
import time
from pathlib import Path
from typing import Any

SCHEMA = 1
RESULTS_FILE = "results.jsonl"
ENVIRONMENT_FILE = "environment.json"


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

"""The run directory: rows appended and read back, pending cells, merge (the lock, which needs a
second process, is tested in tests/system/test_durability.py)."""

import json
import shutil
from pathlib import Path

import pytest

from lorabench.plan.cells import Cell
from lorabench.results.rows import Row, Status
from lorabench.results.rundir import RunDir, RunDirError

CELLS = [Cell(model="cifar-mlp", method="full"), Cell(model="cifar-mlp", method="lora", rank=1)]


def planned(tmp_path: Path) -> RunDir:
    run = RunDir.create(tmp_path, "run-1")
    run.write_plan(
        {
            "run_id": run.run_id,
            "matrix_id": "m",
            "lorabench_commit": "c",
            "shard": None,
            "cells": [c.to_dict() for c in CELLS],
            "matrix": [c.to_dict() for c in CELLS],
        }
    )
    return run


def row(cell: Cell, status: Status = Status.OK) -> Row:
    return Row.make(cell, status, {"epoch_s": 1.0}, run_id="run-1")


def test_rows_append_read_back_and_a_torn_last_line_is_reported(tmp_path):
    run = planned(tmp_path)
    run.append(row(CELLS[0]))
    with open(run.results_path, "a") as f:
        f.write(json.dumps(row(CELLS[1]).to_json())[:40])  # killed while writing
    rows, warnings = run.rows()
    assert [r.key for r in rows] == [CELLS[0].key()]
    assert len(warnings) == 1 and "truncated last line" in warnings[0]
    todo, done, _ = run.pending(CELLS)
    assert [c.key() for c in todo] == [CELLS[1].key()] and done == 1
    assert run.rows() == (rows, [])  # the torn line was removed before anything is appended


def test_retry_failed_replaces_the_failed_rows(tmp_path):
    run = planned(tmp_path)
    run.append(row(CELLS[0], Status.OOM))
    run.append(row(CELLS[1]))
    assert run.pending(CELLS)[0] == []
    todo, done, _ = run.pending(CELLS, retry_failed=True)
    assert [c.key() for c in todo] == [CELLS[0].key()] and done == 1
    assert [r.key for r in run.rows()[0]] == [CELLS[1].key()]


def test_merge_refuses_overlaps_and_other_matrices_before_writing(tmp_path):
    a = planned(tmp_path / "a")
    a.append(row(CELLS[0]))
    b = planned(tmp_path / "b")
    b.append(row(CELLS[1]))
    run, rows, missing = RunDir.merge([a.path, b.path], tmp_path / "merged")
    assert [r.key for r in rows] == [c.key() for c in CELLS] and missing == 0
    assert run.rows()[0] == rows and run.plan()["merged_from"] == [str(a.path), str(b.path)]
    with pytest.raises(RunDirError, match="is in both"):
        RunDir.merge([a.path, a.path], tmp_path / "twice")
    other = tmp_path / "other" / "run-1"
    shutil.copytree(b.path, other)
    plan = json.loads((other / RunDir.PLAN).read_text())
    (other / RunDir.PLAN).write_text(json.dumps({**plan, "matrix_id": "x"}))
    with pytest.raises(RunDirError, match="ran a different matrix"):
        RunDir.merge([a.path, other], tmp_path / "mixed")
    assert not (tmp_path / "twice").exists() and not (tmp_path / "mixed").exists()


def test_open_names_what_is_missing(tmp_path):
    with pytest.raises(RunDirError, match="no plan.json here"):
        RunDir.open(tmp_path)
    with pytest.raises(RunDirError, match="no results.jsonl here"):
        RunDir.open(tmp_path, need="results")

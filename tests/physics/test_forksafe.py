"""GPU invariants the CPU can check, in this process: a cell that finds itself in a bad fork fails
with one line naming the cause, and bitsandbytes (whose import initialises CUDA) stays out until a
cell allows it (lorabench/forksafe.py). The processes a run starts are checked in
tests/system/test_processes.py."""

import sys

import pytest
import torch

from lorabench import forksafe


def test_a_cell_in_a_bad_fork_fails_with_one_line_naming_the_cause(monkeypatch):
    from lorabench.plan.cells import Cell
    from lorabench.run.experiment import execute

    monkeypatch.setattr(torch._C, "_cuda_isInBadFork", lambda: True)
    row = execute(
        Cell(
            model="cifar-mlp",
            method="full",
            device="cuda",
            samples=16,
            eval_samples=8,
            batch_size=8,
            epochs=1,
            warmup_epochs=0,
        )
    )
    assert row.status.value == "error" and row.error["type"] == "BadFork"
    assert row.error["message"].startswith("this process was forked from one that had already queried CUDA")
    assert "--start-method spawn" in row.error["message"] and row.error["traceback"] == []


def test_keep_out_stops_bitsandbytes_until_allowed(monkeypatch):
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    forksafe.keep_out()
    with pytest.raises(ImportError):
        import bitsandbytes  # noqa: F401
    assert forksafe.allow("bitsandbytes").__name__ == "bitsandbytes"  # a cell that quantises
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed (not ours to lift)
    with pytest.raises(ImportError):
        forksafe.allow("bitsandbytes")

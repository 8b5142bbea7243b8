"""A plan's times: a cell's from its step, the rates a dry run uses, the progress bar's estimate."""

from __future__ import annotations

import pytest

from lorabench.measure import calibration
from lorabench.measure.steptime import StepTime
from lorabench.plan import timing
from lorabench.plan.cells import Cell
from lorabench.run.runner import Progress


def test_a_cells_time_is_its_steps_probes_and_evaluations():
    cell = Cell(
        model="cifar-mlp",
        method="full",
        samples=66,  # 16 steps of 4: the ragged tail is dropped, as training drops it
        batch_size=4,
        epochs=1,
        warmup_epochs=1,
        eval_samples=16,
        eval_every=8,
    )
    step = StepTime(2.0, {}, forward_s=0.4, rates="test")
    d = timing.duration(cell, step)
    steps, epochs = 16, 2
    evaluations = epochs + steps * epochs // 8  # each epoch's end and every 8 steps
    assert d.epoch_s == steps * 2.0
    assert d.cell_s == pytest.approx(steps * epochs * 2.0 + 3 * 2.0 + evaluations * 16 * 0.4 / 4)


def test_a_target_uses_what_check_recorded_on_it_else_its_data_sheet(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path))
    sheet = timing.rates_for([], [], "h100", "spawn")
    assert "data sheet" in sheet.source and sheet.device == "NVIDIA H100 SXM 80GB"
    recorded = {**sheet.to_dict(), "device": "NVIDIA H100 80GB HBM3", "bandwidth_bytes_s": 2.9e12}
    calibration.record_rates("NVIDIA H100 80GB HBM3", recorded, "2.14.1")
    assert calibration.rates("NVIDIA H100 80GB HBM3")["bandwidth_bytes_s"] == 2.9e12
    found = timing.rates_for([], [], "h100", "spawn")
    assert found.bandwidth_bytes_s == 2.9e12 and "recorded by lorabench check" in found.source
    assert "data sheet" in timing.rates_for([], [], "h100-pcie", "spawn").source  # another accelerator's


def test_a_cell_of_several_processes_or_one_not_simulated_has_no_time_and_says_why():
    from types import SimpleNamespace

    from lorabench.measure.trackers import Unavailable, unavailable

    rates = timing.rates_for([], [], "h100", "spawn")
    not_simulated = SimpleNamespace(prediction=SimpleNamespace(simulated=unavailable("a quantised base")))
    two = Cell(model="bert-tiny", method="lora", rank=8, nproc=2, strategy="ddp")
    one = Cell(model="bert-tiny", method="lora", rank=8)
    out = timing.durations([two, one], [not_simulated, not_simulated], rates)
    assert all(isinstance(d, Unavailable) for d in out)
    assert "several processes" in out[0].reason and out[1].reason == "a quantised base"


def test_the_progress_bar_scales_what_is_left_by_how_the_finished_cells_compared():
    bar = Progress(3, False, {"a": 10.0, "b": 10.0, "c": 20.0})
    assert bar.remaining_s() == 40.0
    bar.cell_done("a", 15.0)  # took 1.5x its prediction
    assert bar.remaining_s() == pytest.approx(45.0)
    assert Progress(3, False, {"a": 1.0}).remaining_s() is None  # a cell without a prediction


def test_the_plan_measures_its_rates_only_once_what_else_the_run_started_is_quiet(monkeypatch):
    """`lorabench run` starts the fork server before the plan (its imports overlap the survey); the
    plan's rates, timed in this process, wait for `quiet` (the server's imports beside them made a
    bert-tiny step of 12 ms predicted at 140 ms)."""
    from lorabench.plan import admission

    said = []
    real = timing.rates_for
    monkeypatch.setattr(timing, "rates_for", lambda *a: said.append("rates") or real(*a))
    admission.Plan.of(
        [Cell(model="cifar-mlp", method="full", samples=32)], quiet=lambda: said.append("quiet")
    )
    assert said == ["quiet", "rates"]


def test_once_the_fork_server_answers_its_imports_are_over():
    """`workers_ready` returns after the server's preload (it forks only then): a process started
    from it has the preloaded modules; under spawn there is no server to wait for."""
    from lorabench import child
    from lorabench.run import worker

    worker.workers_ready("spawn")  # nothing started, nothing to wait for
    worker.start_workers("forkserver", [Cell(model="cifar-mlp", method="full")])
    worker.workers_ready("forkserver")
    assert child.call(_preloaded, start_method="forkserver", timeout_s=60, name="test") is True


def _preloaded() -> bool:
    import sys

    return "lorabench.run.processes" in sys.modules

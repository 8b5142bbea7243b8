"""Precision as an axis: the step at each precision, its prediction, and the cells a device cannot run."""

import pytest
import torch

from lorabench.plan import admission, presets
from lorabench.plan.cells import Cell
from lorabench.plan.survey import survey
from lorabench.run.experiment import execute
from lorabench.workload import precision


def test_mixed_precision_keeps_fp32_state_and_halves_the_predicted_activations():
    fp32 = survey(Cell(model="bert-tiny", method="lora", rank=8)).prediction
    mixed = survey(Cell(model="bert-tiny", method="lora", rank=8, precision="bf16-mixed")).prediction
    pure = survey(Cell(model="bert-tiny", method="lora", rank=8, precision="bf16")).prediction
    assert (mixed.weights_bytes, mixed.grads_bytes, mixed.optimizer_bytes) == (
        fp32.weights_bytes,
        fp32.grads_bytes,
        fp32.optimizer_bytes,
    )  # fp32 master weights and Adam
    assert mixed.activations_bytes == pytest.approx(fp32.activations_bytes / 2, rel=0.01)
    assert pure.weights_bytes * 2 == fp32.weights_bytes and pure.activations_bytes == mixed.activations_bytes


def test_each_precision_steps_as_it_says():
    assert precision.Precision("fp16-mixed", "cpu").scaler is not None  # fp16: a loss scale
    assert precision.Precision("bf16-mixed", "cpu").scaler is None
    with precision.Precision("bf16-mixed", "cpu").autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with precision.Precision("fp32", "cpu").autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    assert precision.unsupported("bf16-mixed", "cpu") is None


def test_a_precision_the_device_cannot_run_is_skipped_with_the_reason(monkeypatch):
    why = "fp16-mixed cannot run on cpu: RuntimeError: no"
    monkeypatch.setattr(precision, "unsupported", lambda name, device: why if name == "fp16-mixed" else None)
    asked = []
    # the probe runs in a child (the parent never touches the device): here, in-process, to see the patch
    monkeypatch.setattr(admission.child, "call", lambda fn, args, **kw: asked.append(args) or fn(*args))
    cells = presets.expand(["quick"], ["cifar-mlp"], ["full"], None, {"precision": ("fp32", "fp16-mixed")})
    the_plan = admission.Plan.of(cells)
    assert the_plan.skipped == {cells[1].key(): why}
    assert asked == [("cpu", {"precision": ["fp16-mixed"]})]  # fp32 runs anywhere: not asked


def test_the_device_is_probed_in_a_child_and_a_failed_probe_skips_with_why(monkeypatch):
    cells = presets.expand(["quick"], ["cifar-mlp"], ["full"], None, {"precision": ("fp32", "bf16-mixed")})
    assert (
        admission.Plan.of(cells, start_method="spawn").skipped == {}
    )  # a real child: the CPU runs bf16-mixed

    def dies(fn, args, **kw):
        raise admission.child.ChildFailed("lorabench-probe died from SIGKILL without an answer")

    monkeypatch.setattr(admission.child, "call", dies)
    assert admission.Plan.of(cells).skipped == {
        cells[1].key(): "could not ask cpu whether it runs precision bf16-mixed: "
        "lorabench-probe died from SIGKILL without an answer"
    }


def test_a_mixed_precision_cell_trains_and_saves_less_for_backward():
    rows = {}
    for p in ("fp32", "bf16-mixed"):
        row = execute(
            Cell(
                model="bert-tiny",
                method="full",
                precision=p,
                samples=64,
                eval_samples=32,
                batch_size=32,
                seq_len=64,
                epochs=1,
                warmup_epochs=0,
            )
        )
        assert row.ok, row.error
        rows[p] = row.metrics
    assert rows["bf16-mixed"]["activations_saved_bytes"] < rows["fp32"]["activations_saved_bytes"]
    assert (
        rows["bf16-mixed"]["weights_bytes"] == rows["fp32"]["weights_bytes"]
    )  # the master weights stay fp32

"""Every optimizer holds, after its first step, the state its entry predicts from the shapes alone."""

import pytest
import torch

from lorabench.plan.cells import Cell
from lorabench.plan.survey import survey
from lorabench.workload import methods, models, optimizers
from lorabench.workload.optimizers import OPTIMIZERS


def held_after_one_step(model: str, method: str, rank: int | None, optimizer: str) -> tuple[int, list]:
    torch.manual_seed(0)
    bundle = models.build(model)
    adapted = methods.method(method).apply(bundle, Cell(model=model, method=method, rank=rank).adapter)
    params = [p for p in adapted.module.parameters() if p.requires_grad]
    opt, _ = optimizers.make(optimizer, params, 1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return optimizers.state_bytes_held(opt, lambda t: t), [p.shape for p in params]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("model, method, rank", [("cifar-mlp", "full", None), ("bert-tiny", "lora", 8)])
def test_the_state_held_after_the_first_step_is_the_predicted_state(model, method, rank, optimizer):
    held, shapes = held_after_one_step(model, method, rank, optimizer)
    predicted = OPTIMIZERS[optimizer].state_bytes(shapes, 4)
    assert held == predicted, (held, predicted)
    # and the survey predicts the same from the meta device, for the cell that names the optimizer
    cell = Cell(model=model, method=method, rank=rank, optimizer=optimizer)
    assert survey(cell).prediction.optimizer_bytes == predicted


def test_the_optimizers_differ_as_their_papers_say_on_the_mlp():
    """Adam: 8 bytes per fp32 parameter; AdamW8bit ~2 (+ block scales); SGD momentum 4; Adafactor
    a row and a column per matrix (the MLP's 21M parameters: about 8 thousand floats)."""
    n = 20_998_154
    state = {
        o: OPTIMIZERS[o].state_bytes(held_after_one_step("cifar-mlp", "full", None, "sgd")[1], 4)
        for o in OPTIMIZERS
    }
    assert state["adam"] == 8 * n + 6 * 4 and state["sgd"] == 4 * n
    assert 2 * n < state["adamw-8bit"] < 2.05 * n and state["paged-adamw-8bit"] == state["adamw-8bit"]
    assert state["adafactor"] < 0.01 * n


def test_an_unknown_optimizer_and_an_8bit_one_under_fsdp2_are_refused():
    from lorabench.plan.cells import CellError

    with pytest.raises(CellError, match="unknown optimizer 'lion'; choose from adafactor, adam"):
        Cell(model="cifar-mlp", method="full", optimizer="lion")
    with pytest.raises(CellError, match="cannot step FSDP2's sharded tensors"):
        Cell(model="cifar-mlp", method="full", optimizer="adamw-8bit", nproc=2, strategy="fsdp2")


def test_an_optimizer_without_bitsandbytes_is_unsupported_with_the_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    assert "pip install 'lorabench[quant]'" in optimizers.unsupported("adamw-8bit", "cpu")
    assert (
        optimizers.unsupported("sgd", "cpu") is None
        and optimizers.unsupported("adamw-8bit", "cpu") is not None
    )


def test_a_plan_skips_a_cell_whose_optimizer_cannot_run_and_says_why(monkeypatch):
    import sys

    from lorabench.plan import admission, presets

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    monkeypatch.setattr(admission.child, "call", lambda fn, args, **kw: fn(*args))  # the probe, in-process
    cells = presets.expand(["quick"], ["cifar-mlp"], ["full"], None, {"optimizer": ("adam", "adamw-8bit")})
    assert [c.optimizer for c in cells] == ["adam", "adamw-8bit"]
    assert admission.Plan.of(cells).skipped == {
        cells[1].key(): "optimizer adamw-8bit needs bitsandbytes, which is not installed: "
        "pip install 'lorabench[quant]' (bitsandbytes)"
    }

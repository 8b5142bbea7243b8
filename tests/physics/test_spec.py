"""One build for prediction and execution: what the survey and the simulation build on the meta
device is what the experiment builds on a real one, on every architecture of the zoo."""

import pytest
import torch

from lorabench.plan.cells import Cell
from lorabench.workload import spec
from lorabench.workload.zoo import ARCHITECTURES


def shape_of(module: torch.nn.Module) -> dict:
    """What a build must agree on: the trainable set, each parameter's dtype, the module types."""
    return {
        "trainable": sorted(n for n, p in module.named_parameters() if p.requires_grad),
        "dtypes": {n: p.dtype for n, p in module.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in module.named_modules()],
        "training": module.training,
    }


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_meta_build_is_the_real_build(arch):
    """The survey and the simulated step build on the meta device (`spec.build`), the experiment on
    its device (`spec.base`, `hold`, `adapt`): the same trainable set, dtypes and module types."""
    methods = [("full", None), ("lora", 4), ("ia3", None)] + ([] if arch == "gpt2" else [("loha", 4)])
    for method, rank in methods:
        cell = Cell(model=f"tiny-{arch}", method=method, rank=rank, precision="bf16", grad_checkpointing="on")
        with torch.device("meta"):
            _, meta = spec.build(cell.spec)
        torch.manual_seed(0)
        _, real = spec.build(cell.spec, "cpu")
        assert shape_of(meta.module) == shape_of(real.module), (arch, method)
        assert meta.params == real.params and meta.targets == real.targets
        assert {p.dtype for p in real.module.parameters()} == {torch.bfloat16}


def test_a_change_to_the_build_reaches_both(monkeypatch):
    """What the build applies is what the survey counts and what the run trains: a change to
    `spec.adapt` (here: LoRA's B frozen) moves the survey's count and the run's alike; neither keeps
    a copy of the build of its own."""
    from lorabench.plan.survey import survey
    from lorabench.run.experiment import execute

    cell = Cell(
        model="tiny-llama",
        method="lora",
        rank=4,
        samples=16,
        eval_samples=8,
        batch_size=8,
        seq_len=16,
        epochs=1,
    )
    before = survey(cell, simulate=False).params.trainable
    real_adapt = spec.adapt

    def frozen_b(s, bundle, device=None):
        adapted = real_adapt(s, bundle, device)
        for name, p in adapted.module.named_parameters():
            if "lora_B" in name:
                p.requires_grad_(False)
        from lorabench.workload.methods import count_params

        adapted.params = count_params(adapted.module)
        return adapted

    monkeypatch.setattr(spec, "adapt", frozen_b)
    after = survey(cell, simulate=False).params.trainable
    row = execute(cell)
    assert after < before and row.ok and row.metrics["params_trainable"] == after

"""Training FLOPs, counted: torch's own FlopCounterMode over one forward and backward of the cell's
actual model, on the meta device (shapes only: no memory, no arithmetic, milliseconds).

    lorabench run --dry-run --models cifar-mlp --methods full,lora,lora-reparam --ranks 8   # GFLOP/step column

What is counted: the matrix products (mm, addmm, bmm, convolutions, scaled-dot-product attention)
of the forward pass and of the backward pass autograd actually runs, so a frozen first layer's
missing input gradient and re-parametrization's full weight gradient are both right. What is not:
elementwise work (activations, norms, softmax outside SDPA, Adam's update), which is memory-bound
and a few percent of the matmuls at these sizes. `closed_form` is the textbook count for a stack
of Linear layers, kept to cross-check the counter (tests, `lorabench check`).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from .errors import first_line
from .tasks import Task
from .trackers import Unavailable

WHAT = "matmul FLOPs of forward + backward, counted by torch FlopCounterMode; Adam's elementwise update not included"


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer step (every micro-batch of it)."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def count(module: nn.Module, task: Task, *, batch_size: int, grad_accum: int, seq_len: int,
          vocab_size: int | None, num_labels: int | None) -> StepFlops | Unavailable:
    """Count one training step of `module` (built on the meta device) on a batch of the task's
    shape. A model whose forward reads its data (`.item()` on a tensor) cannot run on meta: the
    figure is then unavailable, with the reason, rather than guessed."""
    from torch.utils.flop_counter import FlopCounterMode

    ds = task.build_data(samples=batch_size, eval_samples=1, seq_len=seq_len, seed=0, vocab_size=vocab_size,
                         num_labels=num_labels)
    batch = {k: v.to("meta") for k, v in ds.train.items()}
    if "attention_mask" in batch:
        # an all-ones mask lets transformers skip the mask (a data-dependent test meta cannot make);
        # attention's FLOPs depend on shapes only, so the count is the same
        batch["attention_mask"] = None
    module.train()
    try:
        with FlopCounterMode(display=False) as fwd:
            loss, _ = task.loss(module, batch)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    except Exception as e:   # noqa: BLE001 (any model code may fail on meta; say why, do not guess)
        return Unavailable(f"FLOPs could not be counted on the meta device ({type(e).__name__}: {first_line(e)})")
    finally:
        module.zero_grad(set_to_none=True)
    return StepFlops(forward=float(fwd.get_total_flops() * grad_accum),
                     backward=float(bwd.get_total_flops() * grad_accum))


def closed_form(module: nn.Module, rows: int) -> StepFlops:
    """2 x rows x in x out per Linear forward; the same again for its weight gradient where the
    weight trains, and for its input gradient where anything before it trains (autograd computes
    no gradient nothing needs). A re-parametrized weight W + B A costs its B A product forward
    (2 x out x r x in), a full weight gradient, and B's and A's gradients from it. Valid for a
    stack of Linear layers that each see `rows` rows (the MLP), in module order."""
    fwd = bwd = 0.0
    trainable_before = False
    for m in module.modules():
        if not isinstance(m, nn.Linear):
            trainable_before |= any(p.requires_grad for p in m.parameters(recurse=False))
            continue
        out_f, in_f = m.out_features, m.in_features
        gemm = 2.0 * rows * in_f * out_f
        fwd += gemm
        if trainable_before:
            bwd += gemm
        if parametrize.is_parametrized(m, "weight"):
            r = m.parametrizations.weight[0].lora_A.shape[0]
            fwd += 2.0 * out_f * r * in_f
            bwd += gemm + 2 * (2.0 * out_f * r * in_f)   # dW, then dB = dW A^T and dA = B^T dW
            trainable_before = True
        elif m.weight.requires_grad:
            bwd += gemm
            trainable_before = True
    return StepFlops(fwd, bwd)


def gemm_shapes(module: nn.Module, rows: int) -> set[tuple[int, int, int]]:
    """(M, K, N) of each Linear's forward product at `rows` rows: the shapes the matmul ceiling is
    calibrated on, so MFU compares the model with what the device does on the model's own GEMMs."""
    return {(rows, m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)}

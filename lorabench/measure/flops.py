"""Training FLOPs, counted: torch's own FlopCounterMode over one forward and backward of the cell's
actual model, on the meta device (shapes only: no memory, no arithmetic, milliseconds).

    lorabench run --dry-run --models cifar-mlp --methods full,lora,lora-reparam --ranks 8   # GFLOP/step column

What is counted: the matrix products (mm, addmm, bmm, convolutions, scaled-dot-product attention)
of the forward pass and of the backward pass autograd actually runs, so a frozen first layer's
missing input gradient and re-parametrization's full weight gradient are both right. What is not:
elementwise work (activations, norms, softmax outside SDPA, Adam's update), which is memory-bound
and a few percent of the matmuls at these sizes. `closed_form` is the textbook count for a stack
of Linear layers, kept to cross-check the counter (tests, `lorabench check`). `measure_matmul_flops`
is the other side of MFU: the rate the device does the model's own matrix products at.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..errors import first_line
from ..workload.tasks import Task
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


def count(
    module: nn.Module,
    task: Task,
    *,
    batch_size: int,
    grad_accum: int,
    seq_len: int,
    vocab_size: int | None,
    num_labels: int | None,
    device: str = "meta",
) -> StepFlops | Unavailable:
    """Count one training step of `module` (built on `device`: the meta device, or the CPU for a
    real step) on a batch of the task's shape. A model whose forward reads its data (`.item()` on a
    tensor) cannot run on meta: the figure is then unavailable, with the reason, rather than guessed."""
    from torch.utils.flop_counter import FlopCounterMode

    ds = task.build_data(
        samples=batch_size,
        eval_samples=1,
        seq_len=seq_len,
        seed=0,
        vocab_size=vocab_size,
        num_labels=num_labels,
    )
    batch = {k: v.to(device) for k, v in ds.train.items()}
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
    except Exception as e:  # noqa: BLE001 (any model code may fail on meta; say why, do not guess)
        return Unavailable(
            f"FLOPs could not be counted on the {device} device ({type(e).__name__}: {first_line(e)})"
        )
    finally:
        module.zero_grad(set_to_none=True)
    return StepFlops(
        forward=float(fwd.get_total_flops() * grad_accum), backward=float(bwd.get_total_flops() * grad_accum)
    )


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
            bwd += gemm + 2 * (2.0 * out_f * r * in_f)  # dW, then dB = dW A^T and dA = B^T dW
            trainable_before = True
        elif m.weight.requires_grad:
            bwd += gemm
            trainable_before = True
    return StepFlops(fwd, bwd)


def gemm_shapes(module: nn.Module, rows: int) -> set[tuple[int, int, int]]:
    """(M, K, N) of each Linear's forward product at `rows` rows: the shapes the matmul ceiling is
    calibrated on, so MFU compares the model with what the device does on the model's own GEMMs."""
    return {(rows, m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)}


# Seconds each shape is timed for. A GPU's clocks ramp up under load; a CPU's rate is as steady at
# 0.1 s (2 cores, five calls on four shapes each: 2.2-2.8 % spread at 0.1 s, 1.7-7.2 % at 0.2 s).
MATMUL_WINDOW_S = {"cpu": 0.1, "cuda": 0.2}


def measure_matmul_flops(device, dtype, shapes=(), seconds: float | None = None) -> dict[str, Any]:
    """Sustained FLOP/s of matmuls at `dtype` on `device`, on each (M, K, N) of `shapes` (the
    model's own GEMMs) and on a square one: {"matmul_flops": the best, "shapes": each one's rate}.
    The best is the ceiling model FLOPs utilisation is measured against: the model cannot beat
    what the device does on the model's largest products, and a square GEMM alone can sit below
    a wide one. 2 M K N FLOPs per product; each timed between synchronisations after a warm-up,
    so kernel selection and clock ramp-up are excluded. The eight largest shapes are kept, and a
    shape larger than the square one has its largest side halved until it is not (an LM head's
    vocabulary-wide product would take a minute on a CPU); `shapes` says what was timed. Each is
    timed for `seconds` (`MATMUL_WINDOW_S` by device kind where not given)."""
    import torch

    n = 4096 if device.type == "cuda" else 1024
    if seconds is None:
        seconds = MATMUL_WINDOW_S.get(device.type, MATMUL_WINDOW_S["cuda"])
    todo = []
    for shape in sorted({tuple(int(x) for x in s) for s in shapes}, key=lambda s: -s[0] * s[1] * s[2])[:8]:
        shape = list(shape)
        while shape[0] * shape[1] * shape[2] > n**3:
            i = shape.index(max(shape))
            shape[i] //= 2
        todo.append(tuple(shape))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rates = []
    for m, k, nn_ in [(n, n, n), *todo]:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, nn_, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync()
        count, t0 = 0, time.perf_counter()
        while True:
            for _ in range(4):
                a @ b
            count += 4
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        rates.append({"shape": [m, k, nn_], "flops": 2 * m * k * nn_ * count / elapsed})
        del a, b
    return {"matmul_flops": max(r["flops"] for r in rates), "shapes": rates}

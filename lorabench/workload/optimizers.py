"""The optimizer of a cell (`--optimizer`): how it is built, the state it holds per trainable tensor,
and whether this device and build can run it.

    lorabench run --models cifar-mlp --methods full,lora --ranks 8 --optimizer adam,adamw-8bit,adafactor,sgd

Adam's two moments are 8 bytes per fp32 trainable parameter, half of what full fine-tuning holds
per parameter, so the optimizer is the first thing practitioners change when full fine-tuning does
not fit. Each entry predicts its own state from the trainable tensors' shapes, as the optimizer
allocates it at its first step; `run.probes.probe_step` measures what it then holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import first_line
from ..forksafe import allow

STEP_BYTES = 4  # torch's optimizers keep `step` as a float32 scalar tensor per parameter
# bitsandbytes' 8-bit optimizers: tensors below this many elements keep 32-bit state
# (`min_8bit_size`), the others 1 byte per element per moment plus one float32 absmax per block of
# 256 elements; the two 256-entry float32 quantisation maps (signed for the first moment, unsigned
# for the second) are the optimizer's own, shared by every 8-bit tensor (bitsandbytes.optim.optimizer).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
BNB_QMAP_BYTES = 256 * 4
INSTALL_HINT = "pip install 'lorabench[quant]' (bitsandbytes)"


def _adam(params: list[nn.Parameter], lr: float, cls: type) -> tuple[torch.optim.Optimizer, str]:
    """Adam or AdamW with the fused kernel where torch has one for these tensors.

    On the CPU the default foreach Adam allocates temporaries the size of every parameter on each
    step; on the 21M-parameter MLP the page faults cost more than the arithmetic (~20 s vs ~10 s
    an epoch at batch 32 on 2 cores). fused=True updates in place.
    """
    name = cls.__name__.lower()
    try:
        return cls(params, lr=lr, fused=True), f"{name}(fused)"
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return cls(params, lr=lr, foreach=True), f"{name}(foreach)"


def _bnb(name: str) -> Callable[[list[nn.Parameter], float], tuple[torch.optim.Optimizer, str]]:
    def build(params: list[nn.Parameter], lr: float) -> tuple[torch.optim.Optimizer, str]:
        bnb = allow("bitsandbytes")  # kept out of processes that fork cells: it queries CUDA on import
        return getattr(bnb.optim, name)(params, lr=lr), f"bitsandbytes.optim.{name}"

    return build


def _moments(n: int, w: int) -> int:
    return 2 * n * w + STEP_BYTES


def _bnb_moments(n: int, w: int) -> int:
    if n < BNB_MIN_8BIT_SIZE:
        return 2 * n * 4
    return 2 * (n + math.ceil(n / BNB_BLOCK) * 4)


def _bnb_maps(shapes: Sequence[Sequence[int]]) -> int:
    return 2 * BNB_QMAP_BYTES if any(math.prod(s) >= BNB_MIN_8BIT_SIZE for s in shapes) else 0


def _factored(shape: Sequence[int], w: int) -> int:
    """torch's Adafactor: no first moment; a matrix keeps its second moment factored into a row and
    a column vector (row_var, col_var), a vector keeps it whole."""
    if len(shape) < 2:
        return math.prod(shape) * w + STEP_BYTES
    rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
    return (rows + cols) * w + STEP_BYTES


@dataclass(frozen=True)
class Optimizer:
    """One `--optimizer` value."""

    description: str
    build: Callable[[list[nn.Parameter], float], tuple[torch.optim.Optimizer, str]]
    state: Callable[[Sequence[int], int], int]  # bytes of state for a trainable tensor (shape, weight bytes)
    shared: Callable[[Sequence[Sequence[int]]], int] = lambda shapes: 0  # the optimizer's own state
    bitsandbytes: bool = False
    paged: bool = False  # state in unified memory, which the driver may page out to the host
    probe: bool = True  # a device must be asked before it runs it (a fused kernel, bitsandbytes)

    def state_bytes(self, shapes: Sequence[Sequence[int]], weight_bytes: int) -> int:
        return sum(self.state(tuple(s), weight_bytes) for s in shapes) + self.shared(shapes)

    def conflict(self, cell) -> str | None:
        """Why this optimizer cannot step the rest of `cell` (settings.Choice's question)."""
        from .distributed import STRATEGIES

        if self.bitsandbytes and cell.strategy is not None and STRATEGIES[cell.strategy].shards:
            return f"--optimizer {cell.optimizer} (bitsandbytes) cannot step FSDP2's sharded tensors; use ddp"
        return None


OPTIMIZERS: dict[str, Optimizer] = {
    "adam": Optimizer(
        "Adam (torch, fused where it can be): two moments at the weights' dtype",
        lambda p, lr: _adam(p, lr, torch.optim.Adam),
        lambda s, w: _moments(math.prod(s), w),
        probe=False,  # every device runs it: the seeds' optimizer
    ),
    "adamw": Optimizer(
        "AdamW (torch, fused where it can be, weight decay 0.01): two moments at the weights' dtype",
        lambda p, lr: _adam(p, lr, torch.optim.AdamW),
        lambda s, w: _moments(math.prod(s), w),
    ),
    "adamw-8bit": Optimizer(
        "AdamW with 8-bit block-wise moments (bitsandbytes); tensors under 4,096 elements keep 32-bit state",
        _bnb("AdamW8bit"),
        lambda s, w: _bnb_moments(math.prod(s), w),
        _bnb_maps,
        bitsandbytes=True,
    ),
    "paged-adamw-8bit": Optimizer(
        "AdamW8bit with its state in paged (unified) memory (bitsandbytes; QLoRA's choice): on a GPU the "
        "driver may move it to the host, out of the allocator's sight",
        _bnb("PagedAdamW8bit"),
        lambda s, w: _bnb_moments(math.prod(s), w),
        _bnb_maps,
        bitsandbytes=True,
        paged=True,
    ),
    "adafactor": Optimizer(
        "Adafactor (torch): no first moment, the second factored per matrix into a row and a column",
        lambda p, lr: (torch.optim.Adafactor(p, lr=lr, foreach=True), "adafactor(foreach)"),
        _factored,
    ),
    "rmsprop": Optimizer(
        "RMSprop (torch, foreach): one running mean of squared gradients at the weights' dtype",
        lambda p, lr: (torch.optim.RMSprop(p, lr=lr, foreach=True), "rmsprop(foreach)"),
        lambda s, w: math.prod(s) * w + STEP_BYTES,
    ),
    "sgd": Optimizer(
        "SGD with momentum 0.9 (torch): one buffer at the weights' dtype",
        lambda p, lr: (torch.optim.SGD(p, lr=lr, momentum=0.9, foreach=True), "sgd(momentum 0.9, foreach)"),
        lambda s, w: math.prod(s) * w,
    ),
}
DEFAULT = "adam"  # the seeds' optimizer


def make(name: str, params: list[nn.Parameter], lr: float) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer `name` over `params`, and the implementation that was built (the row records it)."""
    return OPTIMIZERS[name].build(params, lr)


def state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Every tensor of the optimizer's state (moments, step counts, quantisation maps)."""
    for st in optimizer.state.values():
        yield from (v for v in st.values() if torch.is_tensor(v))


def state_bytes_held(optimizer: torch.optim.Optimizer, local: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Bytes of state the optimizer holds (`local`: a rank's shard of a sharded tensor), each storage
    counted once: bitsandbytes may share a quantisation map between parameters."""
    seen: set[int] = set()
    total = 0
    for t in map(local, state_tensors(optimizer)):
        where = t.untyped_storage().data_ptr()
        if where and where in seen:  # 0: an empty tensor, which holds nothing
            continue
        seen.add(where)
        total += t.nbytes
    return total


def unsupported(name: str, device: str) -> str | None:
    """Why `device` cannot run optimizer `name`, or None: one step on a small layer. Run in a child
    (it initialises the device)."""
    layer = nn.Linear(64, 64, device=device)
    try:
        opt, _ = make(name, list(layer.parameters()), 1e-3)
        layer(torch.randn(2, 64, device=device)).sum().backward()
        opt.step()
    except ImportError:
        return f"optimizer {name} needs bitsandbytes, which is not installed: {INSTALL_HINT}"
    except Exception as e:  # noqa: BLE001 (the reason is the row's)
        return f"optimizer {name} does not run on {device}: {type(e).__name__}: {first_line(e)}"
    return None

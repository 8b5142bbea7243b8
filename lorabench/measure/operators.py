"""Every operator of a simulated training step, with what it costs a device: its FLOPs, the bytes it
reads and writes, and, for the kernels whose speed depends on their shapes, enough of its
arguments to run it again on real tensors (`rates` times them there).

    lorabench run --dry-run --models medium-llama --methods full,lora --ranks 16   # predicted step time

`OpLog` is a dispatch mode on the fake tensors of the simulated step (`simulation.step`), so it
sees the cell's own operators, forward, backward and the optimizer's update, with their real
shapes and dtypes, and nothing is computed. An operator is one of three kinds:

- "matmul": the products whose rate depends on their shapes (mm, addmm, bmm, baddbmm,
  convolutions, the attention kernels): FLOPs from torch's own counter (`flop_counter`), and its
  signature (shapes, strides, dtypes, the other arguments) to be timed on its own shapes;
- "memory": every other operator that makes or writes a tensor (elementwise, reductions, copies,
  the optimizer's foreach updates): its bytes, the tensors it reads and writes, each once;
- "dispatch": an operator that moves no data (a view of its input: view, transpose, expand,
  slicing; an uninitialised tensor): only the cost of dispatching it.

The log keeps one entry per distinct operator, phase and signature, with how many times it ran:
a model's layers repeat, so a step of thousands of operators is a few hundred entries.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PHASES = ("forward", "backward", "optimizer")

# The kernels timed on their own shapes: torch's FLOP counter knows most of them; the CPU's fused
# attention it does not, and is counted as the flash kernel it mirrors.
_CPU_ATTENTION = {
    "_scaled_dot_product_flash_attention_for_cpu": "forward",
    "_scaled_dot_product_flash_attention_for_cpu_backward": "backward",
}


@dataclass(frozen=True)
class Meta:
    """A tensor argument, as much of it as running the operator again needs."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self, device: torch.device) -> Tensor:
        """A real tensor of this layout on `device`: floats 0.5, integers 0 (a valid index), which
        no kernel's speed depends on (a random fill of a model's worth of optimizer state would
        take longer than timing it)."""
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)
        flat = torch.empty(span, device=device, dtype=self.dtype)
        flat.fill_(0.5 if self.dtype.is_floating_point else 0)
        return flat.as_strided(self.shape, self.stride)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class Op:
    """One distinct operator of the step, in one phase."""

    name: str  # torch's name of the overload: aten.mm.default
    phase: str  # one of PHASES
    kind: str  # matmul, memory or dispatch
    flops: float  # of one call
    bytes: int  # read and written by one call
    elements: int = 0  # written by one call
    in_place: bool = False  # it writes into a tensor it was given
    fresh: tuple[int, ...] = ()  # bytes of each tensor it allocates
    signature: tuple | None = None  # (args, kwargs), tensors as Meta: what `rates` runs again


def _bytes(t: Tensor) -> int:
    """What an operator reads or writes of `t`: its elements once, and never more than its storage
    holds (an expanded view reads each stored element once)."""
    n = t.numel() * t.element_size()
    try:
        return min(n, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return n


def _frozen(x):
    """`x` as a hashable signature: a tensor as its Meta, lists and dicts as tuples."""
    if isinstance(x, Tensor):
        return Meta(tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _frozen(v)) for k, v in x.items())
    if isinstance(x, torch.device):
        return None  # replayed on the device that times it
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.layout, torch.memory_format)):
        return x
    return type(x).__name__  # an object no kernel is timed on (a profiler's record)


def _flops(func, args, kwargs, out) -> float | None:
    """FLOPs of one call by torch's counter, the CPU's fused attention as the flash kernel; None
    for an operator that is not a product."""
    from torch.utils import flop_counter as fc

    packet = func.overloadpacket
    if packet in fc.flop_registry:
        return float(fc.flop_registry[packet](*args, **kwargs, out_val=out))
    direction = _CPU_ATTENTION.get(packet.__name__)
    if direction is None:
        return None
    q, k, v = (a.shape for a in args[:3]) if direction == "forward" else (a.shape for a in args[1:4])
    count = fc.sdpa_flop_count if direction == "forward" else fc.sdpa_backward_flop_count
    return float(count(*(([args[0].shape] if direction == "backward" else []) + [q, k, v])))


# Operators that make a tensor without writing it.
_UNWRITTEN = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def _shares(outputs: list[Tensor], inputs: list[Tensor]) -> bool:
    """Whether every output lives in an input's storage: a view, however its schema declares it
    (`_unsafe_view`)."""
    held = {id(t.untyped_storage()) for t in inputs}
    return bool(outputs) and all(id(t.untyped_storage()) in held for t in outputs)


class OpLog(TorchDispatchMode):
    """The operators of a step, counted by (operator, phase, signature). `phase` is set by the step
    as it goes (forward, backward, optimizer)."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.ops: Counter[Op] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "prim":  # a fake tensor's metadata (prim.device): no kernel in a real step
            return out
        flops = _flops(func, args, kwargs, out)
        written = [a for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if (
            not written
            and flops is None
            and (
                _shares(outputs, inputs)
                or func.overloadpacket.__name__ in _UNWRITTEN
                or not (inputs or outputs)
            )
        ):
            self.ops[Op(str(func), self.phase, "dispatch", 0.0, 0)] += 1
            return out
        # what it writes: its outputs, or the arguments it updates in place (a foreach update
        # returns nothing)
        into = [
            args[i] if i < len(args) else kwargs.get(a.name)
            for i, a in enumerate(func._schema.arguments)
            if a in written
        ]
        into = [t for t in tree_leaves(into) if isinstance(t, Tensor)] if written else outputs
        read = sum(_bytes(t) for t in inputs)
        made = sum(_bytes(t) for t in into)
        fresh = () if written else tuple(_bytes(t) for t in outputs if not _shares([t], inputs))
        op = Op(
            str(func),
            self.phase,
            "memory" if flops is None else "matmul",
            flops or 0.0,
            read + made,
            sum(t.numel() for t in into),
            bool(written),
            fresh,
            (_frozen(args), _frozen(kwargs)),
        )
        self.ops[op] += 1
        return out

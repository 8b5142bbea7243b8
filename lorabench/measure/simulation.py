"""One training step simulated on fake tensors: the peak memory a cell needs, what holds it at
the peak, and the step's FLOPs, before anything is allocated.

    lorabench run --dry-run --models hf:./my-llama --methods full,lora --fit-memory 24GiB

The cell's own model, method, precision, checkpointing and optimizer run two training steps
(the second is the steady state: the optimizer's state exists from the first) under torch's
`FakeTensorMode`, which runs every operator's shape logic and allocates nothing. `LiveTensors`, a
dispatch mode on the same principle as torch's `MemTracker`, sees every tensor the step creates
and when the last reference to its storage goes, so the peak is that of the live storages, each
counted once (tied weights, views), and its breakdown is what was live at that moment:
weights (frozen, trainable), gradients, optimizer state, activations (what the forward created)
and temporaries (what the backward and the optimizer step created that is not a gradient or
state). The data set is resident before the step, as in a run, and left out (so is it from the
CPU's measured peaks; a GPU's allocator peak counts it, a run's synthetic set being kilobytes).

What it cannot see: a GPU's runtime context (a fit check adds the one recorded for the cell's kind:
`calibration`) and allocator fragmentation (the allocator's rounding to 512-byte blocks is applied
for a GPU cell), kernels that differ by device other than attention (the step runs the CPU's
kernels, autocast included; attention, whose kernel decides what is kept for backward, a GPU cell
runs as a GPU would: `GpuAttention`), a host's C library keeping freed heap (the timed region's
host RSS sits above this peak: `predicted_over_host_peak`; with the heap handed back, `heap`, it
does not: `predicted_over_host_step_peak`), and a host's libraries paging in.
A model whose forward reads a value (`.item()`), or a method fake tensors cannot run, gives
`Unavailable` with the reason; the closed form then stands in (`predictions`).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import first_line
from ..workload.distributed import local
from ..workload.optimizers import OPTIMIZERS, state_tensors
from ..workload.tasks import Task
from .flops import StepFlops
from .operators import Op, OpLog
from .trackers import Unavailable

# What holds memory at the peak, in the order a report lists it.
KINDS = ("weights_frozen", "weights_trainable", "gradients", "optimizer", "activations", "temporaries")
# The CUDA caching allocator hands out blocks in multiples of 512 bytes (c10/cuda/CUDACachingAllocator.cpp).
GPU_BLOCK_BYTES = 512


@dataclass(frozen=True)
class Simulated:
    peak_bytes: int
    at_peak: dict[str, int]  # bytes of each of KINDS live at the peak; they sum to peak_bytes
    flops: StepFlops  # of one optimizer step, every micro-batch, counted on the simulated step
    attention: str = "the CPU's kernels"  # which attention kernels the step ran, as the device would
    # every distinct operator of one optimizer step (every micro-batch) and how many times it runs
    ops: tuple[tuple[Op, float], ...] = ()
    trained_tensors: int = 0  # the tensors the optimizer updates (its host time grows with them)


class GpuAttention(TorchFunctionMode):
    """Attention as a CUDA or ROCm device runs it, on the CPU's fake tensors. What a kernel keeps
    for backward decides the peak: the CPU's fused kernel refuses dropout and falls back to the math
    path, which keeps the (batch, heads, seq, seq) probabilities and dropout mask; the GPU's flash
    and memory-efficient kernels handle dropout and masks and keep the output and one log-sum-exp
    per row. Each call runs the kernel torch 2.14's sdp_utils would pick on a GPU (priority flash,
    memory-efficient, math), through that kernel's own op, whose shapes fake tensors compute."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    @staticmethod
    def kernel(q: Tensor, k: Tensor, v: Tensor, attn_mask, enable_gqa: bool) -> str:
        """flash, efficient or math, by the rules that decide between them on a GPU: flash takes
        half precision without an arbitrary mask (causal only), head sizes up to 256, grouped heads
        included; the memory-efficient kernel any float dtype and a mask, head sizes in whole
        16-byte steps, but not grouped heads; what neither takes, math. (Flash needs sm80 or newer
        and some ROCm targets lack it: there the memory-efficient kernel runs, keeping as little.)"""
        if q.dim() != 4:
            return "math"
        half = q.dtype in (torch.float16, torch.bfloat16)
        if half and attn_mask is None and q.shape[-1] <= 256 and q.shape[-1] == v.shape[-1]:
            return "flash"
        align = 8 if half else 4  # the memory-efficient kernel's head sizes, in elements
        if not (enable_gqa and k.shape[1] != q.shape[1]) and q.shape[-1] % align == v.shape[-1] % align == 0:
            return "efficient"
        return "math"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, mask, dropout, causal, scale, gqa = _sdpa_args(*args, **kwargs)
        kernel = self.kernel(q, k, v, mask, gqa)
        self.calls[kernel] = self.calls.get(kernel, 0) + 1
        if kernel == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout, causal, scale=scale)[
                0
            ]
        if kernel == "efficient":
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, _bias(mask, q, k), True, dropout, causal, scale=scale
            )[0]
        return torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, mask, dropout, causal, None, scale=scale, enable_gqa=gqa
        )[0]

    def said(self) -> str:
        """Which kernels ran, for the prediction's row."""
        ran = ", ".join(f"{name} x{n}" for name, n in sorted(self.calls.items()))
        return f"as a GPU runs it: {ran} per step" if ran else "no scaled_dot_product_attention call"


def _bias(mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """The mask as the memory-efficient kernel takes it, made as torch's SDPA makes it per call (so
    each layer's backward keeps its own): a boolean mask becomes a float one in the query's dtype
    (convert_boolean_attn_mask), its last dimension padded to a multiple of 16 where it is not one
    (preprocess_mask), then expanded to (batch, heads, queries, keys), a view."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    keys = mask.shape[-1]
    if keys % 16:
        mask = F.pad(mask, (0, 16 - keys % 16))[..., :keys]
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _sdpa_args(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """F.scaled_dot_product_attention's arguments, by name."""
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


class LiveTensors(TorchDispatchMode):
    """Bytes of the live storages, by kind, and their peak. Every tensor an operator allocates is
    counted once per storage (a view or an in-place result adds nothing), under the kind of the
    phase that made it, until its storage is freed (a weak reference's callback). `tag` moves a storage to another
    kind: a gradient once autograd has accumulated it, the optimizer's state once it exists."""

    def __init__(self, block: int = 1):
        super().__init__()
        self.block = block
        self.phase = "activations"
        self.kind: dict[int, str] = {}
        self.size: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.totals = dict.fromkeys(KINDS, 0)
        self.now = self.peak = 0
        self.start = 0  # bytes live when the step began (`step`: weights, buffers, the optimizer's state)
        self.at_peak = dict(self.totals)

    def tag(self, t: Tensor, kind: str) -> None:
        storage = local(t).untyped_storage()  # an FSDP2 shard: this rank's part
        key = id(storage)
        if key not in self.kind:
            n = -(-storage.nbytes() // self.block) * self.block
            self.kind[key], self.size[key] = kind, n
            self.refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
            self.totals[kind] += n
            self.now += n
            if self.now > self.peak:
                self.peak, self.at_peak = self.now, dict(self.totals)
        elif self.kind[key] != kind:
            self.totals[self.kind[key]] -= self.size[key]
            self.totals[kind] += self.size[key]
            self.kind[key] = kind

    def restart_peak(self) -> None:
        """Forget the peak so far: the next one is measured from what is live now."""
        self.peak, self.at_peak = self.now, dict(self.totals)

    def _free(self, key: int) -> None:
        kind, n = self.kind.pop(key), self.size.pop(key)
        del self.refs[key]
        self.totals[kind] -= n
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            # a view or an in-place op allocates nothing: counting its storage would count a tensor
            # made before the step (a batch sliced from the data set is the whole set's storage)
            return out
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                key = id(local(t).untyped_storage())
                if key not in self.kind:
                    self.tag(t, self.phase)
        return out


def _fake_storage(module: nn.Module) -> nn.Module:
    """`module` with every parameter and buffer replaced by an uninitialised one of the same shape
    and dtype on the CPU (fake, under the fake mode): a tensor shared by two modules (tied weights)
    stays shared. Done by hand: `to_empty` swaps tensors in place, which fails while anything else
    holds a reference to them."""
    new: dict[int, Tensor] = {}
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) not in new:
                    empty = torch.empty_like(t, device="cpu")
                    new[id(t)] = (
                        nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
                    )
                table[name] = new[id(t)]
    return module


def step(
    module: nn.Module,
    task: Task,
    batches: list[dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    live: LiveTensors,
    *,
    grad_accum: int,
    autocast_dtype: torch.dtype | None = None,
    log: OpLog | None = None,
) -> StepFlops:
    """One optimizer step over `batches` (its micro-batches, each loss divided by `grad_accum`, as
    `train.fit` steps) inside `live`, which sees the gradients once accumulated and the optimizer's
    state once it exists; the FLOPs of the last micro-batch, times `grad_accum`. Tensors that exist
    before the step are tagged first (weights, buffers, the optimizer's state: a second step's)."""
    from torch.utils.flop_counter import FlopCounterMode

    trainable = [p for p in module.parameters() if p.requires_grad]
    with live, log if log is not None else contextlib.nullcontext():
        for p in module.parameters():
            live.tag(p, "weights_trainable" if p.requires_grad else "weights_frozen")
        for b in module.buffers():
            live.tag(b, "weights_frozen")
        for v in state_tensors(optimizer):
            live.tag(v, "optimizer")
        live.start = live.now
        hooks = [
            p.register_post_accumulate_grad_hook(lambda p: live.tag(p.grad, "gradients")) for p in trainable
        ]
        try:
            for batch in batches:
                live.phase = "activations"
                _phase(log, "forward")
                cast = (
                    torch.autocast("cpu", dtype=autocast_dtype)
                    if autocast_dtype
                    else contextlib.nullcontext()
                )
                with FlopCounterMode(display=False) as fwd, cast:
                    loss = task.loss(module, batch)[0]
                live.phase = "temporaries"
                _phase(log, "backward")
                with FlopCounterMode(display=False) as bwd:
                    (loss / grad_accum).backward()
                del loss
            _phase(log, "optimizer")
            optimizer.step()
            for v in state_tensors(optimizer):  # made by the first step
                live.tag(v, "optimizer")
            optimizer.zero_grad(set_to_none=True)
        finally:
            for h in hooks:
                h.remove()
    return StepFlops(float(fwd.get_total_flops() * grad_accum), float(bwd.get_total_flops() * grad_accum))


def _phase(log: OpLog | None, phase: str) -> None:
    if log is not None:
        log.phase = phase


def _first_update(optimizer: torch.optim.Optimizer, trainable: list[Tensor]) -> None:
    """The optimizer's first update on zero gradients: it makes the state a step of training holds
    from then on (the moments, their step counts), as a first forward and backward would have, at a
    fraction of their cost (a candidate of `lorabench plan` is surveyed in about half the time)."""
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def simulate(
    build,
    task: Task,
    data,
    *,
    batch_size: int,
    grad_accum: int,
    optimizer: str,
    lr: float,
    autocast_dtype: torch.dtype | None = None,
    block: int = 1,
    gpu: bool = False,
) -> Simulated | Unavailable:
    """The second training step of the model `build()` returns (built on the meta device, adapted,
    cast and checkpointed as the cell does it, in the mode it trains in) on micro-batches of
    `data()`'s training split (made under the fake mode), after a first update that makes the
    optimizer's state (`_first_update`). The step runs min(grad_accum, 2) micro-batches: from the
    second one the gradients of the first are held, and more change nothing. `block`: the allocator's rounding
    (GPU_BLOCK_BYTES on a GPU); `gpu`: attention as a GPU runs it (`GpuAttention`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = OPTIMIZERS[optimizer]
    try:
        # built on the meta device outside the fake mode (converting a fake parameter, as PEFT's
        # `.to` of its adapters does, is what fake tensors refuse), then given fake storage
        built = build()
        with FakeTensorMode(allow_non_fake_inputs=True):
            module = _fake_storage(built)
            train = data()
            trainable = [p for p in module.parameters() if p.requires_grad]
            live = LiveTensors(block)
            if spec.bitsandbytes:
                # bitsandbytes runs no fake tensors (and is kept out of this process): its state, by
                # its closed form, held from the first step on, and a stateless step
                state = spec.state_bytes([p.shape for p in trainable], trainable[0].element_size())
                with live:
                    held = torch.empty(state, dtype=torch.uint8)
                live.tag(held, "optimizer")
                opt = torch.optim.SGD(trainable, lr=lr)
            else:
                opt, _ = spec.build(trainable, lr)
            n = next(iter(train.values())).shape[0]
            micro = min(grad_accum, 2)
            attention = GpuAttention() if gpu else contextlib.nullcontext()
            with live:  # the first step's lasting effect, the optimizer's state, without its passes
                _first_update(opt, trainable)
            # the second step's micro-batches: the steady state, measured
            starts = [((micro + m) * batch_size) % max(n - batch_size + 1, 1) for m in range(micro)]
            batches = [{key: v[lo : lo + batch_size] for key, v in train.items()} for lo in starts]
            live.restart_peak()
            log = OpLog()
            with attention:
                flops = step(
                    module,
                    task,
                    batches,
                    opt,
                    live,
                    grad_accum=grad_accum,
                    autocast_dtype=autocast_dtype,
                    log=log,
                )
    except Exception as e:  # noqa: BLE001 (any model or method may do what fake tensors cannot)
        return Unavailable(
            f"the step could not be simulated on fake tensors ({type(e).__name__}: {first_line(e)})"
        )
    said = attention.said() if gpu else "the CPU's kernels"
    # the micro-batches simulated stand for all of a step's: their forward and backward repeat
    scale = lambda op: grad_accum / micro if op.phase != "optimizer" else 1.0
    ops = tuple((op, n * scale(op)) for op, n in log.ops.items())
    return Simulated(
        peak_bytes=live.peak,
        at_peak=live.at_peak,
        flops=flops,
        attention=said,
        ops=ops,
        trained_tensors=len(trainable),
    )

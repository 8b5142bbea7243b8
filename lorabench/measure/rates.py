"""What a device does per second, measured on it in a fraction of a second: the rates the step-time
model (`steptime`) turns a simulated step's operators into seconds with.

    lorabench check                        # records this machine's rates under its name
    lorabench run --dry-run --preset quick # measures them here (CPU), or reads what was recorded

- products (mm, addmm, bmm, convolutions, attention): each distinct one of the step timed on its
  own shapes (`Op.signature`), shrunk along its largest side to at most `SHRINK_FLOPS` first (an LM
  head's product would take seconds on a CPU; its rate holds at half the size), as a dry run
  times them on the CPU and a cell in its own process before its timed region; a product not timed
  runs at `matmul_flops` of its dtype, the best rate timed;
- bandwidth: bytes read and written per second by an elementwise add of large tensors, out of place
  (the output a separate buffer) and in place, on buffers that already exist;
- random draws per second (dropout's masks: a CPU draws them far below its bandwidth);
- first touch (CPU): bytes per second the kernel maps and zeroes for a fresh large allocation; the
  C library maps every allocation of 32 MiB and more afresh (glibc's largest mmap threshold), and
  unmaps it when freed, so a step pays it for each large tensor it makes, every step (a GPU's
  caching allocator reuses its blocks: no cost);
- host time per operator in each phase (forward, backward, optimizer) and per trained tensor in
  the optimizer's step: a small model's step (`_small`), whose kernels are too small to matter, timed
  on the host; on a GPU this is the time to launch, which the device's work hides when it is longer.

Each rate is the median of a few timings between synchronisations after a warm-up call.
"""

from __future__ import annotations

import functools
import hashlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .operators import PHASES, Meta, Op, OpLog

# A product is timed at no more FLOPs than this (its largest side halved until it is not).
SHRINK_FLOPS = {"cpu": 1e9, "cuda": 1e12}
SHRINK_BYTES = {"cpu": 256 * 2**20, "cuda": 4 * 2**30}  # an optimizer's update, timed on this much of it
BANDWIDTH_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}  # each operand of the bandwidth's add
FRESH_BYTES = 64 * 2**20  # a fresh allocation's first touch, timed on this many bytes
FRESH_MIN_BYTES = 32 * 2**20  # glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
RANDOM_ELEMENTS = 2**22
FLUSH_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Rates:
    """A device's rates and where they come from."""

    device: str  # its name: the CPU's model, the GPU's name, a data sheet's accelerator
    source: str  # how they were had: measured here, recorded by `lorabench check`, a data sheet
    matmul_flops: dict[str, float]  # FLOP/s of a product not timed, by dtype name
    bandwidth_bytes_s: float  # read + written per second, out of place
    in_place_bytes_s: float  # read + written per second, in place
    random_per_s: float  # random elements drawn per second
    first_touch_bytes_s: float | None  # a fresh large allocation's pages (None: its blocks are reused)
    op_s: dict[str, float]  # host seconds per operator, by phase
    tensor_s: float  # host seconds per trained tensor in the optimizer's step
    asynchronous: bool  # the device runs behind the host (a GPU): the longer of the two is the step's
    timed_s: dict[str, float] = field(default_factory=dict)  # seconds of a product, by `key`
    # host seconds of an optimizer's step, (fixed, per trained tensor), by its name: op_s's
    # "optimizer_step" and tensor_s are the first optimizer's
    optimizer_s: dict[str, tuple[float, float]] = field(default_factory=dict)

    def update_s(self, optimizer: str | None) -> tuple[float, float]:
        """(fixed, per trained tensor) host seconds of `optimizer`'s step (the first measured where
        it was not)."""
        found = self.optimizer_s.get(optimizer) if optimizer else None
        return tuple(found) if found else (self.op_s.get("optimizer_step", 0.0), self.tensor_s)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Rates":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def key(op: Op) -> str:
    """A product's identity across processes: its operator and signature, hashed."""
    return hashlib.sha1(repr((op.name, op.signature)).encode()).hexdigest()[:16]


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def timed(
    fn: Callable[[], object], device: torch.device, repeats: int = 3, at_least_s: float = 1e-3
) -> float:
    """Seconds per call of `fn`: the median of `repeats` timings, each of as many calls as take
    `at_least_s` (a clock's resolution and a GPU's launch latency amortised) between
    synchronisations, after a warm-up call (kernel selection, first-touch of its workspace)."""
    sync = _sync(device)
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    calls = max(1, min(100, int(at_least_s / max(first, 1e-7))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def cold(fn: Callable[[], object], flush: torch.Tensor) -> float:
    """Seconds of a call of `fn` on a CPU with its operands out of the cores' own caches, as a
    step's operator finds them (its inputs were made operators ago; replayed back to back, a
    small operator's would sit in the core's cache): the median of up to five calls, each timed
    alone after `flush`, larger than those caches, was read. (bert-tiny at batch 32: a step
    predicted at 0.82-0.92 of the measured one timed warm, 0.91-1.07 timed cold.) A call that takes
    longer varies less and is timed fewer times."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(5 if first < 5e-3 else 3 if first < 50e-3 else 1):  # a long call varies little
        flush.sum()  # read, not written: nothing dirty left to write back during the call
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _on_cpu(call: Callable[[], object], nbytes: int) -> float:
    """Seconds of a CPU operator as a step finds its operands: out of the core's own caches when
    they are larger than its L2 (made operators ago, evicted since), partly in it when smaller (the
    operators just before it made them): warm and cold times weighed by the share of the L2 they
    fill. (bert-tiny, LoRA r=8, micro-batches of 1 sample: its step predicted at 2.0x the measured
    one with every operator timed cold, 0.89x with those under half the L2 timed warm, 1.00x so.)"""
    share = min(nbytes / _cache_bytes(), 1.0)
    if share >= 1.0:
        return cold(call, _flush())
    return (1 - share) * timed(call, torch.device("cpu")) + share * cold(call, _flush())


@functools.cache
def _cache_bytes() -> int:
    """A CPU core's own last cache (L2), as Linux reports it; 2 MiB where it does not."""
    try:
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()
                return int(size.rstrip("K")) * 2**10 if size.endswith("K") else int(size)
    except (OSError, ValueError):
        pass
    return 2 * 2**20


@functools.cache
def _flush() -> torch.Tensor:
    """A buffer larger than a CPU core's own caches (L1, L2: 2 MiB a core on this machine's Xeon;
    up to 4 MiB on others), made once a process."""
    return torch.ones(FLUSH_BYTES // 4)


def _operator(name: str):
    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


def _real(x, device: torch.device):
    if isinstance(x, Meta):
        return x.make(device)
    if isinstance(x, tuple):
        return [_real(v, device) for v in x]
    return x


def _shrunk(op: Op, limit: float, bytes_limit: float) -> tuple[tuple, dict, float]:
    """(args, kwargs, what the operator's time is divided by): a 2-D or batched product with its
    largest side halved, a product of batched operands (attention, a convolution) with its batch
    halved, until it is at most `limit` FLOPs; an update of lists of tensors (a fused or foreach
    optimizer step) on its first tensors only, as many as make `bytes_limit`; anything else as it
    was."""
    args, kwargs = op.signature
    args, scale = list(args), 1.0
    tensors = [i for i, a in enumerate(args) if isinstance(a, Meta)]
    packet = op.name.split(".")[1]
    lists = [i for i, a in enumerate(args) if isinstance(a, tuple) and a and isinstance(a[0], Meta)]
    if lists and op.bytes > bytes_limit:
        sizes = [sum(args[i][j].nbytes for i in lists) for j in range(len(args[lists[0]]))]
        kept, total = 0, 0
        while kept < len(sizes) and total < bytes_limit:
            total, kept = total + sizes[kept], kept + 1
        for i in lists:
            args[i] = args[i][:kept]
        return tuple(args), dict(kwargs), sum(sizes) / max(total, 1)
    while op.flops / scale > limit:
        if packet in ("mm", "addmm", "bmm", "baddbmm"):
            i, j = tensors[-2:]  # the two operands: (..., M, K) @ (..., K, N)
            a, b = args[i].shape, args[j].shape
            m, k, n = a[-2], a[-1], b[-1]
            side = max((m, "m"), (k, "k"), (n, "n"))[1]
            if max(m, k, n) < 2:
                break
            args[i] = _resize(args[i], {"m": (-2,), "k": (-1,)}.get(side, ()))
            args[j] = _resize(args[j], {"k": (-2,), "n": (-1,)}.get(side, ()))
            if side == "n" and len(tensors) == 3:  # addmm's bias (N) or baddbmm's input (..., M, N)
                args[tensors[0]] = _resize(args[tensors[0]], (-1,))
            elif side == "m" and len(tensors) == 3 and len(args[tensors[0]].shape) > 1:
                args[tensors[0]] = _resize(args[tensors[0]], (-2,))
        else:
            batch = {args[i].shape[0] for i in tensors if args[i].shape}
            if len(batch) != 1 or batch.pop() < 2:
                break
            for i in tensors:
                args[i] = _resize(args[i], (0,))
        scale *= 2
    return tuple(args), dict(kwargs), scale


def _resize(meta: Meta, dims: tuple[int, ...]) -> Meta:
    """`meta` with each of `dims` halved (rounded up), contiguous."""
    shape = list(meta.shape)
    for d in dims:
        shape[d] = max(1, -(-shape[d] // 2))
    stride, step = [], 1
    for n in reversed(shape):
        stride.insert(0, step)
        step *= max(n, 1)
    return Meta(tuple(shape), tuple(stride), meta.dtype)


def time_op(
    op: Op, device: torch.device, first_touch_bytes_s: float | None = None, dispatch_s: float = 0.0
) -> float | None:
    """Seconds of the kernel of one call of `op` on `device`, on operands of its signature's
    layout: a product timed shrunk (`_shrunk`) and scaled back by its FLOPs, without the first
    touch of the pages of a large output (added for its real size, `steptime`); less the time to
    dispatch a call (`dispatch_s`, which the host's per-operator cost holds). None where it cannot
    be run from its signature."""
    kind = device.type if device.type in SHRINK_FLOPS else "cuda"
    args, kwargs, scale = _shrunk(op, SHRINK_FLOPS[kind], SHRINK_BYTES[kind])
    try:
        real = [_real(a, device) for a in args]
        named = {k: device if k == "device" else _real(v, device) for k, v in kwargs.items()}
        fn = _operator(op.name)
        with torch.no_grad():
            call = lambda: fn(*real, **named)
            seconds = timed(call, device) if device.type != "cpu" else _on_cpu(call, op.bytes)
            made = [t.nbytes for t in tree_leaves(fn(*real, **named)) if isinstance(t, torch.Tensor)]
    except Exception:  # noqa: BLE001 (an operator that will not run from random operands: not timed)
        return None
    if first_touch_bytes_s:
        seconds -= sum(b for b in made if b >= FRESH_MIN_BYTES) / first_touch_bytes_s
    return max(seconds - dispatch_s, 0.0) * scale


def _bandwidth(device: torch.device) -> tuple[float, float]:
    """(out of place, in place) bytes read and written per second by an elementwise add."""
    n = BANDWIDTH_BYTES.get(device.type, BANDWIDTH_BYTES["cuda"]) // 4
    a, b, c = (torch.ones(n, device=device) for _ in range(3))  # values do not change an add's speed
    moved = 3 * 4 * n  # two operands read, one written
    out = moved / timed(lambda: torch.add(a, b, out=c), device)
    inplace = moved / timed(lambda: a.add_(b), device)
    return out, inplace


def _first_touch(device: torch.device) -> float | None:
    """Bytes per second the host maps and zeroes for a fresh large allocation (None on a GPU: its
    allocator reuses its blocks)."""
    if device.type != "cpu":
        return None
    n = FRESH_BYTES // 4
    held = torch.empty(n)
    reused = timed(lambda: held.fill_(1.0), device)
    fresh = timed(lambda: torch.empty(n).fill_(1.0), device)
    return FRESH_BYTES / max(fresh - reused, 1e-6)


def _random(device: torch.device) -> float:
    t = torch.empty(RANDOM_ELEMENTS, device=device)
    return RANDOM_ELEMENTS / timed(lambda: t.bernoulli_(0.9), device)


def _small(blocks: int = 8) -> nn.Module:
    """A model whose kernels are too small to matter: its step is the host's time per operator."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(16, 4))


def host(device: torch.device, optimizer: str) -> tuple[dict[str, float], float]:
    """({phase: host seconds per operator; the optimizer's: per step}, host seconds per trained
    tensor in the optimizer's step), from small models' steps on `device` (operators counted on
    fake tensors, as a cell's are): the forward's and backward's time per operator, and the
    optimizer's fixed time and time per tensor from two models of 4 and 34 tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..workload.optimizers import OPTIMIZERS

    spec = OPTIMIZERS[optimizer if not OPTIMIZERS[optimizer].bitsandbytes else "adam"]
    loss_of = nn.CrossEntropyLoss()

    def parts(model, x, y, opt, log=None):
        """Seconds of the forward, the backward and the optimizer's step, read on the host only (a
        GPU's queue is drained after, so what is timed is what the host spends)."""
        times = []
        t0 = time.perf_counter()
        for phase in PHASES:
            if log is not None:
                log.phase = phase
            if phase == "forward":
                loss = loss_of(model(x), y)
            elif phase == "backward":
                loss.backward()
            elif opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
        return times

    def step(blocks: int) -> tuple[list[float], dict[str, float], int]:
        """(seconds of each phase, operators of each phase, tensors) of a small model's step."""
        torch.manual_seed(0)
        with FakeTensorMode(allow_non_fake_inputs=True):  # the forward's and backward's operators
            model = _small(blocks)
            x, y = torch.randn(4, 16), torch.randint(0, 4, (4,))
            log = OpLog()
            with log:
                parts(model, x, y, None, log)
        counts = dict.fromkeys(PHASES, 0)
        for op, n in log.ops.items():
            counts[op.phase] += n
        model = _small(blocks).to(device)
        opt, _ = spec.build(list(model.parameters()), 1e-3)
        x, y = torch.randn(4, 16, device=device), torch.randint(0, 4, (4,), device=device)
        sync = _sync(device)
        for _ in range(3):
            parts(model, x, y, opt)
        sync()
        runs = []
        for _ in range(15):
            runs.append(parts(model, x, y, opt))
            sync()
        return (
            [statistics.median(r[i] for r in runs) for i in range(3)],
            counts,
            len(list(model.parameters())),
        )

    (fwd, bwd, big), counts, many = step(8)
    (_, _, small), _, few = step(1)
    per_tensor = max(big - small, 0.0) / (many - few)
    per_op = {
        "forward": fwd / counts["forward"],
        "backward": bwd / counts["backward"],
        # the optimizer's host time: a fixed part a step and a part a tensor, not by its few (fused) operators
        "optimizer": 0.0,
        "optimizer_step": max(small - per_tensor * few, 0.0),
    }
    return per_op, per_tensor


def measure(
    device: torch.device,
    ops: Iterable[Op] = (),
    dtypes: Iterable[str] = ("float32",),
    optimizer: str | Iterable[str] = "adam",
    name: str | None = None,
    source: str = "measured in this process",
) -> Rates:
    """Every rate of `device`, the kernels of `ops` timed on their operands' layouts."""
    from .environment import cpu_model

    kernels = {key(op): op for op in ops if op.kind != "dispatch"}
    first_touch = _first_touch(device)
    one = torch.ones(1, device=device)
    add = _operator("aten.add.Tensor")
    dispatch = timed(lambda: add(one, one), device)  # what the host's per-operator cost already holds
    timed_s = {}
    for k, op in kernels.items():
        seconds = time_op(op, device, first_touch, dispatch)
        if seconds is not None:
            timed_s[k] = seconds
    best: dict[str, float] = {}
    for k, op in kernels.items():
        if k in timed_s and op.kind == "matmul" and op.flops > 0 and timed_s[k] > 0:
            dtype = dtype_of(op)
            best[dtype] = max(best.get(dtype, 0.0), op.flops / timed_s[k])
    for dtype in dtypes:
        if dtype not in best:  # no product of this dtype was timed: a square one stands in
            n = 1024 if device.type == "cpu" else 4096
            dt = getattr(torch, dtype)
            a, b = torch.rand(n, n, device=device, dtype=dt), torch.rand(n, n, device=device, dtype=dt)
            best[dtype] = 2 * n**3 / timed(lambda: a @ b, device)
    out, inplace = _bandwidth(device)
    per_op, per_tensor, updates = hosts(device, optimizer)
    if name is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return Rates(
        device=name,
        source=source,
        matmul_flops=best,
        bandwidth_bytes_s=out,
        in_place_bytes_s=inplace,
        random_per_s=_random(device),
        first_touch_bytes_s=first_touch,
        op_s=per_op,
        tensor_s=per_tensor,
        asynchronous=device.type != "cpu",
        timed_s=timed_s,
        optimizer_s=updates,
    )


def hosts(
    device: torch.device, optimizers: str | Iterable[str]
) -> tuple[dict[str, float], float, dict[str, tuple[float, float]]]:
    """`host` for each optimizer: the first's per-operator and per-tensor seconds, and every one's
    (fixed, per tensor) seconds of its step (Adafactor's loop over its tensors is not Adam's fused
    update)."""
    names = [optimizers] if isinstance(optimizers, str) else list(dict.fromkeys(optimizers))
    per_op, per_tensor = host(device, names[0])
    updates = {names[0]: (per_op["optimizer_step"], per_tensor)}
    for name in names[1:]:
        other, tensor = host(device, name)
        updates[name] = (other["optimizer_step"], tensor)
    return per_op, per_tensor, updates


def dtype_of(op: Op) -> str:
    """The dtype name of a product's first tensor operand (float32 for one logged without its
    arguments)."""
    args, _ = op.signature or ((), {})
    for a in args:
        if isinstance(a, Meta):
            return str(a.dtype).removeprefix("torch.")
    return "float32"

"""How long a training step takes, predicted from its simulated operators and a device's rates.

    lorabench run --dry-run --models medium-llama --methods full,lora --ranks 16   # predicted step, epoch, cell

Each operator of the simulated step (`operators`) costs the device:

- a product: its time on its own shapes where it was timed (`rates.time_product`), else its FLOPs
  at the dtype's rate or its bytes at the bandwidth, whichever is longer;
- any other operator that moves data: its bytes read and written at the bandwidth (in place or out
  of place), plus, for random draws, the elements drawn at the device's rate of drawing;
- on a CPU, each fresh allocation of `rates.FRESH_MIN_BYTES` or more: its pages mapped and zeroed
  (`first_touch_bytes_s`).

and the host: each operator's time to dispatch (its phase's `op_s`, Python and autograd included),
and the optimizer's time per trained tensor. On a CPU the host runs the kernels: the step is the
sum. A GPU runs behind its host: the step is the longer of the two (a step launch-bound on the
host hides its kernels, and the other way round).

What it does not see: the data loader's index gather (a few small copies), a distributed step's
communication, the caches a real step leaves warm or cold for the next operator, and a GPU's
kernels that differ from the CPU's the step was simulated with (attention excepted: `simulation.
GpuAttention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .operators import Op
from .rates import FRESH_MIN_BYTES, Rates, dtype_of, key

# Operators that draw random numbers: their cost is in the drawing, not the bytes.
RANDOM = {"bernoulli", "bernoulli_", "native_dropout", "uniform_", "normal_", "rand_like", "randn_like"}
PARTS = ("products", "memory", "random", "first_touch", "host")


@dataclass(frozen=True)
class SimulatedStep:
    """What the model needs of a cell's simulated step (`simulation.Simulated`): what a cell's
    process is given to predict its step from."""

    ops: tuple[tuple[Op, float], ...]  # each distinct operator and how many times it runs a step
    trained_tensors: int


@dataclass(frozen=True)
class StepTime:
    """A step's predicted seconds and what they are made of."""

    seconds: float
    parts: dict[str, float]  # seconds of each of PARTS (device parts and the host's)
    forward_s: float  # of the forward alone, every micro-batch's (what an evaluation runs)
    rates: str  # the device and where its rates come from

    def said(self) -> str:
        """The parts, for a row's note: products 760.1 ms, memory 170.3 ms, ...; rates: ..."""
        shown = ", ".join(f"{p} {self.parts[p] * 1e3:,.1f} ms" for p in PARTS if self.parts.get(p))
        return f"{shown}; rates: {self.rates}"


def predict(
    ops: Iterable[tuple[Op, float]], rates: Rates, trained_tensors: int, optimizer: str | None = None
) -> StepTime:
    """The step of `ops` (each with how many times it runs a step) on the device of `rates`, its
    update made by `optimizer` (its host time: `Rates.update_s`)."""
    parts = dict.fromkeys(PARTS, 0.0)
    forward = {"device": 0.0, "host": 0.0}
    for op, n in ops:
        host = n * rates.op_s.get(op.phase, 0.0)
        device = {part: n * seconds for part, seconds in _seconds(op, rates).items()}
        parts["host"] += host
        parts["products" if op.kind == "matmul" else "memory"] += device.pop("kernel", 0.0)
        for part, seconds in device.items():
            parts[part] += seconds
        if op.phase == "forward":
            forward["host"] += host
            forward["device"] += n * sum(_seconds(op, rates).values())
    fixed, per_tensor = rates.update_s(optimizer)
    parts["host"] += fixed + trained_tensors * per_tensor
    return StepTime(
        _overlapped(sum(v for k, v in parts.items() if k != "host"), parts["host"], rates),
        parts,
        _overlapped(forward["device"], forward["host"], rates),
        f"{rates.device}, {rates.source}",
    )


def _overlapped(device: float, host: float, rates: Rates) -> float:
    """A CPU runs the host's work and the kernels one after the other; a GPU's kernels run behind
    the host, so the longer of the two is the time."""
    return max(device, host) if rates.asynchronous else device + host


def _seconds(op: Op, rates: Rates) -> dict[str, float]:
    """The device's seconds of one call of `op`, by part: its kernel, random draws, first touch."""
    if op.kind == "dispatch":
        return {}
    out = {}
    timed = rates.timed_s.get(key(op))
    if timed is not None:
        out["kernel"] = timed
    elif op.kind == "matmul":
        out["kernel"] = _product(op, rates)
    else:
        out["kernel"] = op.bytes / (rates.in_place_bytes_s if op.in_place else rates.bandwidth_bytes_s)
        if op.name.split(".")[1] in RANDOM:
            out["random"] = op.elements / rates.random_per_s
    if rates.first_touch_bytes_s:
        out["first_touch"] = sum(b for b in op.fresh if b >= FRESH_MIN_BYTES) / rates.first_touch_bytes_s
    return out


def _product(op: Op, rates: Rates) -> float:
    """A product's seconds where it was not timed: its FLOPs at its dtype's rate, or its bytes at
    the bandwidth, whichever is longer."""
    rate = rates.matmul_flops.get(dtype_of(op)) or max(rates.matmul_flops.values())
    return max(op.flops / rate, op.bytes / rates.bandwidth_bytes_s)

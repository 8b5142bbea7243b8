"""The checks every device runs, the CPU's own (`lorabench check` runs them first): the host-memory
sampler against the kernel's high-water mark, host RSS with the freed heap handed back against a
known allocation, the clock against a sleep, FlopCounterMode and the saved-tensor hooks against
closed forms, the matmul ceiling against a timed step, and the step-time model against a timed
step; and what every check is (`Check`) and the MLP they train (`gpucheck` builds on them)."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .workload.methods import BASELINE

MiB = 2**20
MIN_MFU_PCT = 0.5  # the MLP's step at 64 rows is large GEMMs: even launch-bound on a GPU it does more


@dataclass(frozen=True)
class Check:
    name: str
    measured: str
    expected: str
    ok: bool


def mlp(method: str, device: torch.device):
    """(task, module): the CIFAR MLP adapted by `method` (rank 4), built on `device` (meta: shapes only)."""
    from .workload import models
    from .workload.methods import METHODS, Adapter

    with torch.device(device):
        bundle = models.build("cifar-mlp")
        adapted = METHODS[method].apply(
            bundle, Adapter(rank=4 if METHODS[method].adapts else None, model="cifar-mlp")
        )
    return bundle.task, adapted.module


def images(rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of the MLP's shape: `rows` CIFAR-sized images and their labels."""
    return {
        "x": torch.randn(rows, 3, 32, 32, device=device),
        "labels": torch.zeros(rows, dtype=torch.long, device=device),
    }


def host_rss() -> Check:
    """A buffer of at least 512 MiB, every page touched and large enough to set this process's new
    high-water mark: the sampler's peak above its baseline must see it, and the kernel's mark
    (getrusage) must agree with the sampled peak. (A buffer below an older mark would leave getrusage
    nothing to say about it.)"""
    import psutil

    from .measure.trackers import HostMemory

    mark_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    above_mark = mark_before - psutil.Process().memory_info().rss + 64 * MiB
    size = max(512 * MiB, -(-above_mark // MiB) * MiB)
    with HostMemory(0.005) as t:
        buf = torch.ones(size // 4, dtype=torch.float32)  # ones: every page written, so resident
        time.sleep(0.05)  # at least one sample while it lives
        del buf
    r = t.result()
    rise, peak = r["host_peak_above_baseline_bytes"], r["host_peak_rss_bytes"]
    mark = r["host_maxrss_bytes"]  # getrusage's high-water mark, which the tracker's result reads
    ok = abs(rise - size) <= 0.1 * size and peak > mark_before and abs(mark - peak) <= 0.05 * peak
    return Check(
        f"host RSS sampler: {size / MiB:,.0f} MiB buffer",
        f"+{rise / MiB:,.0f} MiB; peak {peak / MiB:,.0f} "
        f"MiB vs getrusage {mark / MiB:,.0f} MiB (before: {mark_before / MiB:,.0f} MiB)",
        f"+{size / MiB:,.0f} MiB within 10 %; a new mark, = getrusage within 5 %",
        ok,
    )


CHUNK_BYTES = 64 * 1024  # below glibc's mmap threshold (128 KiB at start, 32 MiB at most): on the heap
SEARCH_CHUNKS = 16384  # 1 GiB of untouched address space at most, to pass the holes earlier frees left


@dataclass
class FreedHeap:
    """Chunks freed next to each other below a live one (`keep`), and what RSS did about them."""

    keep: torch.Tensor
    written_bytes: int  # the RSS rise as the chunks were written (less the pages their headers sat on)
    kept_bytes: int  # what RSS still held of them once they were freed


def freed_below_a_live_one(mib: int) -> FreedHeap:
    """Write `mib` MiB of 64 KiB tensors that lie next to each other on the C library's heap, then
    free them below one kept live: glibc keeps such chunks resident, as one free block a later
    allocation is carved from, since the heap's top above them is not free.

    Earlier frees leave holes that 64 KiB allocations fill first, wherever they are, and a chunk in a
    hole could sit above the one kept, or beside a hole never written: the chunks are allocated
    untouched (no RSS) until the last `mib` MiB + 1 lie each one chunk above the one before (plus
    the few hundred bytes of the tensors' own objects between them), and only those are written, on
    pages handed back to the kernel first."""
    from .measure import heap
    from .measure.trackers import SelfRss

    heap.hand_back()  # pages earlier frees left resident: chunks on them would be written without a rise
    n = mib * MiB // CHUNK_BYTES + 1
    slots: list[torch.Tensor | None] = [None] * SEARCH_CHUNKS  # a list that grew would land between them
    run, last, i = 0, 0, 0
    while run < n and i < SEARCH_CHUNKS:
        slots[i] = torch.empty(CHUNK_BYTES // 4)
        gap = slots[i].data_ptr() - last
        run = run + 1 if CHUNK_BYTES <= gap <= CHUNK_BYTES + 4096 else 1
        last, i = slots[i].data_ptr(), i + 1
    chunks = slots[i - n : i]  # the last n whether or not a run was found: the rise is measured either way
    del slots
    heap.hand_back()  # the pages the other chunks' headers were written on
    rss = SelfRss()
    try:
        start = rss()
        for c in chunks:
            c.fill_(1.0)
        written = rss() - start
        keep = chunks.pop()
        del chunks
        torch.zeros(1)  # one more operator: inside `measure.heap.ReturnedHeap`, the trim after it
        return FreedHeap(keep, written, rss() - start)
    finally:
        rss.close()


def returned_heap() -> Check:
    """Host RSS with the freed heap handed back (`measure.heap`, a cell's `host_rss_step_peak_bytes`):
    after 96 MiB of 64 KiB tensors are freed below a live one (heap glibc keeps resident), a block
    that holds 64 MiB at once must rise by those 64 MiB, though glibc may carve them from the kept
    heap, where RSS alone would not rise."""
    from .measure import heap
    from .measure.trackers import Unavailable

    freed = freed_below_a_live_one(96)
    returned = heap.ReturnedHeap()
    with returned:
        x = torch.ones(32 * MiB // 4)
        y = x * 2  # 64 MiB held at once
        del x, y
    del freed.keep
    rise = returned.rise_bytes
    return Check(
        "host RSS, freed heap handed back: 64 MiB held after 96 MiB freed",
        (rise.reason if isinstance(rise, Unavailable) else f"+{rise / MiB:,.1f} MiB")
        + f" (the 96 MiB freed before: +{freed.written_bytes / MiB:,.1f} MiB as written,"
        f" +{freed.kept_bytes / MiB:,.1f} MiB once freed)",
        "+64 MiB within 10 %",
        not isinstance(rise, Unavailable) and abs(rise - 64 * MiB) <= 0.1 * 64 * MiB,
    )


def clock() -> Check:
    t0 = time.perf_counter()
    time.sleep(0.2)
    took = time.perf_counter() - t0
    return Check("clock: 200 ms sleep", f"{took * 1e3:.1f} ms", "200 to 220 ms", 0.2 <= took <= 0.22)


def flops_closed_form() -> Check:
    """FlopCounterMode on the meta device against the closed form, for the methods it covers."""
    from .measure import flops
    from .workload.methods import METHODS

    out = []
    for method in (name for name, m in METHODS.items() if m.closed_form):
        task, module = mlp(method, torch.device("meta"))
        counted = flops.count(
            module, task, batch_size=16, grad_accum=1, seq_len=1, vocab_size=None, num_labels=10
        )
        out.append((method, counted.total, flops.closed_form(module, 16).total))
    ok = all(c == e for _, c, e in out)
    return Check(
        "FLOPs: FlopCounterMode vs closed form (MLP, batch 16)",
        ", ".join(f"{m} {c / 1e9:.3f}" for m, c, _ in out) + " GFLOP",
        ", ".join(f"{m} {e / 1e9:.3f}" for m, _, e in out) + " GFLOP",
        ok,
    )


def saved_tensors() -> Check:
    """The saved-tensor hooks against the closed form: each layer's output per sample, fp32."""
    from .measure.trackers import SavedTensors

    task, module = mlp(BASELINE, torch.device("cpu"))
    batch = images(8, torch.device("cpu"))
    exclude = {
        t.untyped_storage().data_ptr() for t in (*module.parameters(), *batch.values())
    }  # not activations
    with SavedTensors(exclude) as saved:
        task.loss(module, batch)
    measured = saved.result()["activations_saved_bytes"]
    expected = 8 * (4096 + 2048 + 10) * 4 + 4  # + nll_loss's fp32 total weight
    return Check(
        "saved activations: MLP forward, batch 8", f"{measured:,} B", f"{expected:,} B", measured == expected
    )


def matmul_ceiling(device: torch.device) -> Check:
    """The ceiling MFU is measured against, on the MLP's GEMMs, against a timed training step of
    the MLP: the step's counted FLOPs per second must not exceed it."""
    from .measure import flops
    from .measure.flops import measure_matmul_flops

    task, module = mlp(BASELINE, device)
    rows = 64
    ceiling = measure_matmul_flops(device, torch.float32, flops.gemm_shapes(module, rows))["matmul_flops"]
    per_step = flops.closed_form(module, rows).total  # shapes only; equal to the counter (the check above)
    batch = images(rows, device)
    step = timed(lambda: task.loss(module, batch)[0].backward(), device, repeats=10)
    achieved = per_step / step
    # Both ways: above 100 % the ceiling is too low; near zero it is too high (a clock read before
    # the device finished makes a rate look unbounded), and every MFU measured against it shrinks.
    mfu = 100 * achieved / ceiling
    return Check(
        "matmul ceiling vs a timed MLP training step",
        f"step {achieved / 1e9:,.1f} GFLOP/s; ceiling {ceiling / 1e9:,.1f} GFLOP/s (MFU {mfu:.1f} %)",
        f"{MIN_MFU_PCT} % < MFU <= 100 %",
        MIN_MFU_PCT < mfu <= 100,
    )


STEP_TIME_WITHIN = 0.25  # predicted / measured step of the MLP: the zoo's and quick cells' hold 15 %


def step_time(device: torch.device) -> Check:
    """The step-time model (docs/time.md) on the MLP at batch 64 with Adam: its simulated step's
    operators, the rates measured here, against its timed step. The rates are recorded under the
    device's name (`calibration`): a later dry run for this device (`--target`) reads them."""
    from .measure import calibration, rates, simulation, steptime
    from .workload.optimizers import make

    rows = 64
    task, _ = mlp(BASELINE, torch.device("meta"))

    def build():
        return mlp(BASELINE, torch.device("meta"))[1]

    simulated = simulation.simulate(
        build,
        task,
        lambda: images(2 * rows, torch.device("cpu")),
        batch_size=rows,
        grad_accum=1,
        optimizer="adam",
        lr=1e-3,
        gpu=device.type == "cuda",
    )
    if not isinstance(simulated, simulation.Simulated):
        return Check("step time: predicted vs a timed MLP step", simulated.reason, "a simulated step", False)
    found = rates.measure(
        device, [op for op, _ in simulated.ops], ["float32"], "adam", source="lorabench check"
    )
    predicted = steptime.predict(simulated.ops, found, simulated.trained_tensors)
    _, module = mlp(BASELINE, device)
    optimizer, _ = make("adam", [p for p in module.parameters() if p.requires_grad], 1e-3)
    batch = images(rows, device)

    def step():
        task.loss(module, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measured = timed(step, device, repeats=10)
    if device.type == "cuda":
        calibration.record_rates(torch.cuda.get_device_name(device), found.to_dict(), torch.__version__)
    ratio = predicted.seconds / measured
    return Check(
        "step time: predicted vs a timed MLP step (batch 64, Adam)",
        f"predicted {predicted.seconds * 1e3:,.2f} ms, measured {measured * 1e3:,.2f} ms ({ratio:.2f}x)",
        f"within {STEP_TIME_WITHIN:.0%}",
        abs(ratio - 1) <= STEP_TIME_WITHIN,
    )


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` after two warm-up calls, the device synchronised around each."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 2):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]

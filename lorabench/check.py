"""`lorabench check`: prove the measurement stack on this machine, against figures known in advance.

    lorabench check                 # on a new machine, before trusting any figure it prints

Each check measures something whose answer is known (a buffer of a known size, a sleep of a
known length, a model whose FLOPs and saved activations have a closed form) with the very
trackers, clocks and counters a cell uses, and says whether the reading agrees. On the CPU: the
host-memory sampler against the kernel's own high-water mark, host RSS with the freed heap handed
back against a known allocation, the clock against a sleep,
FlopCounterMode and the saved-tensor hooks against closed forms, and the matmul ceiling against
a timed training step (model FLOPs utilisation can only be trusted if it cannot pass 100 %). On a
GPU, in addition: the allocator against the driver's view of a known allocation, CUDA events
against the synchronised wall clock, the memory sampler's cost on a step, every visible device's
UUID / PCI mapping to the driver, and the energy counter advancing.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .workload.methods import BASELINE

MiB = 2**20
MIN_MFU_PCT = 0.5  # the MLP's step at 64 rows is large GEMMs: even launch-bound on a GPU it does more
WATTS = (5.0, 2000.0)  # a device doing matmuls for a second: above idle noise, below any card's power limit


@dataclass(frozen=True)
class Check:
    name: str
    measured: str
    expected: str
    ok: bool


def _mlp(method: str, device: torch.device):
    """(task, module): the CIFAR MLP adapted by `method` (rank 4), built on `device` (meta: shapes only)."""
    from .workload import models
    from .workload.methods import METHODS, Adapter

    with torch.device(device):
        bundle = models.build("cifar-mlp")
        adapted = METHODS[method].apply(
            bundle, Adapter(rank=4 if METHODS[method].adapts else None, model="cifar-mlp")
        )
    return bundle.task, adapted.module


def _images(rows: int, device: torch.device) -> dict[str, torch.Tensor]:
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
        task, module = _mlp(method, torch.device("meta"))
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

    task, module = _mlp(BASELINE, torch.device("cpu"))
    batch = _images(8, torch.device("cpu"))
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

    task, module = _mlp(BASELINE, device)
    rows = 64
    ceiling = measure_matmul_flops(device, torch.float32, flops.gemm_shapes(module, rows))["matmul_flops"]
    per_step = flops.closed_form(module, rows).total  # shapes only; equal to the counter (the check above)
    batch = _images(rows, device)
    step = _timed(lambda: task.loss(module, batch)[0].backward(), device, repeats=10)
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


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
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


# ---- on a GPU ---------------------------------------------------------------------------------


def allocator_vs_driver(device: torch.device) -> Check:
    """1 GiB allocated: the allocator must count it, and the driver's view of this process must sit
    between the allocator's reserved bytes and those plus the CUDA context (read before). When it
    does, the context is recorded for fit checks (`measure.contexts`)."""
    from .measure.drivers import driver_trackers

    trackers, _, _, missing = driver_trackers(device, 0.005)
    if not trackers:
        return Check(
            "allocator vs driver: 1 GiB",
            f"driver view unavailable: {next(iter(missing.values())).reason}",
            "a driver reading",
            False,
        )
    torch.empty(1, device=device)  # the context exists before the driver is read
    torch.cuda.synchronize(device)
    sampler = trackers[0]
    with sampler:
        time.sleep(0.05)
    before = sampler.process_peak
    context = before - torch.cuda.memory_reserved(device)
    allocated0 = torch.cuda.memory_allocated(device)
    with sampler:
        buf = torch.ones(2**28, device=device)  # 1 GiB, written
        torch.cuda.synchronize(device)
        time.sleep(0.05)
        allocated = torch.cuda.memory_allocated(device) - allocated0
        reserved = torch.cuda.memory_reserved(device)
        del buf
    driver = sampler.process_peak
    ok = allocated == 2**30 and reserved <= driver <= reserved + context + 64 * MiB
    if ok and context > 0:  # what a fit check adds to a GPU cell's predicted peak (`contexts`)
        from .measure import contexts

        runtime = "HIP" if torch.version.hip else "CUDA"
        contexts.record(
            torch.cuda.get_device_name(device), "cuda", context, f"{torch.__version__} ({runtime})"
        )
    return Check(
        "allocator vs driver: 1 GiB",
        f"allocated +{allocated / MiB:,.0f} MiB; reserved {reserved / MiB:,.0f} "
        f"<= driver {driver / MiB:,.0f} MiB (context {context / MiB:,.0f} MiB)",
        "+1,024 MiB; reserved <= driver <= reserved + context",
        ok,
    )


def events_vs_wall(device: torch.device) -> Check:
    a = torch.randn(4096, 4096, device=device)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(50):
        a @ a
    end.record()
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    events = start.elapsed_time(end) / 1e3
    ok = events <= wall and wall - events <= 0.05 * wall + 1e-3
    return Check(
        "CUDA events vs synchronised wall clock: 50 matmuls",
        f"events {events * 1e3:.2f} ms, wall {wall * 1e3:.2f} ms",
        "events <= wall, within 5 % + 1 ms",
        ok,
    )


def sampler_overhead(device: torch.device) -> Check:
    from .measure.drivers import driver_trackers

    task, module = _mlp(BASELINE, device)
    batch = _images(64, device)
    step = lambda: task.loss(module, batch)[0].backward()
    bare = _timed(step, device, repeats=20)
    trackers, _, _, _ = driver_trackers(device, 0.01)
    if not trackers:
        return Check("memory sampler's cost on a step", "no driver sampler", "a driver sampler", False)
    with trackers[0]:
        sampled = _timed(step, device, repeats=20)
    cost = (sampled - bare) / bare * 100
    return Check(
        "memory sampler's cost on a step (10 ms sampling)",
        f"{cost:+.1f} % ({bare * 1e3:.2f} -> {sampled * 1e3:.2f} ms)",
        "< 5 %",
        cost < 5,
    )


def device_mapping() -> Check:
    """Every visible torch device resolves to a driver handle by UUID / PCI bus id."""
    from .measure.drivers import amdsmi_handle, device_identity, nvml_handle

    found = []
    try:
        if torch.version.hip:
            import amdsmi

            amdsmi.amdsmi_init()
            resolve = lambda i, ident: amdsmi_handle(amdsmi, ident)
        else:
            import pynvml

            pynvml.nvmlInit()
            resolve = lambda i, ident: nvml_handle(pynvml, i, ident)
        for i in range(torch.cuda.device_count()):
            ident = device_identity(i)
            resolve(i, ident)
            found.append(f"cuda:{i} {ident.get('uuid', '?')[:13]} {ident.get('pci_bus_id', '?')}")
    except Exception as e:  # noqa: BLE001 (the verdict carries the driver's error)
        return Check(
            "device mapping (UUID / PCI bus id)", f"{type(e).__name__}: {e}", "every device mapped", False
        )
    return Check(
        "device mapping (UUID / PCI bus id)",
        "; ".join(found),
        f"{torch.cuda.device_count()} devices mapped",
        len(found) == torch.cuda.device_count(),
    )


def energy_counter(device: torch.device) -> Check:
    """About 1 s of matmuls: the counter must advance by a power a working device draws."""
    from .measure.drivers import driver_trackers

    _, energy, _, _ = driver_trackers(device, 0.01)
    a = torch.randn(4096, 4096, device=device)
    energy.begin()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a @ a
        torch.cuda.synchronize(device)
    took = time.perf_counter() - t0
    energy.end()
    r = energy.result()["energy_j_per_epoch"]
    joules = r if isinstance(r, float) else None
    watts = joules / took if joules is not None else None
    return Check(
        "energy counter over 1 s of matmuls",
        f"{joules:,.1f} J in {took:.2f} s ({watts:,.0f} W)" if joules is not None else r.reason,
        f"{WATTS[0]:g} to {WATTS[1]:,.0f} W",
        watts is not None and WATTS[0] <= watts <= WATTS[1],
    )


def run_checks(device: str, progress: Callable[[str], None] = lambda name: None) -> list[Check]:
    """Every check for `device` ("cpu" or "cuda"); a check that raises fails with its error."""
    dev = torch.device(device)
    todo: list[tuple[str, Callable[[], Check]]] = [
        ("host RSS sampler", host_rss),
        ("host RSS, heap handed back", returned_heap),
        ("clock", clock),
        ("FLOPs", flops_closed_form),
        ("saved activations", saved_tensors),
        ("matmul ceiling", lambda: matmul_ceiling(dev)),
    ]
    if dev.type == "cuda":
        todo += [
            ("allocator vs driver", lambda: allocator_vs_driver(dev)),
            ("CUDA events", lambda: events_vs_wall(dev)),
            ("sampler cost", lambda: sampler_overhead(dev)),
            ("device mapping", device_mapping),
            ("energy counter", lambda: energy_counter(dev)),
        ]
    out = []
    for name, fn in todo:
        progress(name)
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 (a check that cannot run is a failed check, said why)
            out.append(
                Check(
                    name,
                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                    "to run",
                    False,
                )
            )
    return out

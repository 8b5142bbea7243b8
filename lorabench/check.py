"""`lorabench check`: prove the measurement stack on this machine, against figures known in advance.

    lorabench check                 # on a new machine, before trusting any figure it prints

Each check measures something whose answer is known (a buffer of a known size, a sleep of a
known length, a model whose FLOPs and saved activations have a closed form) with the very
trackers, clocks and counters a cell uses, and says whether the reading agrees. On the CPU: the
host-memory sampler against the kernel's own high-water mark, host RSS with the freed heap handed
back against a known allocation, the clock against a sleep,
FlopCounterMode and the saved-tensor hooks against closed forms, the matmul ceiling against
a timed training step (model FLOPs utilisation can only be trusted if it cannot pass 100 %), and
the step-time model's prediction against a timed step (on a GPU, its rates are recorded for later
dry runs). On a
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


STEP_TIME_WITHIN = 0.25  # predicted / measured step of the MLP: the zoo's and quick cells' hold 15 %


def step_time(device: torch.device) -> Check:
    """The step-time model (docs/time.md) on the MLP at batch 64 with Adam: its simulated step's
    operators, the rates measured here, against its timed step. The rates are recorded under the
    device's name (`calibration`): a later dry run for this device (`--target`) reads them."""
    from .measure import calibration, rates, simulation, steptime
    from .workload.optimizers import make

    rows = 64
    task, _ = _mlp(BASELINE, torch.device("meta"))

    def build():
        return _mlp(BASELINE, torch.device("meta"))[1]

    simulated = simulation.simulate(
        build,
        task,
        lambda: _images(2 * rows, torch.device("cpu")),
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
    _, module = _mlp(BASELINE, device)
    optimizer, _ = make("adam", [p for p in module.parameters() if p.requires_grad], 1e-3)
    batch = _images(rows, device)

    def step():
        task.loss(module, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measured = _timed(step, device, repeats=10)
    if device.type == "cuda":
        calibration.record_rates(torch.cuda.get_device_name(device), found.to_dict(), torch.__version__)
    ratio = predicted.seconds / measured
    return Check(
        "step time: predicted vs a timed MLP step (batch 64, Adam)",
        f"predicted {predicted.seconds * 1e3:,.2f} ms, measured {measured * 1e3:,.2f} ms ({ratio:.2f}x)",
        f"within {STEP_TIME_WITHIN:.0%}",
        abs(ratio - 1) <= STEP_TIME_WITHIN,
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
    """1 GiB allocated: the allocator must count it, and the driver must see it on top of the
    allocator's reserved bytes: in this process's memory, which must sit between the reserved bytes
    and those plus the runtime context; or, where the driver lists no process of ours (a container
    without the host's PID namespace), in the device's memory in use, which must rise by what the
    allocator reserved. The context (the driver's view less the reserved bytes) is recorded for fit
    checks (`measure.calibration`). Run before anything else creates this process's CUDA context,
    so that the driver's reading before it is others' load."""
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
    idle_sampler = trackers[0]
    with idle_sampler:
        time.sleep(0.05)
    idle, reserved_idle = idle_sampler.result(), torch.cuda.memory_reserved(device)
    allocated0 = torch.cuda.memory_allocated(device)
    (loaded_sampler,), _, _, _ = driver_trackers(device, 0.005)
    with loaded_sampler:
        buf = torch.ones(2**28, device=device)  # 1 GiB, written
        torch.cuda.synchronize(device)
        time.sleep(0.05)
        allocated = torch.cuda.memory_allocated(device) - allocated0
        reserved = torch.cuda.memory_reserved(device)
        del buf
    seen = driver_sees(
        idle_sampler, idle, loaded_sampler.result(), reserved_idle, reserved, idle_sampler.before_is_others
    )
    if seen.ok and isinstance(seen.context, int) and seen.context > 0:
        from .measure import calibration

        runtime = "HIP" if torch.version.hip else "CUDA"
        calibration.record_context(
            torch.cuda.get_device_name(device),
            calibration.CHECK,
            seen.context,
            f"{torch.__version__} ({runtime})",
        )
    return Check(
        "allocator vs driver: 1 GiB",
        f"allocated +{allocated / MiB:,.0f} MiB; {seen.measured}",
        f"+1,024 MiB; {seen.expected}",
        allocated == 2**30 and seen.ok,
    )


DRIVER_SLACK = 64 * MiB  # what the driver may see beyond the allocator's blocks: its own rounding, a stream


@dataclass(frozen=True)
class DriverView:
    ok: bool
    measured: str
    expected: str
    context: int | None  # the runtime context it implies, where it can be read


def driver_sees(sampler, idle: dict, loaded: dict, reserved_idle: int, reserved: int, before_is_others: bool):
    """The judgement of `allocator_vs_driver` on a driver sampler's results, idle (the context made,
    nothing allocated) and loaded (the 1 GiB held): the process view where the driver lists this
    process, else the device's memory in use."""
    process_key, peak_key, before_key = sampler.KEYS
    lib = sampler.LIB
    if isinstance(loaded[process_key], int) and isinstance(idle[process_key], int):
        context = idle[process_key] - reserved_idle
        driver = loaded[process_key]
        return DriverView(
            reserved <= driver <= reserved + context + DRIVER_SLACK,
            f"reserved {reserved / MiB:,.0f} <= {lib} process {driver / MiB:,.0f} MiB "
            f"(context {context / MiB:,.0f} MiB)",
            "reserved <= process <= reserved + context",
            context,
        )
    why = getattr(loaded[process_key], "reason", "no process reading")
    if not (isinstance(loaded[peak_key], int) and isinstance(idle[peak_key], int)):
        failed = next(r for r in (idle[peak_key], loaded[peak_key]) if not isinstance(r, int))
        return DriverView(
            False, f"{lib}: no device reading ({getattr(failed, 'reason', failed)})", "a reading", None
        )
    rise, grew = loaded[peak_key] - idle[peak_key], reserved - reserved_idle
    context = idle[peak_key] - idle[before_key] - reserved_idle if before_is_others else None
    return DriverView(
        grew <= rise <= grew + DRIVER_SLACK,
        f"{lib} device in use +{rise / MiB:,.0f} MiB for reserved +{grew / MiB:,.0f} MiB ({why}; "
        + (
            f"context {context / MiB:,.0f} MiB from the device's use, others assumed steady)"
            if context is not None
            else "no context: the device was read after it existed)"
        ),
        "the device's use rises by what the allocator reserved",
        context,
    )


def energy_update(device: torch.device) -> Check:
    """How often the energy counter moves, read while the device works (it moves in steps: NVML's
    on A100/H100 about every 100 ms); recorded per device name, so an epoch too short for it gets
    no energy figure (`energy.EnergyMeter`)."""
    from .measure import calibration
    from .measure.drivers import driver_trackers
    from .measure.energy import update_period
    from .measure.trackers import Unavailable

    _, energy, _, _ = driver_trackers(device, 0.01)
    a = torch.randn(8192, 8192, device=device)
    one = _timed(lambda: a @ a, device, repeats=3)
    for _ in range(int(1.5 / one) + 1):  # queued, not waited for: the device works while the counter is read
        a @ a
    period = update_period(energy.read, 1.0)
    torch.cuda.synchronize(device)
    if isinstance(period, Unavailable):
        return Check("energy counter's update period", period.reason, "0.1 ms to 1 s", False)
    ok = 1e-4 <= period <= 1.0
    if ok:
        calibration.record_energy_update(torch.cuda.get_device_name(device), period, torch.__version__)
    return Check(
        "energy counter's update period",
        f"{period * 1e3:,.1f} ms (an epoch needs {10 * period:,.2f} s for an energy figure)",
        "0.1 ms to 1 s",
        ok,
    )


def amdsmi_binding() -> Check:
    """Which amdsmi binding was imported, whether its release is the host's ROCm's, and whether it
    can read the devices at all (what a mismatch breaks)."""
    from .measure.drivers import amdsmi_versions, import_amdsmi

    amdsmi = import_amdsmi()
    v = amdsmi_versions(amdsmi)
    try:
        amdsmi.amdsmi_init()
        amdsmi.amdsmi_get_gpu_vram_usage(amdsmi.amdsmi_get_processor_handles()[0])
        works = "reads the device"
    except Exception as e:  # noqa: BLE001 (the verdict carries the binding's error)
        works = f"cannot read the device: {type(e).__name__}: {e}"
    return Check(
        "amdsmi binding vs ROCm",
        f"binding {v['binding_version']} ({v['binding']}); ROCm {v['rocm_version']}, libamd_smi "
        f"{v['library_version']}; match: {v['match']}; {works}",
        "the binding of the host's ROCm release, reading the device",
        v["match"] != "no" and works == "reads the device",
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
        f"{cost:+.1f} % ({bare * 1e3:.2f} -> {sampled * 1e3:.2f} ms; {trackers[0].cadence()})",
        "< 5 %",
        cost < 5,
    )


def device_mapping() -> Check:
    """Every visible torch device resolves to a driver handle by UUID / PCI bus id."""
    from .measure.devices import amdsmi_handle, device_identity, nvml_handle
    from .measure.drivers import import_amdsmi

    found = []
    try:
        if torch.version.hip:
            amdsmi = import_amdsmi()
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
    """At least 1 s of matmuls (longer where the counter moves too seldom for a second: `EnergyMeter`):
    the counter must advance by a power a working device draws."""
    from .measure.drivers import driver_trackers
    from .measure.energy import MIN_PERIODS

    _, energy, _, _ = driver_trackers(device, 0.01)
    seconds = max(1.0, 1.2 * MIN_PERIODS * energy.update_s)
    a = torch.randn(4096, 4096, device=device)
    energy.begin()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        torch.cuda.synchronize(device)
    took = time.perf_counter() - t0
    energy.end()
    r = energy.result()["energy_j_per_epoch"]
    joules = r if isinstance(r, float) else None
    watts = joules / took if joules is not None else None
    return Check(
        f"energy counter over {seconds:g} s of matmuls",
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
    ]
    if dev.type == "cuda":  # the driver check first: no CUDA context of this process exists before it
        todo += [("allocator vs driver", lambda: allocator_vs_driver(dev))]
    todo += [("matmul ceiling", lambda: matmul_ceiling(dev)), ("step time", lambda: step_time(dev))]
    if dev.type == "cuda":
        todo += [
            ("CUDA events", lambda: events_vs_wall(dev)),
            ("sampler cost", lambda: sampler_overhead(dev)),
            ("device mapping", device_mapping),
            ("energy update period", lambda: energy_update(dev)),
            ("energy counter", lambda: energy_counter(dev)),
        ]
        if torch.version.hip:
            todo += [("amdsmi binding", amdsmi_binding)]
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

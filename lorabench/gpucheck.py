"""The checks only a GPU can run (`lorabench check --device cuda`): the allocator against the
driver's view of a known allocation, CUDA events against the synchronised wall clock, the memory
sampler's cost on a step, every visible device's UUID / PCI mapping to the driver, the energy
counter's update period and its advance, and on ROCm which amdsmi binding was found. `check`
runs them after the CPU's own."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .hostcheck import Check, MiB, images, mlp, timed
from .workload.methods import BASELINE

WATTS = (5.0, 2000.0)  # a device doing matmuls for a second: above idle noise, below any card's power limit


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
    one = timed(lambda: a @ a, device, repeats=3)
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

    task, module = mlp(BASELINE, device)
    batch = images(64, device)
    step = lambda: task.loss(module, batch)[0].backward()
    bare = timed(step, device, repeats=20)
    trackers, _, _, _ = driver_trackers(device, 0.01)
    if not trackers:
        return Check("memory sampler's cost on a step", "no driver sampler", "a driver sampler", False)
    with trackers[0]:
        sampled = timed(step, device, repeats=20)
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

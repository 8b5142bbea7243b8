"""Device-level memory and energy: the driver's view (NVML on NVIDIA, amdsmi on AMD).

    lorabench run --device cuda          # every GPU cell samples these beside torch's allocator

The driver sees what torch's allocator cannot: the CUDA/HIP context and other processes on the
device. Each query runs at the cadence its cost allows; the device is torch's, matched by UUID or
PCI address (`devices`); its energy counter is read by `energy`. Samplers share the tracker
interface of `trackers`; what cannot be read is `Unavailable`, with the driver's reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .devices import amdsmi_handle, bare_uuid, device_identity, nvml_devices, nvml_handle
from .energy import EnergyMeter, amdsmi_energy, nvml_energy, unavailable_energy, update_of
from .trackers import ProcessTree, Sampler, Unavailable, unavailable


def nvml_used(nvml, handle) -> tuple[int, str, bool]:
    """(used bytes, what they are, whether the v2 call answered). The v2 struct's `used` leaves
    out the memory the driver reserves for itself (hundreds of MiB on recent cards), so an idle
    GPU reads about zero; v1's `used` includes it, and is only read where the driver has no v2
    call."""
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        reserved_mib = int(info.reserved) / 2**20
        return (
            int(info.used),
            f"NVML memory info v2: used, excluding {reserved_mib:,.0f} MiB driver-reserved",
            True,
        )
    except (AttributeError, TypeError, nvml.NVMLError) as e:  # an old pynvml or driver without the v2 call
        why = type(e).__name__ if not isinstance(e, nvml.NVMLError) else str(e)
        used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        return used, f"NVML memory info v1: used, driver-reserved memory included (no v2: {why})", False


# A driver query may take at most this share of one core: a sampler shares the cores with the
# training it measures (bench/test_sampler_overhead.py gates the whole sampler at 2 % of a step).
DUTY = 0.01


class Cadence:
    """How often one driver query runs: every `floor_s` at most, and no more often than its own cost
    allows (the median of its last calls / DUTY). A device-memory query costs tens of microseconds
    and runs every sample; a process list walks the driver's tables (and on ROCm sysfs and /proc)
    and may cost milliseconds, so it runs less often."""

    KEEP = 5  # calls whose cost is remembered

    def __init__(self, floor_s: float):
        self.floor_s = floor_s
        self.costs: list[float] = []
        self._next = float("-inf")

    @property
    def cost_s(self) -> float | None:
        return sorted(self.costs)[len(self.costs) // 2] if self.costs else None

    @property
    def period_s(self) -> float:
        return max(self.floor_s, (self.cost_s or 0.0) / DUTY)

    def due(self, now: float) -> bool:
        return now >= self._next

    def call(self, fn):
        """fn(), its cost kept and the next call set one period on. The cost is this thread's CPU
        time: a driver call releases the GIL, and the wait to get it back from the training thread
        is not the call's cost (counted in wall time it would slow the device readings needlessly)."""
        t0 = time.thread_time()
        try:
            return fn()
        finally:
            self.costs = (self.costs + [time.thread_time() - t0])[-self.KEEP :]
            self._next = time.perf_counter() + self.period_s


class DriverMemory(Sampler):
    """A driver's view of GPU memory, sampled: the whole device's memory in use (every process) and
    this process tree's, from the driver's process list (runtime context included). NVML and amdsmi
    differ only in their calls and key prefix (`NvmlMemory`, `AmdsmiMemory`).

    `before_bytes` is the device's memory in use before the cell loaded anything: others' load,
    read before this process created its runtime context where the caller could (`before`:
    `before_is_others`), else when the tracker was built. Each query keeps its own `Cadence`."""

    LIB, PREFIX, DEVICE = "", "", ""
    PROCESS_FLOOR_S: float | None = None  # None: the sampler's own interval

    def __init__(self, handle, interval_s: float = 0.01, before: int | None = None):
        super().__init__(interval_s)
        self.handle = handle
        self.memory = Cadence(interval_s)
        self.processes = Cadence(self.PROCESS_FLOOR_S or interval_s)
        self.before_is_others = before is not None
        self.before_bytes = before if before is not None else self.memory.call(self._device_used)
        self.process_peak = self.device_peak = 0
        self.process_seen = False
        self.process_reading_missing = False  # listed, but the driver gave no figure for it
        self.process_error: str | None = None  # the per-process query failed (no permission, an old driver)
        self._pids = ProcessTree().pids

    @property
    def KEYS(self) -> tuple[str, ...]:  # noqa: N802 (the Tracker interface's name)
        return keys(self.PREFIX, self.DEVICE)

    def _device_used(self) -> int:
        raise NotImplementedError

    def _process_bytes(self, pids: set[int]) -> int | None:
        """Bytes of `pids` on the device; None when none of them is listed."""
        raise NotImplementedError

    def _sample(self) -> None:
        now = time.perf_counter()
        if self.edge or self.memory.due(now):
            used = self.memory.call(self._device_used)
            self.device_peak = max(self.device_peak, used)
            self._record(used)
        if self.process_error or not (self.edge or self.processes.due(now)):
            return
        try:
            mine = self.processes.call(lambda: self._process_bytes(self._pids()))
        except self.ERRORS as e:  # the device figure goes on; this one says why it is missing
            self.process_error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            return
        if mine is not None:
            self.process_seen = True
            self.process_peak = max(self.process_peak, mine)

    def result(self) -> dict[str, Any]:
        process_key, peak_key, before_key = self.KEYS
        if self.error:  # a peak of the readings before it failed could miss the real one
            reason = unavailable(f"{self.LIB}: a reading failed after {len(self.series)}: {self.error}")
            return {process_key: reason, peak_key: reason, before_key: self.before_bytes}
        if self.process_error:
            process = unavailable(f"{self.LIB} could not list the device's processes ({self.process_error})")
        elif not self.process_seen:
            process = unavailable(
                f"process not visible to {self.LIB} (a container without the host PID namespace?)"
            )
        elif self.process_reading_missing:
            process = unavailable(f"{self.LIB} reports no per-process memory on this device")
        else:
            process = self.process_peak
        return {process_key: process, peak_key: self.device_peak, before_key: self.before_bytes}

    def cadence(self) -> str:
        """What each query cost and how often it ran, for `lorabench check`."""
        ms = lambda s: f"{s * 1e3:.3f} ms" if s is not None else "never run"
        return (
            f"device memory {ms(self.memory.cost_s)} every {self.memory.period_s * 1e3:.0f} ms; "
            f"process list {ms(self.processes.cost_s)} every {self.processes.period_s * 1e3:.0f} ms"
        )


def keys(prefix: str, device: str) -> tuple[str, str, str]:
    """The figures a driver's memory sampler gives: this process tree's peak, the device's peak in
    use, the device's use before the cell."""
    return f"{prefix}_process_peak_bytes", f"{prefix}_{device}_peak_bytes", f"{prefix}_{device}_before_bytes"


class NvmlMemory(DriverMemory):
    """NVML: `used` from the memory info (v2 where the driver has it, `source` says which) and this
    process tree from the compute-process list."""

    LIB, PREFIX, DEVICE = "NVML", "nvml", "device_used"
    series_name = "nvml_device_used_bytes"  # the driver view of the whole device, every sample

    def __init__(self, nvml, handle, interval_s: float = 0.01, before: int | None = None):
        self.nvml, self.ERRORS = nvml, nvml.NVMLError
        _, self.source, self.v2 = nvml_used(nvml, handle)
        super().__init__(handle, interval_s, before)

    def _device_used(self) -> int:
        if self.v2:
            return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle, version=self.nvml.nvmlMemory_v2).used)
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def _process_bytes(self, pids: set[int]) -> int | None:
        mine = [p for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle) if p.pid in pids]
        if not mine:
            return None
        used = [p.usedGpuMemory for p in mine]
        if any(u is None for u in used):  # NVML_VALUE_NOT_AVAILABLE (e.g. under WDDM or MIG without rights)
            self.process_reading_missing = True
        return sum(u or 0 for u in used)


class AmdsmiMemory(DriverMemory):
    """amdsmi on ROCm: the device's VRAM in use (not its capacity) and this process tree's VRAM from
    the process list, which walks sysfs and /proc and which amdsmi's documentation asks to call at
    most once a second."""

    LIB, PREFIX, DEVICE = "amdsmi", "amdsmi", "device_vram_used"
    PROCESS_FLOOR_S = 1.0
    series_name = "amdsmi_device_vram_used_bytes"
    MB = 2**20  # amdsmi_get_gpu_vram_usage reports MB

    def __init__(self, amdsmi, handle, interval_s: float = 0.01, before: int | None = None):
        self.amdsmi, self.ERRORS = amdsmi, amdsmi.AmdSmiException
        super().__init__(handle, interval_s, before)

    def _device_used(self) -> int:
        return int(self.amdsmi.amdsmi_get_gpu_vram_usage(self.handle)["vram_used"]) * self.MB

    def _process_bytes(self, pids: set[int]) -> int | None:
        """VRAM of `pids`, across amdsmi versions (dicts, or handles to look up)."""
        total, seen = 0, False
        for proc in self.amdsmi.amdsmi_get_gpu_process_list(self.handle):
            info = (
                proc if isinstance(proc, dict) else self.amdsmi.amdsmi_get_gpu_process_info(self.handle, proc)
            )
            if info.get("pid") in pids:
                seen = True
                usage = info.get("memory_usage") or {}
                total += int(usage.get("vram_mem", info.get("mem", 0)) or 0)
        return total if seen else None


def runtime_context(measured: dict[str, Any], before_is_others: bool) -> int | Unavailable:
    """The runtime context a GPU cell had: the driver's view of its process less the allocator's
    reserved peak; where the driver lists no process of ours (a container), the device's peak in
    use less others' load before the cell and the reserved peak (others assumed steady)."""
    reserved = measured.get("torch_peak_reserved_bytes")
    if not isinstance(reserved, int):
        return unavailable("the allocator's reserved peak is missing")
    for prefix, device in (("nvml", "device_used"), ("amdsmi", "device_vram_used")):
        process_key, peak_key, before_key = keys(prefix, device)
        if isinstance(measured.get(process_key), int):
            return measured[process_key] - reserved
        if isinstance(measured.get(peak_key), int) and isinstance(measured.get(before_key), int):
            if not before_is_others:
                return unavailable(
                    "the driver lists no process of ours, and the device's use before the cell was read "
                    "after this process's context existed"
                )
            return measured[peak_key] - measured[before_key] - reserved
    return unavailable("no driver view of the device")


def import_amdsmi():
    """amdsmi, as this process has it: the binding ROCm ships where there is one (lorabench puts it
    first on the path before torch imports amdsmi: `lorabench._prefer_the_amdsmi_rocm_ships`)."""
    import amdsmi

    return amdsmi


def _distribution_of(module, name: str = "amdsmi") -> str | None:
    """The version of the installed distribution `name` the module was imported from, or None (the
    binding ROCm ships has no package metadata)."""
    from importlib import metadata

    where = Path(getattr(module, "__file__", "")).resolve().parent.parent
    for dist in metadata.distributions():
        if (dist.metadata["Name"] or "").lower() == name and Path(dist.locate_file("")).resolve() == where:
            return dist.version
    return None


def amdsmi_versions(amdsmi) -> dict[str, str]:
    """Which amdsmi binding this process imported, its release, the host's ROCm release and its
    library's version, and whether the binding's release is ROCm's (a binding ROCm ships is):
    amdsmi's releases on the registry are numbered as ROCm's (7.0.2 for ROCm 7.0.2), its library
    (`amdsmi_get_lib_version`) has a numbering of its own."""
    where = Path(getattr(amdsmi, "__file__", "?")).parent
    shipped = where.parent.name == "amd_smi" and where.parent.parent.name == "share"
    binding = _distribution_of(amdsmi)
    try:
        found, rocm = amdsmi.amdsmi_get_rocm_version()
        rocm = str(rocm) if found else None
    except Exception:  # noqa: BLE001 (an old binding without the call)
        rocm = None
    try:
        v = amdsmi.amdsmi_get_lib_version()
        library = v.get("build") or f"{v['major']}.{v['minor']}.{v['release']}"
    except Exception as e:  # noqa: BLE001 (an old binding without the call, or a library that fails)
        library = f"unknown ({type(e).__name__}: {e})"
    release = lambda text: ".".join(str(text).split(".")[:2])
    if shipped:
        match = "yes"
    elif binding and rocm:
        match = "yes" if release(binding) == release(rocm) else "no"
    else:
        match = "unknown"
    return {
        "binding": str(where),
        "binding_version": "shipped with ROCm" if shipped else binding or "unknown",
        "rocm_version": rocm or "unknown",
        "library_version": library,
        "match": match,
    }


def _nvml_used_by_uuid(nvml) -> dict[str, int]:
    """Every NVML device's memory in use, by bare UUID: read before this process creates a CUDA
    context (torch's device identity needs one), so the cell's device's reading is others' load."""
    out = {}
    for handle in nvml_devices(nvml):
        try:
            uuid = nvml.nvmlDeviceGetUUID(handle)
            out[bare_uuid(uuid.decode() if isinstance(uuid, bytes) else uuid)] = nvml_used(nvml, handle)[0]
        except nvml.NVMLError:
            continue
    return out


def driver_trackers(device, interval_s: float) -> tuple[list, "EnergyMeter", dict[str, str], dict[str, Any]]:
    """(samplers, energy meter, facts for the row's environment, figures known unavailable already)
    for a GPU cell: NVML on CUDA builds, amdsmi on ROCm builds, each matched to torch's device by
    UUID / PCI bus id. What cannot be had is reported as unavailable, with why."""
    import torch

    if device.type != "cuda":
        return [], unavailable_energy("no energy counter is read on the CPU"), {}, {}
    rocm = bool(torch.version.hip)
    before: dict[str, int] = {}
    fresh = not torch.cuda.is_initialized()  # no context of ours yet: what the driver reads is others'
    if fresh and not rocm:
        try:
            import pynvml

            pynvml.nvmlInit()
            before = _nvml_used_by_uuid(pynvml)
        except Exception:  # noqa: BLE001 (the tracker below says why the library is unavailable)
            before = {}
    ident = device_identity(device.index or 0)
    # which device it was: gpu_uuid, gpu_pci_bus_id (its name is in the environment already)
    facts = {f"gpu_{key}": value for key, value in ident.items() if key != "name"}
    update = update_of(ident.get("name", ""))
    try:
        if rocm:
            amdsmi = import_amdsmi()
            amdsmi.amdsmi_init()
            handle = amdsmi_handle(amdsmi, ident)
            return (
                [AmdsmiMemory(amdsmi, handle, interval_s)],
                amdsmi_energy(amdsmi, handle, **update),
                {**facts, "gpu_driver_view": "amdsmi", "gpu_driver": _amd_driver_version(amdsmi, handle)},
                {},
            )
        import pynvml

        pynvml.nvmlInit()
        handle = nvml_handle(pynvml, device.index or 0, ident)
        sampler = NvmlMemory(pynvml, handle, interval_s, before.get(bare_uuid(ident.get("uuid", ""))))
        return (
            [sampler],
            nvml_energy(pynvml, handle, **update),
            {
                **facts,
                "gpu_driver_view": "NVML",
                "gpu_driver": pynvml.nvmlSystemGetDriverVersion(),
                "gpu_memory_used": sampler.source,
            },
            {},
        )
    except Exception as e:  # ImportError, a driver error, permissions, an unmappable device
        lib = "amdsmi" if rocm else "NVML"
        reason = unavailable(f"{lib}: {type(e).__name__}: {e}")
        missing = keys("amdsmi", "device_vram_used") if rocm else keys("nvml", "device_used")
        return (
            [],
            unavailable_energy(f"{lib} unavailable: {type(e).__name__}: {e}"),
            facts,
            {k: reason for k in missing},
        )


def _amd_driver_version(amdsmi, handle) -> str:
    try:
        return str(amdsmi.amdsmi_get_gpu_driver_info(handle)["driver_version"])
    except Exception as e:  # an older amdsmi without the call, or the query not supported
        return (
            f"unavailable: amdsmi driver info: {type(e).__name__}: {e}"  # an environment fact, not a metric
        )

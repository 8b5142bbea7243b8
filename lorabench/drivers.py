"""Device-level memory and energy: the driver's view (NVML on NVIDIA, amdsmi on AMD).

    lorabench run --device cuda          # every GPU cell samples these beside torch's allocator

The driver sees what torch's allocator cannot: the CUDA/HIP context, other processes on the
device, and the energy counter. Every handle is matched to torch's device by UUID or PCI bus
id, never by index (CUDA orders devices fastest-first, the drivers by bus). Samplers share the
tracker interface of `trackers`; what cannot be read is `Unavailable`, with the driver's reason.
"""
from __future__ import annotations

import os
from typing import Any

from .trackers import ProcessTree, _Sampler, unavailable


def device_identity(index: int = 0) -> dict[str, str]:
    """UUID and PCI bus id of torch's device `index`, in this (cell) process: the keys that map a
    torch device to the driver's, whose order differs (CUDA orders fastest-first, NVML by bus)."""
    import torch
    props = torch.cuda.get_device_properties(index)
    ident: dict[str, str] = {}
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        ident["uuid"] = uuid
    if getattr(props, "pci_bus_id", None) is not None:
        ident["pci_bus_id"] = (f"{getattr(props, 'pci_domain_id', 0):08X}:{props.pci_bus_id:02X}:"
                               f"{getattr(props, 'pci_device_id', 0):02X}.0")
    return ident


def nvml_handle(nvml, index: int = 0, identity: dict[str, str] | None = None):
    """The NVML handle of torch's device `index`, resolved by UUID or PCI bus id, never by torch's
    index. Without an identity (no CUDA in this process), CUDA_VISIBLE_DEVICES is read: UUIDs
    (GPU-..., MIG-...) map exactly, and indices only under CUDA_DEVICE_ORDER=PCI_BUS_ID."""
    if identity:
        uuid = identity.get("uuid", "")
        for candidate in ([uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]):
            if not uuid:
                break
            try:
                return nvml.nvmlDeviceGetHandleByUUID(candidate)
            except nvml.NVMLError:
                pass
        if identity.get("pci_bus_id"):
            return nvml.nvmlDeviceGetHandleByPciBusId(identity["pci_bus_id"])
    ordered = os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if index >= len(entries):
            raise LookupError(f"CUDA_VISIBLE_DEVICES={visible} has no device {index}")
        entry = entries[index]
        if entry.startswith(("GPU-", "MIG-")):
            return nvml.nvmlDeviceGetHandleByUUID(entry)
        if entry.isdigit() and ordered:
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        raise LookupError(f"CUDA_VISIBLE_DEVICES entry {entry!r} is an index in CUDA's fastest-first order, which "
                          "NVML does not share; use GPU UUIDs or set CUDA_DEVICE_ORDER=PCI_BUS_ID")
    if nvml.nvmlDeviceGetCount() == 1 or ordered:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    raise LookupError("several GPUs and no way to tell which one torch uses; set CUDA_DEVICE_ORDER=PCI_BUS_ID")


def nvml_used(nvml, handle) -> tuple[int, str, bool]:
    """(used bytes, what they are, whether the v2 call answered). The v2 struct's `used` leaves
    out the memory the driver reserves for itself (hundreds of MiB on recent cards), so an idle
    GPU reads about zero; v1's `used` includes it, and is only read where the driver has no v2
    call."""
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        reserved_mib = int(info.reserved) / 2 ** 20
        return int(info.used), f"NVML memory info v2: used, excluding {reserved_mib:,.0f} MiB driver-reserved", True
    except (AttributeError, TypeError, nvml.NVMLError) as e:   # an old pynvml or driver without the v2 call
        why = type(e).__name__ if not isinstance(e, nvml.NVMLError) else str(e)
        used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        return used, f"NVML memory info v1: used, driver-reserved memory included (no v2: {why})", False


class NvmlMemory(_Sampler):
    """NVML's view of GPU memory, sampled: this process tree's memory from the compute-process list
    (CUDA context included) and the whole device's used memory (other processes included).
    `before_bytes` is the device's used memory read when the tracker was built, before the cell
    loaded anything: others' load, plus this process's CUDA context if it already had one.
    `source` says which NVML reading `used` is (v2 leaves out driver-reserved memory)."""

    series_name = "nvml_device_used_bytes"   # the driver view of the whole device, every sample

    def __init__(self, nvml, handle, interval_s: float = 0.01):
        super().__init__(interval_s)
        self.nvml, self.handle = nvml, handle
        self.before_bytes, self.source, self.v2 = nvml_used(nvml, handle)
        self.process_peak = self.device_peak = 0
        self.process_seen = False
        self.process_reading_missing = False
        self.process_error: str | None = None   # the per-process query failed (NoPermission, an old driver)
        self._pids = ProcessTree().pids

    def _sample(self) -> None:
        info = (self.nvml.nvmlDeviceGetMemoryInfo(self.handle, version=self.nvml.nvmlMemory_v2) if self.v2
                else self.nvml.nvmlDeviceGetMemoryInfo(self.handle))
        self.device_peak = max(self.device_peak, int(info.used))
        self._record(int(info.used))
        if self.process_error:
            return
        try:
            listed = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self.nvml.NVMLError as e:   # the device figure goes on; this one says why it is missing
            self.process_error = f"{type(e).__name__}: {e}"
            return
        pids = self._pids()
        mine = [p for p in listed if p.pid in pids]
        if mine:
            self.process_seen = True
            used = [p.usedGpuMemory for p in mine]
            if any(u is None for u in used):   # NVML_VALUE_NOT_AVAILABLE (e.g. under WDDM or MIG without rights)
                self.process_reading_missing = True
            self.process_peak = max(self.process_peak, sum(u or 0 for u in used))

    def result(self) -> dict[str, Any]:
        if self.error and not self.device_peak:
            reason = unavailable(f"NVML: {self.error}")
            return {"nvml_process_peak_bytes": reason, "nvml_device_used_peak_bytes": reason,
                    "nvml_device_used_before_bytes": self.before_bytes}
        if self.process_error:
            process = unavailable(f"NVML could not list the device's processes ({self.process_error})")
        elif not self.process_seen:
            process = unavailable("process not visible to NVML (a container without the host PID namespace?)")
        elif self.process_reading_missing:
            process = unavailable("NVML reports no per-process memory on this device")
        else:
            process = self.process_peak
        return {"nvml_process_peak_bytes": process, "nvml_device_used_peak_bytes": self.device_peak,
                "nvml_device_used_before_bytes": self.before_bytes}


def amdsmi_handle(amdsmi, identity: dict[str, str] | None):
    """The amdsmi processor handle of torch's device, matched by PCI bus id (BDF); the visible-devices
    variables (ROCR_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES) renumber devices, the bus id does not."""
    handles = amdsmi.amdsmi_get_processor_handles()
    want = (identity or {}).get("pci_bus_id", "").lower()
    for h in handles:
        bdf = amdsmi.amdsmi_get_gpu_device_bdf(h).lower()
        if want and bdf.split(":", 1)[-1] == want.split(":", 1)[-1]:   # domain widths differ (4 vs 8 digits)
            return h
    if not want and len(handles) == 1:
        return handles[0]
    raise LookupError(f"no amdsmi device with PCI bus id {want or '(unknown)'}")


def _amd_process_vram(amdsmi, handle, pids: set[int]) -> int | None:
    """VRAM of `pids` on the device, across amdsmi versions (dicts, or handles to look up)."""
    total, seen = 0, False
    for proc in amdsmi.amdsmi_get_gpu_process_list(handle):
        info = proc if isinstance(proc, dict) else amdsmi.amdsmi_get_gpu_process_info(handle, proc)
        if info.get("pid") in pids:
            seen = True
            usage = info.get("memory_usage") or {}
            total += int(usage.get("vram_mem", info.get("mem", 0)) or 0)
    return total if seen else None


class AmdsmiMemory(_Sampler):
    """amdsmi's view of GPU memory on ROCm: the device's VRAM in use (not its capacity) and this
    process tree's VRAM from the process list."""

    series_name = "amdsmi_device_vram_used_bytes"

    MB = 2 ** 20   # amdsmi_get_gpu_vram_usage reports MB

    def __init__(self, amdsmi, handle, interval_s: float = 0.01):
        super().__init__(interval_s)
        self.amdsmi, self.handle = amdsmi, handle
        self._pids = ProcessTree().pids
        self.before_bytes = self._device_used()
        self.process_peak = self.device_peak = 0
        self.process_seen = False

    def _device_used(self) -> int:
        return int(self.amdsmi.amdsmi_get_gpu_vram_usage(self.handle)["vram_used"]) * self.MB

    def _sample(self) -> None:
        used = self._device_used()
        self.device_peak = max(self.device_peak, used)
        self._record(used)
        mine = _amd_process_vram(self.amdsmi, self.handle, self._pids())
        if mine is not None:
            self.process_seen = True
            self.process_peak = max(self.process_peak, mine)

    def result(self) -> dict[str, Any]:
        if self.error and not self.device_peak:
            reason = unavailable(f"amdsmi: {self.error}")
            return {"amdsmi_process_peak_bytes": reason, "amdsmi_device_vram_used_peak_bytes": reason,
                    "amdsmi_device_vram_used_before_bytes": self.before_bytes}
        process = self.process_peak if self.process_seen else unavailable(
            f"process not visible to amdsmi{' (' + self.error + ')' if self.error else ''}")
        return {"amdsmi_process_peak_bytes": process, "amdsmi_device_vram_used_peak_bytes": self.device_peak,
                "amdsmi_device_vram_used_before_bytes": self.before_bytes}


class EnergyMeter:
    """Energy over marked intervals (the timed epochs), from a cumulative counter in joules.

    `read` returns the counter in J or raises; the first failure makes the figure unavailable."""

    def __init__(self, read, source: str):
        self.read, self.source = read, source
        self.joules, self.intervals, self._start = 0.0, 0, None
        self.error: str | None = None

    def begin(self) -> None:
        try:
            self._start = self.read()
        except Exception as e:
            self.error = self.error or f"{type(e).__name__}: {e}"

    def end(self) -> None:
        if self._start is None:
            return
        try:
            self.joules += self.read() - self._start
            self.intervals += 1
        except Exception as e:
            self.error = self.error or f"{type(e).__name__}: {e}"
        self._start = None

    def result(self) -> dict[str, Any]:
        if self.error or not self.intervals:
            why = self.error or "no timed epoch"
            return {"energy_j_per_epoch": unavailable(f"{self.source}: {why}")}
        # the counters are the device's, not the process's: another process's work is in them too
        return {"energy_j_per_epoch": self.joules / self.intervals,
                "energy_source": f"{self.source} (the whole device: other processes' work included)"}


def nvml_energy(nvml, handle) -> EnergyMeter:
    # nvmlDeviceGetTotalEnergyConsumption: millijoules since the driver loaded (Volta and newer)
    return EnergyMeter(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3, "NVML total energy counter")


def amdsmi_energy(amdsmi, handle) -> EnergyMeter:
    def read() -> float:
        e = amdsmi.amdsmi_get_energy_count(handle)
        counter = e.get("energy_accumulator", e.get("power"))   # the key was renamed across amdsmi versions
        return float(counter) * float(e["counter_resolution"]) / 1e6   # resolution is in microjoules
    return EnergyMeter(read, "amdsmi energy counter")


def unavailable_energy(reason: str) -> EnergyMeter:
    """A meter that reads nothing and says why."""
    meter = EnergyMeter(lambda: 0.0, "energy")
    meter.begin = meter.end = lambda: None
    meter.result = lambda: {"energy_j_per_epoch": unavailable(reason)}
    return meter


def driver_trackers(device, interval_s: float) -> tuple[list, "EnergyMeter", dict[str, str], dict[str, Any]]:
    """(samplers, energy meter, facts for the row's environment, figures known unavailable already)
    for a GPU cell: NVML on CUDA builds, amdsmi on ROCm builds, each matched to torch's device by
    UUID / PCI bus id. What cannot be had is reported as unavailable, with why."""
    import torch
    if device.type != "cuda":
        return [], unavailable_energy("no energy counter is read on the CPU"), {}, {}
    ident = device_identity(device.index or 0)
    rocm = bool(torch.version.hip)
    try:
        if rocm:
            import amdsmi
            amdsmi.amdsmi_init()
            handle = amdsmi_handle(amdsmi, ident)
            return [AmdsmiMemory(amdsmi, handle, interval_s)], amdsmi_energy(amdsmi, handle), {
                "gpu_driver_view": "amdsmi", "gpu_driver": _amd_driver_version(amdsmi, handle)}, {}
        import pynvml
        pynvml.nvmlInit()
        handle = nvml_handle(pynvml, device.index or 0, ident)
        sampler = NvmlMemory(pynvml, handle, interval_s)
        return [sampler], nvml_energy(pynvml, handle), {
            "gpu_driver_view": "NVML", "gpu_driver": pynvml.nvmlSystemGetDriverVersion(),
            "gpu_memory_used": sampler.source}, {}
    except Exception as e:   # ImportError, a driver error, permissions, an unmappable device
        lib = "amdsmi" if rocm else "NVML"
        reason = unavailable(f"{lib}: {type(e).__name__}: {e}")
        keys = (("amdsmi_process_peak_bytes", "amdsmi_device_vram_used_peak_bytes") if rocm
                else ("nvml_process_peak_bytes", "nvml_device_used_peak_bytes"))
        return [], unavailable_energy(f"{lib} unavailable"), {}, {k: reason for k in keys}


def _amd_driver_version(amdsmi, handle) -> str:
    try:
        return str(amdsmi.amdsmi_get_gpu_driver_info(handle)["driver_version"])
    except Exception as e:   # an older amdsmi without the call, or the query not supported
        return f"unavailable: amdsmi driver info: {type(e).__name__}: {e}"   # an environment fact, not a metric

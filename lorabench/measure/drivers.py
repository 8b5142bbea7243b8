"""Device-level memory and energy: the driver's view (NVML on NVIDIA, amdsmi on AMD).

    lorabench run --device cuda          # every GPU cell samples these beside torch's allocator

The driver sees what torch's allocator cannot: the CUDA/HIP context, other processes on the
device, and the energy counter. Every handle is matched to torch's device by UUID or PCI bus
id, never by index (CUDA orders devices fastest-first, the drivers by bus). Samplers share the
tracker interface of `trackers`; what cannot be read is `Unavailable`, with the driver's reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from .trackers import ProcessTree, Sampler, unavailable


@dataclass(frozen=True)
class Pci:
    """A PCI address: domain, bus, device (the slot) and function. NVML writes it
    `00000000:3B:00.0` (8-digit domain; `busIdLegacy` has 4), amdsmi and lspci `0000:3b:00.0`;
    torch knows the slot only (no function). A GPU is found by its slot; two functions in one slot
    (SR-IOV virtual functions) are ambiguous and refused, never guessed."""

    domain: int
    bus: int
    device: int
    function: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Pci":
        m = re.fullmatch(
            r"(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})(?:\.([0-7]))?", str(text).strip()
        )
        if not m:
            raise ValueError(f"not a PCI address: {text!r}")
        domain, bus, device, function = m.groups()
        return cls(int(domain or "0", 16), int(bus, 16), int(device, 16), int(function) if function else None)

    @property
    def slot(self) -> tuple[int, int, int]:
        return self.domain, self.bus, self.device

    def __str__(self) -> str:
        return f"{self.domain:08X}:{self.bus:02X}:{self.device:02X}" + (
            f".{self.function}" if self.function is not None else ""
        )


def bare_uuid(text: str) -> str:
    """A GPU UUID without NVML's `GPU-` / `MIG-` prefix, lower case: torch prints it bare
    (`{:02x}` x 16 in 8-4-4-4-12 groups), NVML with the prefix."""
    text = str(text).strip()
    for prefix in ("GPU-", "MIG-"):
        if text.upper().startswith(prefix):
            text = text[len(prefix) :]
    return text.lower()


def device_identity(index: int = 0) -> dict[str, str]:
    """UUID and PCI slot of torch's device `index`, in this (cell) process: the keys that map a
    torch device to the driver's, whose order differs (CUDA orders fastest-first, NVML by bus)."""
    import torch

    return identity_of(torch.cuda.get_device_properties(index))


def identity_of(props) -> dict[str, str]:
    """{"uuid", "pci_bus_id"} of torch's device properties (`torch.cuda.get_device_properties`)."""
    ident: dict[str, str] = {}
    uuid = bare_uuid(getattr(props, "uuid", "") or "")
    if uuid:
        ident["uuid"] = uuid
    if getattr(props, "pci_bus_id", None) is not None:
        ident["pci_bus_id"] = str(
            Pci(getattr(props, "pci_domain_id", 0), props.pci_bus_id, getattr(props, "pci_device_id", 0))
        )
    return ident


def by_slot(handles: list, address_of, want: Pci, what: str):
    """The one handle whose PCI slot is `want`'s; LookupError when none is, or several are."""
    found = [h for h in handles if Pci.parse(address_of(h)).slot == want.slot]
    if len(found) > 1:
        raise LookupError(
            f"{len(found)} {what} devices share PCI slot {want} (functions "
            f"{', '.join(str(Pci.parse(address_of(h)).function) for h in found)}); torch does not say "
            "which one it uses"
        )
    if not found:
        raise LookupError(f"no {what} device at PCI slot {want}")
    return found[0]


def _nvml_address(nvml, handle) -> str:
    info = nvml.nvmlDeviceGetPciInfo(handle)
    bus_id = info.busId.decode() if isinstance(info.busId, bytes) else str(info.busId)
    return bus_id or f"{info.domain:08X}:{info.bus:02X}:{info.device:02X}"


def _nvml_mig_enabled(nvml, handle) -> bool:
    try:
        return nvml.nvmlDeviceGetMigMode(handle)[0] == nvml.NVML_DEVICE_MIG_ENABLE
    except nvml.NVMLError:  # NOT_SUPPORTED: a GPU without MIG
        return False


def nvml_devices(nvml) -> list:
    """Every GPU NVML sees (MIG instances are reached through their GPU or their UUID)."""
    return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]


def nvml_handle(nvml, index: int = 0, identity: dict[str, str] | None = None):
    """The NVML handle of torch's device `index`, resolved by UUID or PCI slot, never by torch's
    index. A GPU in MIG mode is resolved by UUID only: its instances share its PCI address, so the
    slot would name the whole GPU. Without an identity (no CUDA in this process),
    CUDA_VISIBLE_DEVICES is read: UUIDs (GPU-..., MIG-...) map exactly, and indices only under
    CUDA_DEVICE_ORDER=PCI_BUS_ID."""
    if identity:
        uuid = bare_uuid(identity.get("uuid", ""))
        for candidate in [f"GPU-{uuid}", f"MIG-{uuid}"] if uuid else []:
            try:
                return nvml.nvmlDeviceGetHandleByUUID(candidate)
            except nvml.NVMLError:
                pass
        if identity.get("pci_bus_id"):
            handle = by_slot(
                nvml_devices(nvml),
                lambda h: _nvml_address(nvml, h),
                Pci.parse(identity["pci_bus_id"]),
                "NVML",
            )
            if _nvml_mig_enabled(nvml, handle):
                raise LookupError(
                    f"the GPU at PCI slot {identity['pci_bus_id']} is in MIG mode: its instances are told "
                    f"apart by UUID only, and torch's UUID ({uuid or 'none'}) matched none of them"
                )
            return handle
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
        raise LookupError(
            f"CUDA_VISIBLE_DEVICES entry {entry!r} is an index in CUDA's fastest-first order, which "
            "NVML does not share; use GPU UUIDs or set CUDA_DEVICE_ORDER=PCI_BUS_ID"
        )
    if nvml.nvmlDeviceGetCount() == 1 or ordered:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    raise LookupError(
        "several GPUs and no way to tell which one torch uses; set CUDA_DEVICE_ORDER=PCI_BUS_ID"
    )


def nvml_visible(nvml) -> tuple[list, str]:
    """(handles of the GPUs this process's cells may use, how they were found), without CUDA: the
    UUIDs of CUDA_VISIBLE_DEVICES, its indices under PCI order, else every GPU (where its indices
    cannot be mapped, a superset: what is read of them is the least, never more)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return nvml_devices(nvml), "every GPU"
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    try:
        return [nvml_handle(nvml, i) for i in range(len(entries))], f"CUDA_VISIBLE_DEVICES={visible}"
    except (LookupError, nvml.NVMLError) as e:
        return nvml_devices(nvml), f"every GPU (CUDA_VISIBLE_DEVICES={visible} cannot be mapped: {e})"


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


class NvmlMemory(Sampler):
    """NVML's view of GPU memory, sampled: this process tree's memory from the compute-process list
    (CUDA context included) and the whole device's used memory (other processes included).
    `before_bytes` is the device's used memory read when the tracker was built, before the cell
    loaded anything: others' load, plus this process's CUDA context if it already had one.
    `source` says which NVML reading `used` is (v2 leaves out driver-reserved memory)."""

    series_name = "nvml_device_used_bytes"  # the driver view of the whole device, every sample
    KEYS = ("nvml_process_peak_bytes", "nvml_device_used_peak_bytes", "nvml_device_used_before_bytes")

    def __init__(self, nvml, handle, interval_s: float = 0.01):
        super().__init__(interval_s)
        self.nvml, self.handle = nvml, handle
        self.before_bytes, self.source, self.v2 = nvml_used(nvml, handle)
        self.process_peak = self.device_peak = 0
        self.process_seen = False
        self.process_reading_missing = False
        self.process_error: str | None = None  # the per-process query failed (NoPermission, an old driver)
        self._pids = ProcessTree().pids

    def _sample(self) -> None:
        info = (
            self.nvml.nvmlDeviceGetMemoryInfo(self.handle, version=self.nvml.nvmlMemory_v2)
            if self.v2
            else self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        )
        self.device_peak = max(self.device_peak, int(info.used))
        self._record(int(info.used))
        if self.process_error:
            return
        try:
            listed = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self.nvml.NVMLError as e:  # the device figure goes on; this one says why it is missing
            self.process_error = f"{type(e).__name__}: {e}"
            return
        pids = self._pids()
        mine = [p for p in listed if p.pid in pids]
        if mine:
            self.process_seen = True
            used = [p.usedGpuMemory for p in mine]
            if any(
                u is None for u in used
            ):  # NVML_VALUE_NOT_AVAILABLE (e.g. under WDDM or MIG without rights)
                self.process_reading_missing = True
            self.process_peak = max(self.process_peak, sum(u or 0 for u in used))

    def result(self) -> dict[str, Any]:
        if self.error:  # a peak of the readings before it failed could miss the real one
            reason = unavailable(f"NVML: a reading failed after {len(self.series)}: {self.error}")
            return {
                "nvml_process_peak_bytes": reason,
                "nvml_device_used_peak_bytes": reason,
                "nvml_device_used_before_bytes": self.before_bytes,
            }
        if self.process_error:
            process = unavailable(f"NVML could not list the device's processes ({self.process_error})")
        elif not self.process_seen:
            process = unavailable("process not visible to NVML (a container without the host PID namespace?)")
        elif self.process_reading_missing:
            process = unavailable("NVML reports no per-process memory on this device")
        else:
            process = self.process_peak
        return {
            "nvml_process_peak_bytes": process,
            "nvml_device_used_peak_bytes": self.device_peak,
            "nvml_device_used_before_bytes": self.before_bytes,
        }


def amdsmi_handle(amdsmi, identity: dict[str, str] | None):
    """The amdsmi processor handle of torch's device, matched by PCI slot, domain included; the
    visible-devices variables (ROCR_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES) renumber devices, the
    address does not."""
    handles = amdsmi.amdsmi_get_processor_handles()
    want = (identity or {}).get("pci_bus_id")
    if want:
        return by_slot(handles, amdsmi.amdsmi_get_gpu_device_bdf, Pci.parse(want), "amdsmi")
    if len(handles) == 1:
        return handles[0]
    raise LookupError(
        f"{len(handles)} amdsmi devices and no PCI address of torch's device to tell them apart"
    )


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


class AmdsmiMemory(Sampler):
    """amdsmi's view of GPU memory on ROCm: the device's VRAM in use (not its capacity) and this
    process tree's VRAM from the process list."""

    series_name = "amdsmi_device_vram_used_bytes"
    KEYS = (
        "amdsmi_process_peak_bytes",
        "amdsmi_device_vram_used_peak_bytes",
        "amdsmi_device_vram_used_before_bytes",
    )

    MB = 2**20  # amdsmi_get_gpu_vram_usage reports MB

    def __init__(self, amdsmi, handle, interval_s: float = 0.01):
        super().__init__(interval_s)
        self.amdsmi, self.handle = amdsmi, handle
        self._pids = ProcessTree().pids
        self.before_bytes = self._device_used()
        self.process_peak = self.device_peak = 0
        self.process_seen = False
        self.process_error: str | None = (
            None  # the process list failed (no permission): the device figure goes on
        )

    def _device_used(self) -> int:
        return int(self.amdsmi.amdsmi_get_gpu_vram_usage(self.handle)["vram_used"]) * self.MB

    def _sample(self) -> None:
        used = self._device_used()
        self.device_peak = max(self.device_peak, used)
        self._record(used)
        if self.process_error:
            return
        try:
            mine = _amd_process_vram(self.amdsmi, self.handle, self._pids())
        except self.amdsmi.AmdSmiException as e:
            self.process_error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            return
        if mine is not None:
            self.process_seen = True
            self.process_peak = max(self.process_peak, mine)

    def result(self) -> dict[str, Any]:
        if self.error:  # a peak of the readings before it failed could miss the real one
            reason = unavailable(f"amdsmi: a reading failed after {len(self.series)}: {self.error}")
            return {
                "amdsmi_process_peak_bytes": reason,
                "amdsmi_device_vram_used_peak_bytes": reason,
                "amdsmi_device_vram_used_before_bytes": self.before_bytes,
            }
        process = (
            self.process_peak
            if self.process_seen
            else unavailable(
                "process not visible to amdsmi"
                + (
                    f": it could not list the device's processes ({self.process_error})"
                    if self.process_error
                    else ""
                )
            )
        )
        return {
            "amdsmi_process_peak_bytes": process,
            "amdsmi_device_vram_used_peak_bytes": self.device_peak,
            "amdsmi_device_vram_used_before_bytes": self.before_bytes,
        }


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
        return {
            "energy_j_per_epoch": self.joules / self.intervals,
            "energy_source": f"{self.source} (the whole device: other processes' work included)",
        }


def nvml_energy(nvml, handle) -> EnergyMeter:
    # nvmlDeviceGetTotalEnergyConsumption: millijoules since the driver loaded (Volta and newer)
    return EnergyMeter(
        lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3, "NVML total energy counter"
    )


def amdsmi_energy(amdsmi, handle) -> EnergyMeter:
    def read() -> float:
        e = amdsmi.amdsmi_get_energy_count(handle)
        counter = e.get("energy_accumulator", e.get("power"))  # the key was renamed across amdsmi versions
        return float(counter) * float(e["counter_resolution"]) / 1e6  # resolution is in microjoules

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
    facts = {
        f"gpu_{key}": value for key, value in ident.items()
    }  # which device it was: gpu_uuid, gpu_pci_bus_id
    rocm = bool(torch.version.hip)
    try:
        if rocm:
            import amdsmi

            amdsmi.amdsmi_init()
            handle = amdsmi_handle(amdsmi, ident)
            return (
                [AmdsmiMemory(amdsmi, handle, interval_s)],
                amdsmi_energy(amdsmi, handle),
                {**facts, "gpu_driver_view": "amdsmi", "gpu_driver": _amd_driver_version(amdsmi, handle)},
                {},
            )
        import pynvml

        pynvml.nvmlInit()
        handle = nvml_handle(pynvml, device.index or 0, ident)
        sampler = NvmlMemory(pynvml, handle, interval_s)
        return (
            [sampler],
            nvml_energy(pynvml, handle),
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
        keys = (AmdsmiMemory if rocm else NvmlMemory).KEYS  # every figure the sampler would have given
        return (
            [],
            unavailable_energy(f"{lib} unavailable: {type(e).__name__}: {e}"),
            facts,
            {k: reason for k in keys},
        )


def _amd_driver_version(amdsmi, handle) -> str:
    try:
        return str(amdsmi.amdsmi_get_gpu_driver_info(handle)["driver_version"])
    except Exception as e:  # an older amdsmi without the call, or the query not supported
        return (
            f"unavailable: amdsmi driver info: {type(e).__name__}: {e}"  # an environment fact, not a metric
        )

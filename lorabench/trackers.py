"""Trackers: context managers that measure the block they wrap, then report with `.result()`.

    lorabench run --models cifar-mlp --methods full     # a cell runs inside these trackers

Every tracker has the same interface: `with Tracker(...) as t: ...` then `t.result()`, a flat
dict whose keys carry their unit (`_bytes`, `_s`). A figure that cannot be measured is the
string "unavailable: <reason>", never a zero. Samplers stop in `finally`, so an exception in
the tracked block (an out-of-memory error, say) still leaves its readings behind.
"""
from __future__ import annotations

import os
import resource
import threading
from typing import Any

import psutil

UNAVAILABLE = "unavailable: "


def unavailable(reason: str) -> str:
    return UNAVAILABLE + reason


def is_unavailable(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(UNAVAILABLE)


class Tracker:
    """The shared interface: start on enter, stop on exit (always), then `result()`."""

    def __enter__(self) -> "Tracker":
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False   # never swallow the block's exception

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def result(self) -> dict[str, Any]:
        raise NotImplementedError


class _Sampler(Tracker):
    """A background thread calling `_sample()` every `interval_s`, stopped in finally."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None   # the first failure of a reading: the figure becomes unavailable

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._safe_sample()

    def _safe_sample(self) -> None:
        try:
            self._sample()
        except Exception as e:   # a sampler must never take the cell down
            self.error = self.error or f"{type(e).__name__}: {e}"

    def _sample(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._safe_sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        try:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
        finally:
            self._safe_sample()


class HostMemory(_Sampler):
    """Resident memory of this process and its children, sampled in a background thread.

    `host_peak_rss_bytes` is the sampled maximum inside the block (it can miss a spike shorter
    than `interval_s`); `host_maxrss_bytes` is the kernel's high-water mark of this process over
    its whole life (imports included), which no spike escapes. Both count host RAM, not GPU memory.

    A sample must cost next to nothing: the sampler shares the cores with the training it
    measures. This process's RSS is one pread of /proc/self/statm (psutil where there is no
    /proc); the children, whose discovery scans every process on the machine, are looked for
    once a second, not every sample. (bench/test_sampler_overhead.py holds the budget: < 2 %.)
    """

    CHILD_SCAN_S = 1.0

    def __init__(self, interval_s: float = 0.01):
        super().__init__(interval_s)
        self._proc = psutil.Process(os.getpid())
        self._children: list[psutil.Process] = []
        self._scanned = 0.0
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            self._statm: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._statm = None
        self.baseline = self.peak = 0

    def _self_rss(self) -> int:
        if self._statm is not None:
            return int(os.pread(self._statm, 64, 0).split()[1]) * self._page   # resident pages
        return self._proc.memory_info().rss

    def _rss(self) -> int:
        import time
        now = time.monotonic()
        if now - self._scanned >= self.CHILD_SCAN_S:
            try:
                self._children = self._proc.children(recursive=True)
            except psutil.Error:
                self._children = []
            self._scanned = now
        rss = self._self_rss()
        for child in self._children:
            try:
                rss += child.memory_info().rss
            except psutil.Error:   # a child that exited since the last scan
                pass
        return rss

    def _sample(self) -> None:
        self.peak = max(self.peak, self._rss())

    def start(self) -> None:
        self._scanned = 0.0   # look for children now
        self.baseline = self.peak = self._rss()
        super().start()

    def stop(self) -> None:
        self._scanned = 0.0   # the final sample (the block's end state) looks for children again
        try:
            super().stop()
        finally:
            if self._statm is not None:
                os.close(self._statm)
                self._statm = None

    def result(self) -> dict[str, Any]:
        return {
            "host_rss_baseline_bytes": self.baseline,
            "host_peak_rss_bytes": self.peak,
            "host_peak_above_baseline_bytes": self.peak - self.baseline,
            # Linux reports ru_maxrss in KiB (macOS in bytes).
            "host_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }


class TorchAllocator(Tracker):
    """torch's caching allocator on a CUDA or ROCm device.

    Peaks are reset on entry, so they cover the block only; the baseline (bytes allocated on
    entry: weights, data and whatever the caller placed first) gives the peak above it.
    `reserved` is what the allocator holds from the driver (allocated + cached free blocks);
    neither includes the CUDA context, which only the driver (NVML / amdsmi) sees.
    """

    def __init__(self, device):   # a torch.device
        self.device = device
        self.baseline = 0
        self.peak_allocated = self.peak_reserved = None

    def start(self) -> None:
        if self.device.type != "cuda":
            return
        import torch
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)

    def stop(self) -> None:
        if self.device.type != "cuda":
            return
        import torch
        try:
            torch.cuda.synchronize(self.device)
        except RuntimeError:   # after a device error the readings below are still what we have
            pass
        self.peak_allocated = torch.cuda.max_memory_allocated(self.device)
        self.peak_reserved = torch.cuda.max_memory_reserved(self.device)

    def result(self) -> dict[str, Any]:
        if self.device.type != "cuda":
            reason = unavailable(f"torch keeps no allocator statistics on the {self.device.type}")
            return {"torch_peak_allocated_bytes": reason, "torch_peak_reserved_bytes": reason,
                    "torch_allocated_baseline_bytes": reason}
        return {
            "torch_allocated_baseline_bytes": self.baseline,
            "torch_peak_allocated_bytes": self.peak_allocated,
            "torch_peak_reserved_bytes": self.peak_reserved,
            "torch_peak_above_baseline_bytes": self.peak_allocated - self.baseline,
        }


class SavedTensors(Tracker):
    """What autograd keeps for the backward pass of the block: activations, dropout masks, softmax
    outputs. Counted exactly, on any device, through saved-tensor hooks, by storage: a saved view
    keeps its whole storage alive, and a storage saved twice (a ReLU output that is also the next
    Linear's input) counts once. Storages in `exclude` (the parameters, the resident data set)
    are not activations and are left out.

    Not a sampler and not free: one Python call per saved tensor (240 for a BERT-Base forward), so
    wrap one step, not an epoch. It is a lower bound of the activation memory at the peak: the
    temporaries of the backward pass itself come on top (the allocator's reading on a GPU).
    """

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = exclude
        self._storages: dict[int, int] = {}   # storage address -> bytes
        self._hooks = None

    def _pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    def start(self) -> None:
        import torch
        self._storages.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()

    def stop(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def result(self) -> dict[str, Any]:
        return {"activations_saved_bytes": sum(self._storages.values()),
                "activations_saved_tensors": len(self._storages)}


def _unpack(t):
    return t


# ---- device-level memory: the driver's view (NVML on NVIDIA, amdsmi on AMD) -------------------

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


def _my_pids() -> set[int]:
    me = psutil.Process()
    pids = {me.pid}
    try:
        pids |= {c.pid for c in me.children(recursive=True)}
    except psutil.Error:
        pass
    return pids


class NvmlMemory(_Sampler):
    """NVML's view of GPU memory, sampled: this process tree's memory from the compute-process list
    (CUDA context included) and the whole device's used memory (other processes included).
    `before_bytes` is the device's used memory read when the tracker was built, before the cell
    loaded anything: others' load, plus this process's CUDA context if it already had one."""

    def __init__(self, nvml, handle, interval_s: float = 0.01):
        super().__init__(interval_s)
        self.nvml, self.handle = nvml, handle
        self.before_bytes = nvml.nvmlDeviceGetMemoryInfo(handle).used
        self.process_peak = self.device_peak = 0
        self.process_seen = False
        self.process_reading_missing = False

    def _sample(self) -> None:
        self.device_peak = max(self.device_peak, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        pids = _my_pids()
        mine = [p for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle) if p.pid in pids]
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
        if not self.process_seen:
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

    MB = 2 ** 20   # amdsmi_get_gpu_vram_usage reports MB

    def __init__(self, amdsmi, handle, interval_s: float = 0.01):
        super().__init__(interval_s)
        self.amdsmi, self.handle = amdsmi, handle
        self.before_bytes = self._device_used()
        self.process_peak = self.device_peak = 0
        self.process_seen = False

    def _device_used(self) -> int:
        return int(self.amdsmi.amdsmi_get_gpu_vram_usage(self.handle)["vram_used"]) * self.MB

    def _sample(self) -> None:
        self.device_peak = max(self.device_peak, self._device_used())
        mine = _amd_process_vram(self.amdsmi, self.handle, _my_pids())
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
        return {"energy_j_per_epoch": self.joules / self.intervals, "energy_source": self.source}


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


def measure_matmul_flops(device, dtype, seconds: float = 0.5) -> float:
    """Sustained FLOP/s of square matmuls at `dtype` on `device`: the ceiling that model FLOPs
    utilisation is measured against. 2 n^3 FLOPs per n x n product; timed between synchronisations
    after a warm-up, so kernel selection and clock ramp-up are excluded."""
    import time

    import torch
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    count, t0 = 0, time.perf_counter()
    while True:
        for _ in range(4):
            a @ b
        count += 4
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * n ** 3 * count / elapsed

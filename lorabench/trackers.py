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


class HostMemory(Tracker):
    """Resident memory of this process and its children, sampled in a background thread.

    `host_peak_rss_bytes` is the sampled maximum inside the block (it can miss a spike shorter
    than `interval_s`); `host_maxrss_bytes` is the kernel's high-water mark of this process over
    its whole life (imports included), which no spike escapes. Both count host RAM, not GPU memory.
    """

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self._proc = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = self.peak = 0

    def _rss(self) -> int:
        rss = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            try:
                rss += child.memory_info().rss
            except psutil.Error:   # a child that exited between listing and reading
                pass
        return rss

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._rss())

    def start(self) -> None:
        self.baseline = self.peak = self._rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="lorabench-host-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        try:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
        finally:
            self.peak = max(self.peak, self._rss())   # the block's end state counts too

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

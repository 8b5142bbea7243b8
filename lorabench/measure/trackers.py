"""Trackers: context managers that measure the block they wrap, then report with `.result()`.

    lorabench run --models cifar-mlp --methods full     # a cell runs inside these trackers

Every tracker has the same interface: `with Tracker(...) as t: ...` then `t.result()`, a flat
dict whose keys carry their unit (`_bytes`, `_s`). A figure that cannot be measured is an
`Unavailable(reason)`, never a zero; the row keeps it as null with its reason beside it. Samplers stop in `finally`, so an exception in
the tracked block (an out-of-memory error, say) still leaves its readings behind.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class Unavailable:
    """A figure that could not be measured, and why."""

    reason: str


def unavailable(reason: str) -> Unavailable:
    return Unavailable(reason)


def is_unavailable(value: Any) -> bool:
    return isinstance(value, Unavailable)


class Tracker:
    """The shared interface: start on enter, stop on exit (always), then `result()`. A tracker
    whose start raised has no readings: `unavailable_result` gives each of its KEYS with why."""

    KEYS: tuple[str, ...] = ()  # the figures result() gives
    started = False

    def __enter__(self) -> "Tracker":
        self.start()
        self.started = True
        return self

    def unavailable_result(self, reason: str) -> dict[str, Any]:
        return {key: unavailable(reason) for key in self.KEYS}

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False  # never swallow the block's exception

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def result(self) -> dict[str, Any]:
        raise NotImplementedError


class Sampler(Tracker):
    """A background thread calling `_sample()` every `interval_s`, stopped in finally. Each
    reading of `series_name` is kept with its time (perf_counter), for the cell's timeline."""

    series_name = "bytes"
    edge = False  # True for the readings at start and stop, which every query of a sampler takes

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.series: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # the first failure of a reading: the figure becomes unavailable

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._safe_sample()

    def _safe_sample(self) -> None:
        try:
            self._sample()
        except Exception as e:  # a sampler must never take the cell down
            self.error = self.error or f"{type(e).__name__}: {e}"

    def _sample(self) -> None:
        raise NotImplementedError

    def _record(self, value: int) -> None:
        self.series.append((time.perf_counter(), value))

    def start(self) -> None:
        self.edge = True
        self._safe_sample()
        self.edge = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        try:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
        finally:
            self.edge = True
            self._safe_sample()


class ProcessTree:
    """This process and its children, the children looked up at most once every SCAN_S seconds:
    psutil's tree walk reads every process on the machine (1-2 ms a call, more with more
    processes), too dear for a sampler that runs every 10 ms beside the training it measures.
    The GPU drivers' per-process readings match their process lists against it."""

    SCAN_S = 1.0

    def __init__(self):
        self.me = psutil.Process(os.getpid())
        self._children: list[psutil.Process] = []
        self._scanned = float("-inf")

    def children(self) -> list[psutil.Process]:
        now = time.monotonic()
        if now - self._scanned >= self.SCAN_S:
            try:
                self._children = self.me.children(recursive=True)
            except psutil.Error:
                self._children = []
            self._scanned = now
        return self._children

    def pids(self) -> set[int]:
        return {self.me.pid} | {c.pid for c in self.children()}


class SelfRss:
    """This process's resident bytes for a sampler, cheaply: one pread of /proc/self/statm per
    call (psutil where there is no /proc). `close()` releases the file."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._me = psutil.Process()
        try:
            self._statm: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._statm = None

    def __call__(self) -> int:
        if self._statm is not None:
            return int(os.pread(self._statm, 64, 0).split()[1]) * self._page  # resident pages
        return self._me.memory_info().rss

    def close(self) -> None:
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None


class HostMemory(Sampler):
    """Resident memory of this process, sampled in a background thread: the cell's own process
    (a rank's, in a cell of several). Processes it starts are left out: torch.compile's worker
    pool (inductor forks it while the block runs) holds compiler state, not the cell's training
    memory, and would inflate the peak and the activation figure derived from it.

    `host_peak_rss_bytes` is the sampled maximum inside the block (it can miss a spike shorter
    than `interval_s`); `host_maxrss_bytes` is the kernel's high-water mark of this process over
    its whole life (imports included), which no spike escapes. Both count host RAM, not GPU memory.

    A sample must cost next to nothing: the sampler shares the cores with the training it
    measures. A sample is one pread of /proc/self/statm (psutil where there is no /proc).
    (bench/test_sampler_overhead.py holds the budget.)
    """

    series_name = "host_rss_bytes"
    KEYS = (
        "host_rss_baseline_bytes",
        "host_peak_rss_bytes",
        "host_peak_above_baseline_bytes",
        "host_maxrss_bytes",
    )

    def __init__(self, interval_s: float = 0.01):
        super().__init__(interval_s)
        self._rss = SelfRss()
        self.baseline = self.peak = 0

    def _sample(self) -> None:
        rss = self._rss()
        self.peak = max(self.peak, rss)
        self._record(rss)

    def start(self) -> None:
        self.baseline = self.peak = self._rss()
        super().start()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._rss.close()

    def result(self) -> dict[str, Any]:
        return {
            "host_rss_baseline_bytes": self.baseline,
            "host_peak_rss_bytes": self.peak,
            "host_peak_above_baseline_bytes": self.peak - self.baseline,
            # Linux reports ru_maxrss in KiB (macOS in bytes).
            "host_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }


class Timeline(Sampler):
    """Memory of a cell over its whole life (build, load, warm-up, timed epochs, evals, checks),
    sampled every `interval_s`, with phase marks: host RSS of this process, and on a GPU the torch
    allocator's allocated bytes; beside them the other trackers' own series over their window
    (`add`). Written beside the results (not in the row), cut to at most POINTS samples by keeping
    each stretch's highest one, so the peak survives."""

    POINTS = 400

    def __init__(self, device, interval_s: float = 0.05):
        super().__init__(interval_s)
        self.device = device
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int, int | None]] = []
        self.marks: list[tuple[str, float]] = []
        self.others: dict[str, list[tuple[float, int]]] = {}  # the trackers' series, over their window
        self._self_rss = SelfRss()

    def _sample(self) -> None:
        import torch

        gpu = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        self.samples.append((time.perf_counter() - self.t0, self._self_rss(), gpu))

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._self_rss.close()

    def result(self) -> dict[str, Any]:
        return {}  # not figures of the row: the series goes to its own file (`to_json`)

    def mark(self, label: str) -> None:
        self.marks.append((label, time.perf_counter() - self.t0))

    def add(self, samplers) -> None:
        """Keep the trackers' own series beside this one (the 10 ms host sampler, the driver view)."""
        for sampler in samplers:
            if getattr(sampler, "series", None):
                self.others[sampler.series_name] = [(t - self.t0, v) for t, v in sampler.series]

    def to_json(self) -> dict:
        kept = _highest(self.samples, (lambda s: s[2]) if self.device.type == "cuda" else (lambda s: s[1]))
        others = {name: _highest(series, lambda s: s[1]) for name, series in self.others.items()}
        return {
            "t_s": [round(s[0], 4) for s in kept],
            "host_rss_bytes": [s[1] for s in kept],
            "torch_allocated_bytes": [s[2] for s in kept] if self.device.type == "cuda" else None,
            "marks": [[label, round(t, 4)] for label, t in self.marks],
            "interval_s": self.interval_s,
            "trackers": {
                name: {"t_s": [round(t, 4) for t, _ in series], "bytes": [v for _, v in series]}
                for name, series in others.items()
            },
        }


def _highest(samples: list, key) -> list:
    """At most Timeline.POINTS of `samples`, each stretch of them represented by its highest."""
    step = max(1, -(-len(samples) // Timeline.POINTS))
    return [max(samples[i : i + step], key=key) for i in range(0, len(samples), step)]


class TorchAllocator(Tracker):
    """torch's caching allocator on a CUDA or ROCm device.

    Peaks are reset on entry, so they cover the block only; the baseline (bytes allocated on
    entry: weights, data and whatever the caller placed first) gives the peak above it.
    `reserved` is what the allocator holds from the driver (allocated + cached free blocks);
    neither includes the CUDA context, which only the driver (NVML / amdsmi) sees.
    """

    KEYS = (
        "torch_allocated_baseline_bytes",
        "torch_peak_allocated_bytes",
        "torch_peak_reserved_bytes",
        "torch_peak_above_baseline_bytes",
    )

    def __init__(self, device):  # a torch.device
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
        except RuntimeError:  # after a device error the readings below are still what we have
            pass
        self.peak_allocated = torch.cuda.max_memory_allocated(self.device)
        self.peak_reserved = torch.cuda.max_memory_reserved(self.device)

    def result(self) -> dict[str, Any]:
        if self.device.type != "cuda":
            reason = unavailable(f"torch keeps no allocator statistics on the {self.device.type}")
            return {
                "torch_peak_allocated_bytes": reason,
                "torch_peak_reserved_bytes": reason,
                "torch_allocated_baseline_bytes": reason,
            }
        if self.peak_allocated is None or self.peak_reserved is None:  # stop() failed before reading them
            return self.unavailable_result("the allocator's peaks could not be read after the block")
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
        self._storages: dict[int, int] = {}  # storage address -> bytes
        self._hooks = None

    def _pack(self, t):
        base = t if t._base is None else t._base
        if isinstance(
            base, self._parameter
        ):  # a weight (a view of one): FSDP2 gathers them anew, at new addresses
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    def start(self) -> None:
        import torch

        self._parameter = torch.nn.Parameter
        self._storages.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()

    def stop(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def result(self) -> dict[str, Any]:
        return {
            "activations_saved_bytes": sum(self._storages.values()),
            "activations_saved_tensors": len(self._storages),
        }


def _unpack(t):
    return t

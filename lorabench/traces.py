"""Memory over a cell's life, and deep dives on request: a profiler trace, a CUDA memory snapshot.

    lorabench run --models bert-tiny --methods lora --ranks 8 --profile --memory-snapshot

Every cell writes its memory timeline (`Timeline`) to RUN_DIR/timelines/<cell-key>.json; the
report draws it. The deep dives are written under the run directory too, named by the cell's key,
and the row's `info` says where (or why not). The trace is torch.profiler's Chrome trace of a few training steps taken
after the timed epochs, never inside them: open it in chrome://tracing or https://ui.perfetto.dev.
The snapshot records the CUDA caching allocator's history over the cell's first optimizer step
(forward, backward, Adam's state allocated): drag it onto https://pytorch.org/memory_viz. The CPU
has no allocator history to record; the row says so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PROFILED_STEPS = 3   # after one untraced step, so the trace shows steady state rather than first-call setup


@dataclass(frozen=True)
class Traces:
    """What a run asked for, and the run directory the files go under."""

    dir: str
    profile: bool = False
    memory_snapshot: bool = False

    def path(self, kind: str, name: str) -> Path:
        folder = Path(self.dir) / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name


class MemorySnapshot:
    """Record the CUDA allocator's history inside the block; `info()` says where it went or why not."""

    def __init__(self, traces: Traces | None, device: torch.device, name: str):
        self.on = bool(traces and traces.memory_snapshot)
        self.traces, self.device, self.name = traces, device, name
        self.note: str | None = None

    def __enter__(self) -> "MemorySnapshot":
        if self.on and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        return self

    def __exit__(self, *exc) -> bool:
        if not self.on:
            return False
        if self.device.type != "cuda":
            self.note = ("not recorded: torch records the history of the CUDA caching allocator only; this cell ran "
                         "on the CPU")
            return False
        try:
            path = self.traces.path("snapshots", f"{self.name}.pickle")
            torch.cuda.memory._dump_snapshot(str(path))
            self.note = str(Path(path).relative_to(self.traces.dir))
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        return False


def _highest(samples: list, key) -> list:
    """At most Timeline.POINTS of `samples`, each stretch of them represented by its highest."""
    step = max(1, -(-len(samples) // Timeline.POINTS))
    return [max(samples[i:i + step], key=key) for i in range(0, len(samples), step)]


def profile_steps(traces: Traces | None, step: Callable[[], None], device: torch.device, name: str) -> str | None:
    """Run `step` once untraced, then PROFILED_STEPS times under torch.profiler, and write the
    Chrome trace; its path relative to the run directory (None when no profile was asked for)."""
    if not (traces and traces.profile):
        return None
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    path = traces.path("traces", f"{name}.json")
    prof.export_chrome_trace(str(path))
    return str(path.relative_to(traces.dir))


class Timeline:
    """Memory of a cell over its whole life (build, load, warm-up, timed epochs, evals, checks),
    sampled in a thread every `interval_s`, with phase marks: host RSS of this process, and on a
    GPU the torch allocator's allocated bytes. Written beside the results (not in the row), cut to
    at most POINTS samples by keeping each stretch's highest one, so the peak survives."""

    POINTS = 400

    def __init__(self, device: torch.device, interval_s: float = 0.05):
        import os
        import threading
        self.device, self.interval_s = device, interval_s
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int, int | None]] = []
        self.marks: list[tuple[str, float]] = []
        self.others: dict[str, list[tuple[float, int]]] = {}   # the trackers' series, over their window
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:   # one read per sample; psutil where there is no /proc
            self._statm = open("/proc/self/statm", "rb", buffering=0)
        except OSError:
            self._statm = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lorabench-timeline", daemon=True)

    def _sample(self) -> None:
        if self._statm is not None:
            self._statm.seek(0)
            rss = int(self._statm.read(64).split()[1]) * self._page
        else:
            import psutil
            rss = psutil.Process().memory_info().rss
        gpu = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        self.samples.append((time.perf_counter() - self.t0, rss, gpu))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "Timeline":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self._statm is not None:
            self._statm.close()
        return False

    def add(self, samplers) -> None:
        """Keep the trackers' own series beside this one (the 10 ms host sampler, the driver view)."""
        for sampler in samplers:
            if getattr(sampler, "series", None):
                self.others[sampler.series_name] = [(t - self.t0, v) for t, v in sampler.series]

    def mark(self, label: str) -> None:
        self.marks.append((label, time.perf_counter() - self.t0))

    def to_json(self) -> dict:
        kept = _highest(self.samples, (lambda s: s[2]) if self.device.type == "cuda" else (lambda s: s[1]))
        others = {name: _highest(series, lambda s: s[1]) for name, series in self.others.items()}
        return {"t_s": [round(s[0], 4) for s in kept], "host_rss_bytes": [s[1] for s in kept],
                "torch_allocated_bytes": [s[2] for s in kept] if self.device.type == "cuda" else None,
                "marks": [[label, round(t, 4)] for label, t in self.marks], "interval_s": self.interval_s,
                "trackers": {name: {"t_s": [round(t, 4) for t, _ in series], "bytes": [v for _, v in series]}
                             for name, series in others.items()}}

    def write(self, traces: "Traces", name: str) -> str:
        import json
        path = traces.path("timelines", f"{name}.json")
        path.write_text(json.dumps(self.to_json()), encoding="utf-8")
        return str(path.relative_to(traces.dir))

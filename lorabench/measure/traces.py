"""Memory over a cell's life, and deep dives on request: a profiler trace, a CUDA memory snapshot.

    lorabench run --models bert-tiny --methods lora --ranks 8 --profile --memory-snapshot

Every cell writes its memory timeline (`trackers.Timeline`) to RUN_DIR/timelines/<cell-key>.json;
the report draws it. The deep dives are written under the run directory too, named by the cell's
key, and the row's `info` says where (or why not). The trace is torch.profiler's Chrome trace of
a few training steps taken after the timed epochs, never inside them: open it in chrome://tracing or https://ui.perfetto.dev.
The snapshot records the CUDA caching allocator's history over the cell's first optimizer step
(forward, backward, Adam's state allocated): drag it onto https://pytorch.org/memory_viz. The CPU
has no allocator history to record; the row says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PROFILED_STEPS = 3  # after one untraced step, so the trace shows steady state rather than first-call setup


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
            self.note = (
                "not recorded: torch records the history of the CUDA caching allocator only; this cell ran "
                "on the CPU"
            )
            return False
        try:
            path = self.traces.path("snapshots", f"{self.name}.pickle")
            torch.cuda.memory._dump_snapshot(str(path))
            self.note = str(Path(path).relative_to(self.traces.dir))
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        return False


def profile_steps(
    traces: Traces | None, step: Callable[[], None], device: torch.device, name: str
) -> str | None:
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


def write_timeline(timeline, traces: Traces, name: str) -> str:
    """Write a cell's `trackers.Timeline` under the run directory; its path relative to it."""
    import json

    path = traces.path("timelines", f"{name}.json")
    path.write_text(json.dumps(timeline.to_json()), encoding="utf-8")
    return str(path.relative_to(traces.dir))

"""What runs in a cell's own process: the run options it was given, the fork server's preload, the
child's entry (`cell_main`) that runs `experiment.execute` (or a group of processes) and sends its row back.

    lorabench run --start-method spawn     # each cell's process starts bare instead of forking from the server

The default start method is `forkserver`: each cell forks from a clean server that has only imported
torch, transformers and peft (never from the parent, and never after CUDA was touched), which saves
the ~1.5-5 s of imports per cell that `spawn` pays on 2 cores. Supervision of these processes is in
`runner`.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import resource
import signal
import threading
from dataclasses import dataclass, replace
from typing import Any

import psutil
import torch

from .. import child
from ..errors import InputError
from ..forksafe import keep_out
from ..plan.cells import Cell
from ..plan.flags import Flag, setting
from ..workload import models
from ..workload.methods import method as method_of

START_METHODS = ("forkserver", "spawn")
READY_TIMEOUT_S = 300  # the fork server's imports: ~4 s on 2 cores, minutes on a cold disk
# Imported once by the fork server; every cell process starts with them already loaded.
PRELOAD = ["torch", "lorabench.run.processes"]  # and lorabench.run.experiment, which it imports
PRELOAD_HF = [
    "lorabench.run.preload_hf"
]  # peft and transformers' BERT, ~4 s on 2 cores: only when a cell needs them


class OptionsError(InputError):
    """A run option out of range."""


def _mib(text: str) -> int:
    return int(float(text) * 2**20)


def _ms(text: str) -> float:
    return float(text) / 1e3


@dataclass(frozen=True)
class RunOptions:
    """How cells are run, read here and in each cell's process. Each field is a `lorabench run`
    flag (its metadata carries the spelling and help), validated on construction like a Cell."""

    start_method: str = setting(
        "forkserver",
        "how each cell's fresh process starts (forkserver: forked from a clean "
        "server that preloaded torch/transformers/peft; spawn: a new interpreter per cell)",
        choices=START_METHODS,
    )
    timeout_s: float | None = setting(
        None,
        "",
        Flag("--cell-timeout", "seconds after which a cell is killed (row: timeout)", float, metavar="S"),
    )
    sample_interval_s: float = setting(
        0.01,
        "",
        Flag(
            "--sample-interval-ms",
            "sampling period of the memory samplers (host RSS, NVML, amdsmi); default 10",
            _ms,
            metavar="MS",
        ),
    )
    parallel: int | str = setting(
        "1",
        "cells at a time, one per visible GPU, each pinned by CUDA_VISIBLE_DEVICES / "
        "HIP_VISIBLE_DEVICES (auto: one per GPU; the CPU runs one)",
        metavar="auto|N",
    )
    memory_limit_bytes: int | None = setting(
        None,
        "",
        Flag(
            "--cell-memory-limit",
            "host memory (MiB) a cell's process may map beyond what it holds at its start "
            "(RLIMIT_AS); an allocation past it ends the cell as oom",
            _mib,
            metavar="MIB",
        ),
    )

    profile: bool = False  # --profile, --memory-snapshot (lorabench.measure.traces)
    memory_snapshot: bool = False
    run_dir: str | None = None  # where those go: set by run_cells

    def traces(self):
        """Where a cell writes its timeline and the deep dives asked for (None outside a run directory)."""
        from ..measure.traces import Traces

        return Traces(self.run_dir, self.profile, self.memory_snapshot) if self.run_dir else None

    def __post_init__(self) -> None:
        for flag, value, unit, scale in (
            ("--cell-timeout", self.timeout_s, "seconds", 1),
            ("--cell-memory-limit", self.memory_limit_bytes, "MiB", 2**20),
            ("--sample-interval-ms", self.sample_interval_s, "ms", 1e-3),
        ):
            if value is not None and not value > 0:
                raise OptionsError(f"{flag} must be > 0 {unit}, got {value / scale:g}")

    def on(self, device: str) -> "RunOptions":
        """These options for a run on `device`, with `parallel` resolved to a number of slots."""
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        try:
            n = max(gpus, 1) if self.parallel == "auto" else int(self.parallel)
        except ValueError:
            raise OptionsError(
                f"--parallel must be auto or a whole number >= 1, got {self.parallel!r}"
            ) from None
        if n < 1:
            raise OptionsError(f"--parallel must be auto or a whole number >= 1, got {n}")
        if n > 1 and device != "cuda":
            raise OptionsError(
                "--parallel > 1 runs one cell per GPU; on the CPU, cells would share cores and distort "
                "each other's timings"
            )
        if n > gpus > 0:
            raise OptionsError(f"--parallel {n}: only {gpus} GPU(s) visible")
        return replace(self, parallel=n)


def quiet_library_warnings() -> None:
    """transformers, peft and bitsandbytes warn about their own deprecations on every model build;
    not ours to fix. (bitsandbytes' start-up log is quietened in `quantization`.)"""
    import warnings

    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|bitsandbytes)(\.|$)")


def start_workers(method: str, cells: list[Cell]) -> None:
    """Start the fork server now, so its imports overlap with the parent's own work."""
    if method == "forkserver":
        from multiprocessing import forkserver

        needs_hf = any(models.uses_transformers(c.model) or method_of(c.method).uses_peft for c in cells)
        mp.get_context("forkserver").set_forkserver_preload(PRELOAD + (PRELOAD_HF if needs_hf else []))
        forkserver.ensure_running()


def workers_ready(method: str) -> None:
    """Return once the fork server `start_workers` started has ended its imports (it forks only
    then: a process started from it answers), so they no longer compete with what is measured next.
    A server that cannot start is left for the cells to report."""
    if method == "forkserver":
        with contextlib.suppress(child.ChildFailed):
            child.call(child.answer, start_method=method, timeout_s=READY_TIMEOUT_S, name="lorabench-ready")


def cell_main(
    cell_dict: dict[str, Any],
    conn,
    options: RunOptions,
    env: dict[str, str],
    known: dict[str, Any],
    step=None,  # experiment.SimulatedStep: what its step time is predicted from
) -> None:
    # Ctrl-C reaches the whole process group; the parent decides what happens to this cell.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A run killed outright takes its cell with it: an orphan would go on training, its row landing
    # after a resume had started the cell again (and its load in every later timing).
    from .processes import die_with_parent

    die_with_parent()
    keep_out()  # a cell's agent forks its processes: nothing it imports may query CUDA (spawn starts bare)
    os.environ.update(env)  # pin the device before CUDA initialises
    if options.memory_limit_bytes:
        # Address space this cell may add beyond what it already maps (libraries, the interpreter):
        # an allocation past it fails in the cell, which records an `oom` row. The step-time
        # calibration is left out of it: its kernels' threads reserve glibc arenas of 64 MiB of
        # address space each, and its buffers leave heap behind (cifar-mlp: about +100 MiB).
        if step is not None:
            from ..measure.trackers import unavailable

            step = None
            known = {
                **known,
                "predicted_step_s": unavailable("--cell-memory-limit: no calibration in a capped cell"),
            }
        limit = psutil.Process().memory_info().vms + options.memory_limit_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    quiet_library_warnings()
    # tqdm (peft's merge_and_unload draws a bar, disabled) would create a multiprocessing lock: a
    # POSIX semaphore that a cell killed on timeout leaves behind. One process needs a thread lock.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    from .experiment import execute
    from .processes import execute_group

    # What the imports made lives as long as the process: out of the collector's sight, so each of
    # a cell's collections (the phases release what came before) walks only what the cell made
    # (0.2 s a collection with transformers and peft imported; about 0.5 s of every cell).
    gc.freeze()
    cell = Cell.from_dict(cell_dict)
    try:
        run = dict(
            on_epoch=lambda rec, total: conn.send(("epoch", vars(rec), total)),
            sample_interval_s=options.sample_interval_s,
            known=known,
            traces=options.traces(),
        )
        row = execute_group(cell, **run) if cell.nproc > 1 else execute(cell, **run, step=step)
        conn.send(("result", row))
    finally:
        conn.close()

"""Process supervision: every cell in a fresh process, one result row per cell, always.

    lorabench run                      # the quick preset, one process per cell

A fresh process per cell means its peak memory belongs to that cell alone, and a crash (an
abort in a kernel, an out-of-memory kill) ends one cell, not the matrix. What runs inside the
cell's process (options, start methods, the fork server's preload) is in `worker`. The child
reports each epoch and its row through a pipe; the parent appends the row (fsync'd) as soon as
the cell ends. A child that dies without reporting becomes a `crashed` (or `oom`) row naming the
signal. What one cell does is in `experiment`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch

from .. import child
from ..child import EXIT_GRACE_S, ChildFailed, end_process
from ..measure import calibration
from ..measure.trackers import unavailable
from ..plan.admission import context_kind
from ..plan.cells import Cell
from ..results.rows import Row, Status
from ..results.rundir import RunDir
from .worker import RunOptions, cell_main


@dataclass
class Progress:
    """Matrix-level progress: tqdm bars on a terminal, nothing otherwise. `predicted` holds each
    cell's predicted seconds (the plan's `dry_run_cell_s`): the bar says how long the rest should
    take, the prediction scaled by how the finished cells' wall time compared with theirs (a cell's
    process start and model build are not in its prediction)."""

    total: int
    enabled: bool
    predicted: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.cells = self.epochs = None
        self.done_predicted = self.done_wall = 0.0
        self.left = dict(self.predicted)
        if self.enabled:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.cells = tqdm(total=self.total, desc="cells", unit="cell", position=0, file=sys.stderr)

    def remaining_s(self) -> float | None:
        """The predicted seconds of the cells not yet done, scaled by the finished cells' wall time
        over their prediction; None where a cell has no prediction."""
        if not self.left or len(self.predicted) < self.total:
            return None
        scale = self.done_wall / self.done_predicted if self.done_predicted > 0 else 1.0
        return sum(self.left.values()) * scale

    def cell_started(self, k: int, cell: Cell) -> None:
        if self.enabled:
            left = self.remaining_s()
            about = f" (about {_minutes(left)} left, predicted)" if left is not None else ""
            self.cells.set_description(f"cell {k}/{self.total}: {cell.model} {cell.label}{about}")
            self.epochs = self._tqdm(
                total=cell.warmup_epochs + cell.epochs,
                desc="  epochs",
                unit="epoch",
                position=1,
                leave=False,
                file=sys.stderr,
            )

    def epoch(self, rec: dict[str, Any]) -> None:
        if self.enabled and self.epochs is not None:
            self.epochs.set_postfix(
                loss=f"{rec['train_loss']:.3f}",
                acc=f"{rec['eval_accuracy']:.3f}",
                timed="yes" if rec["timed"] else "warm-up",
            )
            self.epochs.update(1)

    def cell_done(self, key: str | None = None, wall_s: float = 0.0) -> None:
        if key in self.left:
            self.done_predicted += self.left.pop(key)
            self.done_wall += wall_s
        if self.enabled:
            if self.epochs is not None:
                self.epochs.close()
            self.cells.update(1)

    def close(self) -> None:
        if self.enabled:
            self.cells.close()


def _minutes(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.1f} min"


def _oom_kills() -> int | None:
    """The cgroup's count of OOM-killer kills (cgroup v2), or None where it cannot be read."""
    try:
        for line in open("/sys/fs/cgroup/memory.events", encoding="ascii"):
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


class CellProcess:
    """One cell in a fresh child process; `poll()` until it returns the cell's row."""

    def __init__(
        self,
        cell: Cell,
        options: RunOptions = RunOptions(),
        *,
        env: dict[str, str] | None = None,
        known: dict[str, Any] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        step=None,
    ):
        self.cell, self.timeout_s, self.on_epoch = cell, options.timeout_s, on_epoch
        self.known = known or {}  # figures made before the cell ran; a failure row keeps them too
        ctx = mp.get_context(options.start_method)
        self._recv, send = ctx.Pipe(duplex=False)
        self._oom_before = _oom_kills()
        self.proc = ctx.Process(
            target=cell_main,
            args=(cell.to_dict(), send, options, env or {}, self.known, step),
            name=f"lorabench-{cell.key()}",
        )
        self.proc.start()  # the first start under forkserver waits for the server to boot: not the cell's time
        self.started = time.monotonic()
        send.close()  # the child holds the only writer: EOF on the pipe means it is gone
        self.row: Row | None = None

    def poll(self, wait_s: float = 0.2) -> Row | None:
        """Handle the child's messages for up to `wait_s`; the row once the cell has ended."""
        if self.row is not None:
            return self.row
        if self.timeout_s is not None and time.monotonic() - self.started > self.timeout_s:
            self.kill()
            self.row = self._failure(
                Status.TIMEOUT, "TimeoutError", f"cell exceeded its {self.timeout_s:g} s limit"
            )
            return self.row
        if self._recv.poll(wait_s):
            try:
                msg = self._recv.recv()
            except EOFError:
                return self._ended()
            if msg[0] == "epoch":
                if self.on_epoch:
                    self.on_epoch(msg[1])
                return None
            self.row = msg[1]
            # It has reported and is exiting: let it run its exit handlers (killing it there leaves
            # its semaphores to the resource tracker, which warns), then reap it.
            self.kill(grace_s=EXIT_GRACE_S)
            return self.row
        if not self.proc.is_alive() and not self._recv.poll(0):
            return self._ended()
        return None

    def _ended(self) -> Row:
        """The child is gone without a result: say how it died."""
        self.kill()
        code = self.proc.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            after = _oom_kills()
            if (
                -code == signal.SIGKILL
                and after is not None
                and self._oom_before is not None
                and after > self._oom_before
            ):
                self.row = self._failure(
                    Status.OOM,
                    name,
                    "killed by the kernel's out-of-memory killer (cgroup oom_kill count rose)",
                )
            else:
                self.row = self._failure(Status.CRASHED, name, f"the cell's process died from {name}")
        else:
            self.row = self._failure(
                Status.CRASHED, "ProcessExit", f"the cell's process exited with code {code} without a result"
            )
        return self.row

    def kill(self, grace_s: float = 0.0) -> None:
        """End the child (killing it only if it still runs after `grace_s`), reap it, and release the pipe."""
        end_process(self.proc, grace_s)
        self._recv.close()

    def _failure(self, status: Status, kind: str, message: str) -> Row:
        return Row.failure(self.cell, status, kind, message, self.known)


def _calibrate(device: str, gemms: dict[str, list]) -> dict[str, dict]:
    from ..measure.flops import measure_matmul_flops
    from ..workload.precision import TORCH

    return {
        dtype: measure_matmul_flops(torch.device(device), TORCH[dtype], shapes)
        for dtype, shapes in gemms.items()
    }


def calibrate(device: str, gemms: dict[str, list], start_method: str = "forkserver") -> dict[str, dict]:
    """The device's matmul rate per dtype (FLOP/s, `flops.measure_matmul_flops` on the cells'
    GEMM shapes `gemms[dtype]`), measured once per run in a fresh process on the same device.
    ChildFailed, with the reason, where it could not be measured."""
    return child.call(
        _calibrate, (device, gemms), start_method=start_method, timeout_s=120, name="lorabench-calibrate"
    )


def visible(environ: Mapping[str, str], rocm: bool) -> tuple[list[str] | None, str]:
    """(the ids of the GPUs this process may use, as the variable `pin` sets in a cell reads them;
    None: every GPU) and that variable, composed with what this process inherited as the runtime
    reads it. On ROCm, ROCR_VISIBLE_DEVICES narrows the devices first and HIP numbers what is left;
    HIP_VISIBLE_DEVICES, else CUDA_VISIBLE_DEVICES, picks among them (HIP honours either); with
    ROCR_VISIBLE_DEVICES alone its devices are 0..n-1 to HIP. A cell is pinned by
    HIP_VISIBLE_DEVICES, which overrides CUDA_VISIBLE_DEVICES there: it must name the inherited
    choice, or `CUDA_VISIBLE_DEVICES=2,3` would put cells on GPUs 0 and 1. (torch's own parser,
    torch.cuda._parse_visible_devices, ignores CUDA_VISIBLE_DEVICES when ROCR_VISIBLE_DEVICES is set;
    HIP does not, and HIP decides where a kernel runs.)"""
    entries = lambda var: [e.strip() for e in environ[var].split(",") if e.strip()]
    if not rocm:
        var = "CUDA_VISIBLE_DEVICES"
        return (entries(var) if var in environ else None), var
    for var in ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        if var in environ:
            return entries(var), "HIP_VISIBLE_DEVICES"
    if "ROCR_VISIBLE_DEVICES" in environ:
        return [str(i) for i in range(len(entries("ROCR_VISIBLE_DEVICES")))], "HIP_VISIBLE_DEVICES"
    return None, "HIP_VISIBLE_DEVICES"


def devices(device: str, count: int, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The ids of the `count` GPUs cells are pinned to, of those already visible to this process
    (`visible`); none on the CPU."""
    if device != "cuda":
        return []
    ids, _ = visible(environ, bool(torch.version.hip))
    return (ids if ids is not None else [str(i) for i in range(count)])[:count]


def pin(ids: list[str]) -> dict[str, str]:
    """Environment that shows a cell only its GPUs, by the variable that wins on this platform."""
    return {visible({}, bool(torch.version.hip))[1]: ",".join(ids)} if ids else {}


def keep_context(row: Row) -> None:
    """The runtime context a GPU cell had, kept under its kind for later fit checks (`calibration`)."""
    context, name = row.metrics.get("gpu_context_bytes"), row.environment.get("gpu_name")
    if row.ok and isinstance(context, int) and context > 0 and name:
        runtime = "HIP" if row.environment.get("hip_runtime") else "CUDA"
        calibration.record_context(
            name, context_kind(row.cell), context, f"{row.environment.get('torch')} ({runtime})"
        )


def run_cells(
    run: RunDir,
    cells: list[Cell],
    known: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    options: RunOptions,
    progress: bool,
    gemms: dict[str, list] | None = None,
    steps: dict[str, Any] | None = None,
) -> None:
    """Run `cells` into `run`: a skipped cell gets its row at once; the matmul rate is measured
    once (calibration.json); then every cell runs, at most `options.parallel` at a time (one per
    pinned GPU), its row appended the moment it ends. `known[cell key]` holds the figures made
    before it ran (its prediction); `gemms[dtype]` the GEMM shapes the matmul rate is measured on;
    `steps[cell key]` its simulated step (`experiment.SimulatedStep`), its step time predicted from.
    Interrupting (Ctrl-C) kills the running cells."""
    for cell in cells:
        if cell.key() in skipped:
            run.append(
                Row.failure(
                    cell, Status.SKIPPED, "PredictedNotToFit", skipped[cell.key()], known.get(cell.key())
                ).replace(run_id=run.run_id)
            )
    cells = [c for c in cells if c.key() not in skipped]
    if not cells:
        return
    wanted = {c.compute_dtype: [] for c in cells}
    wanted.update({k: v for k, v in (gemms or {}).items() if k in wanted})
    try:
        rates = calibrate(cells[0].device, wanted, options.start_method)
        run.write_calibration({"device": cells[0].device, "rates": rates})
        no_rate = None
    except ChildFailed as e:  # every cell's MFU says why it is missing
        rates, no_rate = {}, unavailable(f"the matmul rate could not be measured: {e}")
    options = replace(options, run_dir=str(run.path))
    predicted = {
        c.key(): known[c.key()]["dry_run_cell_s"]
        for c in cells
        if isinstance(known.get(c.key(), {}).get("dry_run_cell_s"), float)
    }
    bar = Progress(len(cells), progress and options.parallel == 1, predicted)
    # On a GPU host a cell takes one GPU per process, so a cell of `nproc` processes waits for that many.
    on_gpu = cells[0].on_gpu and (options.parallel > 1 or any(c.nproc > 1 for c in cells))
    free = devices(cells[0].device, max(options.parallel, *(c.nproc for c in cells))) if on_gpu else []
    pending = list(enumerate(cells, 1))
    running: dict[CellProcess, list[str]] = {}
    try:
        while pending or running:
            while (
                pending
                and len(running) < options.parallel
                and (not on_gpu or len(free) >= pending[0][1].nproc)
            ):
                k, cell = pending.pop(0)
                taken, free = (free[: cell.nproc], free[cell.nproc :]) if on_gpu else ([], free)
                bar.cell_started(k, cell)
                rate = rates.get(cell.compute_dtype, {}).get("matmul_flops") or no_rate
                extra = {"device_matmul_flops": rate} if rate else {}
                cp = CellProcess(
                    cell,
                    options,
                    env=pin(taken),
                    known={**known.get(cell.key(), {}), **extra},
                    on_epoch=bar.epoch,
                    step=(steps or {}).get(cell.key()),
                )
                running[cp] = taken
            for cp in list(running):
                row = cp.poll(0.2 / len(running))
                if row is None:
                    continue
                free += running.pop(cp)
                wall = time.monotonic() - cp.started
                run.append(row.replace(run_id=run.run_id, wall_s=wall))
                run.write_environment(row.environment)
                keep_context(row)
                bar.cell_done(cp.cell.key(), wall)
    finally:
        for cp in running:  # interrupted: leave no orphan behind
            cp.kill()
        bar.close()

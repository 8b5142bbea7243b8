"""Run a matrix: every cell in a fresh spawned process, one result row per cell, always.

    lorabench run                      # the quick preset, one process per cell

A fresh process per cell means its peak memory belongs to that cell alone, and a crash (an
abort in a kernel, an out-of-memory kill) ends one cell, not the matrix. The default start method
is `forkserver`: each cell forks from a clean server that has only imported torch, transformers
and peft (never from this parent, and never after CUDA was touched), which saves the ~1.5-5 s of
imports per cell that `spawn` pays on 2 cores. `--start-method spawn` is there for the purist. The child reports each
epoch and its final row through a pipe; the parent writes the row (fsync'd) as soon as the
cell ends. A child that dies without reporting becomes a `crashed` row naming the signal.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import data as data_mod
from . import environment, methods, models, results
from .cells import Cell
from .methods import ParamCount
from .stats import Summary
from .trackers import HostMemory, TorchAllocator, unavailable
from .train import EpochRecord, fit

START_METHODS = ("forkserver", "spawn")
# Imported once by the fork server; every cell process starts with them already loaded.
PRELOAD = ["torch", "lorabench.runner", "peft", "transformers.models.bert.modeling_bert"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inspect(cell: Cell) -> ParamCount:
    """Build the cell's model and method on the meta device: exact counts, no memory, milliseconds.
    Raises ModelError / MethodError for a cell that cannot be built (the plan is refused)."""
    with torch.device("meta"):
        bundle = models.build(cell.model, "random")
        return methods.apply(bundle, cell).params


# ---- the child: one cell -------------------------------------------------------------------

def execute(cell: Cell, on_epoch: Callable[[EpochRecord, int], None] | None = None) -> dict[str, Any]:
    """Run one cell in this process and return its row (status, metrics, environment).

    Exceptions become `error` / `oom` rows carrying whatever was measured before them.
    """
    metrics: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        torch.manual_seed(cell.seed)
        device = torch.device(cell.device)
        bundle = models.build(cell.model, cell.weights)
        adapted = methods.apply(bundle, cell)
        model = adapted.module.to(device=device, dtype=DTYPES[cell.dtype])
        p = adapted.params
        metrics.update(params_total=p.total, params_trainable=p.trainable, params_trainable_adapter=p.adapter,
                       params_trainable_full=p.full_trained, params_trainable_pct=p.trainable_pct,
                       lora_targets=len(adapted.targets))
        ds = data_mod.build(bundle.task, samples=cell.samples, eval_samples=cell.eval_samples,
                            seq_len=cell.seq_len, seed=cell.seed, vocab_size=bundle.vocab_size,
                            num_labels=bundle.num_labels).to(device, DTYPES[cell.dtype])
        metrics["data"] = ds.source
        host, alloc = HostMemory(), TorchAllocator(device)
        try:
            # Baselines are taken here: weights and data are already in place.
            with host, alloc:
                result = fit(model, ds, epochs=cell.epochs, warmup_epochs=cell.warmup_epochs,
                             batch_size=cell.batch_size, grad_accum=cell.grad_accum, lr=cell.lr,
                             seed=cell.seed, device=device, on_epoch=on_epoch)
        finally:
            metrics.update(host.result())
            metrics.update(alloc.result())
        metrics.update(_fit_metrics(result))
        status, error = "ok", None
    except Exception as e:   # the row records the failure; the matrix goes on
        status = "oom" if _is_oom(e) else "error"
        error = {"type": type(e).__name__, "message": str(e).strip().splitlines()[0] if str(e).strip() else "",
                 "traceback": traceback.format_exc().splitlines()[-12:]}
    metrics["cell_wall_s"] = time.perf_counter() - started
    return {"status": status, "error": error, "metrics": metrics, "environment": environment.capture(cell.device)}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError))


def _fit_metrics(f) -> dict[str, Any]:
    epochs = Summary.of(f.timed_epoch_s)
    steps = Summary.of(f.step_s) if f.step_s else None
    last = f.epochs[-1]
    return {
        "epoch_s": epochs.median,
        "epoch_s_all": f.timed_epoch_s,
        "epoch_s_stdev_pct": epochs.stdev_pct,
        "step_s_p50": steps.median if steps else unavailable("no timed steps"),
        "step_s_p90": steps.p90 if steps else unavailable("no timed steps"),
        "step_s_stdev_pct": steps.stdev_pct if steps else unavailable("no timed steps"),
        # true per-step throughput: samples of one optimizer step / its median time
        "samples_per_s": f.samples_per_step / steps.median if steps else unavailable("no timed steps"),
        "steps_per_epoch": f.steps_per_epoch,
        "optimizer": f.optimizer_impl,
        "final_eval_loss": last.eval_loss,
        "final_eval_accuracy": last.eval_accuracy,
        "epochs": [vars(e) for e in f.epochs],
        **f.breakdown_bytes,
    }


def quiet_library_warnings() -> None:
    """transformers and peft warn about their own deprecations on every model build; not ours to fix."""
    import warnings
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft)(\.|$)")


def start_workers(method: str) -> None:
    """Start the fork server now, so its imports overlap with the parent's own work."""
    if method == "forkserver":
        from multiprocessing import forkserver
        mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()


def _child(cell_dict: dict[str, Any], conn) -> None:
    quiet_library_warnings()
    try:
        cell = Cell.from_dict(cell_dict)
        row = execute(cell, on_epoch=lambda rec, total: conn.send(("epoch", vars(rec), total)))
        conn.send(("result", row))
    finally:
        conn.close()


# ---- the parent: the matrix ----------------------------------------------------------------

@dataclass
class Progress:
    """Matrix-level progress: tqdm bars on a terminal, nothing otherwise."""

    total: int
    enabled: bool

    def __post_init__(self):
        self.cells = self.epochs = None
        if self.enabled:
            from tqdm import tqdm
            self._tqdm = tqdm
            self.cells = tqdm(total=self.total, desc="cells", unit="cell", position=0, file=sys.stderr)

    def cell_started(self, k: int, cell: Cell) -> None:
        if self.enabled:
            self.cells.set_description(f"cell {k}/{self.total}: {cell.model} {cell.label}")
            self.epochs = self._tqdm(total=cell.warmup_epochs + cell.epochs, desc="  epochs", unit="epoch",
                                     position=1, leave=False, file=sys.stderr)

    def epoch(self, rec: dict[str, Any]) -> None:
        if self.enabled and self.epochs is not None:
            self.epochs.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{rec['eval_accuracy']:.3f}",
                                    timed="yes" if rec["timed"] else "warm-up")
            self.epochs.update(1)

    def cell_done(self) -> None:
        if self.enabled:
            if self.epochs is not None:
                self.epochs.close()
            self.cells.update(1)

    def close(self) -> None:
        if self.enabled:
            self.cells.close()


def run_cell(cell: Cell, progress: Progress, timeout_s: float | None = None,
             start_method: str = "forkserver") -> dict[str, Any]:
    """Run `cell` in a fresh child; always return a row body (status, error, metrics, environment)."""
    ctx = mp.get_context(start_method)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(cell.to_dict(), send), name=f"lorabench-{cell.key()}")
    proc.start()
    send.close()   # the child holds the only writer: EOF on `recv` means it is gone
    body, started = None, time.monotonic()
    try:
        while body is None:
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                proc.kill()
                body = _failure("timeout", "TimeoutError", f"cell exceeded its {timeout_s:g} s limit")
                break
            if recv.poll(0.2):
                try:
                    msg = recv.recv()
                except EOFError:
                    break
                if msg[0] == "epoch":
                    progress.epoch(msg[1])
                else:
                    body = msg[1]
            elif not proc.is_alive():
                if not recv.poll(0):
                    break
        proc.join()
    finally:
        if proc.is_alive():   # interrupted (Ctrl-C) or timed out: leave no orphan behind
            proc.kill()
            proc.join()
        recv.close()
    if body is None:
        code = proc.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            status = "oom" if -code == signal.SIGKILL else "crashed"
            msg = f"the cell's process died from {name}" + (
                " (SIGKILL: most often the kernel's out-of-memory killer)" if -code == signal.SIGKILL else "")
            body = _failure(status, name, msg)
        else:
            body = _failure("crashed", "ProcessExit", f"the cell's process exited with code {code} without a result")
    return body


def _failure(status: str, kind: str, message: str) -> dict[str, Any]:
    return {"status": status, "error": {"type": kind, "message": message, "traceback": []},
            "metrics": {}, "environment": {}}


def make_row(run_id: str, cell: Cell, body: dict[str, Any], wall_s: float) -> dict[str, Any]:
    return {"schema": results.SCHEMA, "run_id": run_id, "cell_key": cell.key(), "cell": cell.to_dict(),
            "label": cell.label, "wall_s": wall_s, **body}


def run_matrix(cells: list[Cell], run_dir: Path, run_id: str, *, progress: bool,
               timeout_s: float | None = None, start_method: str = "forkserver") -> list[dict[str, Any]]:
    """Run every cell, appending each row to run_dir/results.jsonl the moment it ends."""
    bar = Progress(len(cells), progress)
    rows = []
    try:
        for k, cell in enumerate(cells, 1):
            bar.cell_started(k, cell)
            t0 = time.perf_counter()
            body = run_cell(cell, bar, timeout_s, start_method)
            row = make_row(run_id, cell, body, time.perf_counter() - t0)
            results.append_row(run_dir, row)
            if k == 1 or not (run_dir / results.ENVIRONMENT_FILE).exists():
                if row["environment"]:
                    results.write_json(run_dir / results.ENVIRONMENT_FILE, row["environment"])
            rows.append(row)
            bar.cell_done()
    finally:
        bar.close()
    return rows

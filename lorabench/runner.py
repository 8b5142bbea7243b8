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
from contextlib import ExitStack
import os
import resource
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

from . import data as data_mod
from . import environment, methods, models, results
from .cells import Cell
from .methods import ParamCount
from .predictions import Prediction, predict
from .stats import Summary
from .trackers import (AmdsmiMemory, EnergyMeter, HostMemory, NvmlMemory, TorchAllocator, amdsmi_energy,
                       amdsmi_handle, device_identity, measure_matmul_flops, nvml_energy, nvml_handle,
                       unavailable, unavailable_energy)
from .train import EpochRecord, compute_loss, fit

START_METHODS = ("forkserver", "spawn")
# Imported once by the fork server; every cell process starts with them already loaded.
PRELOAD = ["torch", "lorabench.runner"]
PRELOAD_HF = ["peft", "transformers.models.bert.modeling_bert"]   # ~4 s on 2 cores: only when a cell needs them

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Survey:
    """What is known of a cell before it runs."""

    params: ParamCount
    task: str
    prediction: Prediction


def survey(cell: Cell) -> Survey:
    """Build the cell's model and method on the meta device: exact counts and the closed-form
    prediction, no memory, milliseconds. Raises ModelError / MethodError for a cell that cannot
    be built (the plan is refused)."""
    with torch.device("meta"):
        bundle = models.build(cell.model, "random", cell.task)
        adapted = methods.apply(bundle, cell)
        pred = predict(adapted.module, adapted.params, method=cell.method, task=bundle.task,
                       batch_size=cell.batch_size, grad_accum=cell.grad_accum, seq_len=cell.seq_len, dtype=cell.dtype)
        return Survey(adapted.params, bundle.task, pred)


def inspect(cell: Cell) -> ParamCount:
    """Exact parameter counts of a cell, built on the meta device."""
    return survey(cell).params


def matrix_id(cells: list[Cell]) -> str:
    """Identity of a whole matrix (before sharding): shards of one matrix share it."""
    import hashlib
    return hashlib.sha256("\n".join(c.key() for c in cells).encode()).hexdigest()[:16]


def predicted_cost(cell: Cell, s: Survey) -> float:
    """Predicted training FLOPs of the whole cell (balances shards)."""
    steps = cell.samples // (cell.batch_size * cell.grad_accum)
    return s.prediction.flops_per_step * steps * (cell.epochs + cell.warmup_epochs + cell.pretrain_epochs)


# ---- the child: one cell -------------------------------------------------------------------

def driver_trackers(device: torch.device, interval_s: float) -> tuple[list, EnergyMeter, dict[str, Any]]:
    """Device-level trackers for a GPU cell: NVML on CUDA builds, amdsmi on ROCm builds, each matched
    to torch's device by UUID / PCI bus id. What cannot be had is reported as unavailable, with why."""
    if device.type != "cuda":
        return [], unavailable_energy("no energy counter is read on the CPU"), {}
    ident = device_identity(device.index or 0)
    rocm = bool(torch.version.hip)
    try:
        if rocm:
            import amdsmi
            amdsmi.amdsmi_init()
            handle = amdsmi_handle(amdsmi, ident)
            return [AmdsmiMemory(amdsmi, handle, interval_s)], amdsmi_energy(amdsmi, handle), {
                "gpu_driver_view": "amdsmi", "gpu_driver": _amd_driver_version(amdsmi, handle)}
        import pynvml
        pynvml.nvmlInit()
        handle = nvml_handle(pynvml, device.index or 0, ident)
        return [NvmlMemory(pynvml, handle, interval_s)], nvml_energy(pynvml, handle), {
            "gpu_driver_view": "NVML", "gpu_driver": pynvml.nvmlSystemGetDriverVersion()}
    except Exception as e:   # ImportError, a driver error, permissions, an unmappable device
        lib = "amdsmi" if rocm else "NVML"
        reason = unavailable(f"{lib}: {type(e).__name__}: {e}")
        keys = (("amdsmi_process_peak_bytes", "amdsmi_device_vram_used_peak_bytes") if rocm
                else ("nvml_process_peak_bytes", "nvml_device_used_peak_bytes"))
        return [], unavailable_energy(f"{lib} unavailable"), {k: reason for k in keys}


def _amd_driver_version(amdsmi, handle) -> str:
    try:
        return str(amdsmi.amdsmi_get_gpu_driver_info(handle)["driver_version"])
    except Exception as e:   # an older amdsmi without the call, or the query not supported
        return unavailable(f"amdsmi driver info: {type(e).__name__}: {e}")


def execute(cell: Cell, on_epoch: Callable[[EpochRecord, int], None] | None = None,
            sample_interval_s: float = 0.01) -> dict[str, Any]:
    """Run one cell in this process and return its row (status, metrics, environment).

    Exceptions become `error` / `oom` rows carrying whatever was measured before them.
    """
    metrics: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        torch.manual_seed(cell.seed)
        device, dtype = torch.device(cell.device), DTYPES[cell.dtype]
        # Built before the model loads, so the device's used memory "before" is others' load.
        drivers, energy, driver_info = driver_trackers(device, sample_interval_s)
        metrics.update(driver_info)
        bundle = models.build(cell.model, cell.weights, cell.task)
        model = bundle.module.to(device=device, dtype=dtype)
        ds = load_data(cell, bundle).to(device, dtype)
        metrics["data"] = ds.source
        if cell.pretrain_epochs:   # seed 002: the base is trained in full first, untimed
            pre = fit(model, ds, epochs=cell.pretrain_epochs, warmup_epochs=0, batch_size=cell.batch_size,
                      grad_accum=cell.grad_accum, lr=cell.lr, seed=cell.seed, device=device)
            metrics["pretrain_epochs"] = [vars(e) for e in pre.epochs]
        probe = {k: v[:min(cell.batch_size, 32)] for k, v in ds.eval.items()}
        forward = lambda m: compute_loss(m, ds.task, probe)[1].float()   # noqa: E731 (logits of one batch)
        metrics["model_file_bytes"] = methods.model_file_bytes(model)
        if cell.method != "full":
            model.eval()
            with torch.no_grad():
                base_out = forward(model)
        adapted = methods.apply(bundle, cell)
        model = adapted.module.to(device=device, dtype=dtype)
        p = adapted.params
        metrics.update(params_total=p.total, params_trainable=p.trainable, params_trainable_adapter=p.adapter,
                       params_trainable_full=p.full_trained, params_trainable_pct=p.trainable_pct,
                       lora_targets=len(adapted.targets))
        trackers = [HostMemory(sample_interval_s), TorchAllocator(device), *drivers]
        try:
            # Baselines are taken here: weights and data are already in place.
            with ExitStack() as stack:
                for t in trackers:
                    stack.enter_context(t)
                result = fit(model, ds, epochs=cell.epochs, warmup_epochs=cell.warmup_epochs,
                             batch_size=cell.batch_size, grad_accum=cell.grad_accum, lr=cell.lr,
                             seed=cell.seed, device=device, on_epoch=on_epoch,
                             on_timed=lambda edge: energy.begin() if edge == "begin" else energy.end())
        finally:
            for t in trackers:
                metrics.update(t.result())
            metrics.update(energy.result())
        if cell.method != "full":   # after the timed region: the module is left merged
            metrics.update(methods.adapter_checks(adapted, cell, forward, base_out))
        # what a fine-tuning run leaves to store: the whole model, or the adapter beside the base
        metrics["checkpoint_bytes"] = metrics.get("adapter_file_bytes", metrics["model_file_bytes"])
        metrics.update(_fit_metrics(result))
        metrics.update(_activations(metrics, device))
        status, error = "ok", None
    except Exception as e:   # the row records the failure; the matrix goes on
        status = "oom" if _is_oom(e) else "error"
        error = {"type": type(e).__name__, "message": str(e).strip().splitlines()[0] if str(e).strip() else "",
                 "traceback": traceback.format_exc().splitlines()[-12:]}
    metrics["cell_wall_s"] = time.perf_counter() - started
    env = environment.capture(cell.device)
    for key in ("gpu_driver", "gpu_driver_view"):   # facts of the machine, not of the cell: the environment
        if key in metrics:
            env[key] = metrics.pop(key)
    return {"status": status, "error": error, "metrics": metrics, "environment": env}


def load_data(cell: Cell, bundle) -> data_mod.Dataset:
    """The cell's data set: synthetic of the model's task, or the real one at `cell.data`."""
    kw = dict(samples=cell.samples, eval_samples=cell.eval_samples, seq_len=cell.seq_len, seed=cell.seed,
              vocab_size=bundle.vocab_size, num_labels=bundle.num_labels)
    if cell.data == "synthetic":
        return data_mod.build(bundle.task, **kw)
    return data_mod.load(cell.data, tokenizer_source=bundle.tokenizer_source, **kw)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    # torch's CPU allocator raises a plain RuntimeError when malloc fails
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def _activations(m: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Activations and temporaries: the peak above weights and data, less gradients and optimizer
    state (all measured). On a GPU from the allocator; on the CPU from sampled RSS, coarser."""
    key = "torch_peak_above_baseline_bytes" if device.type == "cuda" else "host_peak_above_baseline_bytes"
    parts = [m.get(key), m.get("grads_bytes"), m.get("optimizer_state_bytes")]
    if not all(isinstance(v, (int, float)) for v in parts):
        return {}
    return {"activations_bytes": max(parts[0] - parts[1] - parts[2], 0),
            "activations_source": "torch allocator" if device.type == "cuda" else "host RSS (approximate)"}


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


def start_workers(method: str, cells: list[Cell]) -> None:
    """Start the fork server now, so its imports overlap with the parent's own work."""
    if method == "forkserver":
        from multiprocessing import forkserver
        needs_hf = any(c.model != "cifar-mlp" or c.method == "lora" for c in cells)
        mp.get_context("forkserver").set_forkserver_preload(PRELOAD + (PRELOAD_HF if needs_hf else []))
        forkserver.ensure_running()


def _child(cell_dict: dict[str, Any], conn, options: dict[str, Any]) -> None:
    # Ctrl-C reaches the whole process group; the parent decides what happens to this cell.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var, value in options.get("env", {}).items():   # pin the device before CUDA initialises
        os.environ[var] = value
    if options.get("memory_limit_bytes"):
        # Address space this cell may add beyond what it already maps (libraries, the interpreter):
        # an allocation past it fails in the cell, which records an `oom` row.
        vms = psutil.Process().memory_info().vms
        limit = vms + options["memory_limit_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    quiet_library_warnings()
    # tqdm (peft's merge_and_unload draws a bar, disabled) would create a multiprocessing lock: a
    # POSIX semaphore that a cell killed on timeout leaves behind. One process needs a thread lock.
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())
    try:
        cell = Cell.from_dict(cell_dict)
        row = execute(cell, on_epoch=lambda rec, total: conn.send(("epoch", vars(rec), total)),
                      sample_interval_s=options.get("sample_interval_s", 0.01))
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


EXIT_GRACE_S = 10.0   # how long a child that has sent its row may take to exit before it is killed


class CellProcess:
    """One cell in a fresh child process; `poll()` until it returns the row body."""

    def __init__(self, cell: Cell, *, start_method: str = "forkserver", timeout_s: float | None = None,
                 env: dict[str, str] | None = None, memory_limit_bytes: int | None = None,
                 sample_interval_s: float = 0.01, on_epoch: Callable[[dict[str, Any]], None] | None = None):
        self.cell, self.timeout_s, self.on_epoch = cell, timeout_s, on_epoch
        ctx = mp.get_context(start_method)
        self._recv, send = ctx.Pipe(duplex=False)
        self._oom_before = _oom_kills()
        options = {"env": env or {}, "memory_limit_bytes": memory_limit_bytes, "sample_interval_s": sample_interval_s}
        self.proc = ctx.Process(target=_child, args=(cell.to_dict(), send, options), name=f"lorabench-{cell.key()}")
        self.proc.start()   # the first start under forkserver waits for the server to boot: not the cell's time
        self.started = time.monotonic()
        send.close()   # the child holds the only writer: EOF on the pipe means it is gone
        self.body: dict[str, Any] | None = None

    def poll(self, wait_s: float = 0.2) -> dict[str, Any] | None:
        """Handle the child's messages for up to `wait_s`; the row body once the cell has ended."""
        if self.body is not None:
            return self.body
        if self.timeout_s is not None and time.monotonic() - self.started > self.timeout_s:
            self.kill()
            self.body = failure("timeout", "TimeoutError", f"cell exceeded its {self.timeout_s:g} s limit")
            return self.body
        if self._recv.poll(wait_s):
            try:
                msg = self._recv.recv()
            except EOFError:
                return self._ended()
            if msg[0] == "epoch":
                if self.on_epoch:
                    self.on_epoch(msg[1])
                return None
            self.body = msg[1]
            # It has reported and is exiting: let it run its exit handlers (killing it there leaves
            # its semaphores to the resource tracker, which warns), then reap it.
            self.kill(grace_s=EXIT_GRACE_S)
            return self.body
        if not self.proc.is_alive() and not self._recv.poll(0):
            return self._ended()
        return None

    def _ended(self) -> dict[str, Any]:
        """The child is gone without a result: say how it died."""
        self.kill()
        code = self.proc.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            after = _oom_kills()
            if -code == signal.SIGKILL and after is not None and self._oom_before is not None and after > self._oom_before:
                self.body = failure("oom", name, "killed by the kernel's out-of-memory killer (cgroup oom_kill count rose)")
            else:
                self.body = failure("crashed", name, f"the cell's process died from {name}")
        else:
            self.body = failure("crashed", "ProcessExit", f"the cell's process exited with code {code} without a result")
        return self.body

    def kill(self, grace_s: float = 0.0) -> None:
        """End the child (killing it only if it still runs after `grace_s`), reap it, and release the pipe."""
        end_process(self.proc, grace_s)
        self._recv.close()


def end_process(proc, grace_s: float = 0.0) -> None:
    """Give a child `grace_s` to exit on its own (its exit handlers run), then kill it; always reap it."""
    proc.join(grace_s)
    if proc.is_alive():
        proc.kill()
    proc.join()


def failure(status: str, kind: str, message: str) -> dict[str, Any]:
    return {"status": status, "error": {"type": kind, "message": message, "traceback": []},
            "metrics": {}, "environment": {}}


def utilisation(m: dict[str, Any], matmul_flops: float | None) -> dict[str, Any]:
    """Model FLOPs utilisation: predicted training FLOPs per step / median step time, as a share
    of the matmul rate measured on this device at the start of the run."""
    flops, step = m.get("predicted_flops_per_step"), m.get("step_s_p50")
    if not matmul_flops:
        return {}
    out: dict[str, Any] = {"device_matmul_flops": matmul_flops}
    if isinstance(flops, (int, float)) and isinstance(step, (int, float)) and step > 0:
        out["achieved_flops"] = flops / step
        out["mfu_pct"] = 100.0 * flops / step / matmul_flops
    return out


def _calibrate_child(device: str, dtype: str, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        conn.send(measure_matmul_flops(torch.device(device), DTYPES[dtype]))
    finally:
        conn.close()


def calibrate(device: str, dtype: str, start_method: str = "forkserver") -> float | None:
    """The device's matmul rate (FLOP/s), measured once per run in a fresh process on the same device."""
    ctx = mp.get_context(start_method)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_calibrate_child, args=(device, dtype, send), name="lorabench-calibrate")
    proc.start()
    send.close()
    try:
        return recv.recv() if recv.poll(120) else None
    except EOFError:
        return None
    finally:
        end_process(proc, EXIT_GRACE_S)   # kill only a hung one
        recv.close()


def make_row(run_id: str, cell: Cell, body: dict[str, Any], wall_s: float) -> dict[str, Any]:
    return {"schema": results.SCHEMA, "run_id": run_id, "cell_key": cell.key(), "cell": cell.to_dict(),
            "label": cell.label, "wall_s": wall_s, **body}


def pinning(device: str, slots: int) -> list[dict[str, str]]:
    """Environment for each parallel slot: one visible GPU each, by the variable of the platform."""
    if device != "cuda" or slots <= 1:
        return [{}] * max(slots, 1)
    var = "HIP_VISIBLE_DEVICES" if torch.version.hip else "CUDA_VISIBLE_DEVICES"
    inherited = os.environ.get(var)
    ids = [i.strip() for i in inherited.split(",")] if inherited else [str(i) for i in range(slots)]
    return [{var: ids[i]} for i in range(slots)]


def run_matrix(cells: list[Cell], run_dir: Path, run_id: str, *, progress: bool, timeout_s: float | None = None,
               start_method: str = "forkserver", parallel: int = 1, memory_limit_bytes: int | None = None,
               predicted: dict[str, dict[str, Any]] | None = None, sample_interval_s: float = 0.01,
               matmul_flops: float | None = None) -> list[dict[str, Any]]:
    """Run every cell, at most `parallel` at a time (one per pinned GPU), appending each row to
    run_dir/results.jsonl the moment it ends. Interrupting (Ctrl-C) kills the running cells."""
    bar = Progress(len(cells), progress and parallel == 1)
    slots = pinning(cells[0].device if cells else "cpu", parallel)
    free = list(range(len(slots)))
    pending = list(enumerate(cells, 1))
    running: dict[int, tuple[CellProcess, float]] = {}
    rows = []
    try:
        while pending or running:
            while pending and free:
                slot = free.pop(0)
                k, cell = pending.pop(0)
                bar.cell_started(k, cell)
                cp = CellProcess(cell, start_method=start_method, timeout_s=timeout_s, env=slots[slot],
                                 memory_limit_bytes=memory_limit_bytes, sample_interval_s=sample_interval_s,
                                 on_epoch=bar.epoch)
                running[slot] = (cp, cp.started)
            for slot, (cp, t0) in list(running.items()):
                body = cp.poll(0.2 / len(running))
                if body is None:
                    continue
                del running[slot]
                free.append(slot)
                body["metrics"].update((predicted or {}).get(cp.cell.key(), {}))
                body["metrics"].update(utilisation(body["metrics"], matmul_flops))
                row = make_row(run_id, cp.cell, body, time.monotonic() - t0)
                results.append_row(run_dir, row)
                if row["environment"] and not (run_dir / results.ENVIRONMENT_FILE).exists():
                    results.write_json(run_dir / results.ENVIRONMENT_FILE, row["environment"])
                rows.append(row)
                bar.cell_done()
    finally:
        for cp, _ in running.values():   # interrupted: leave no orphan behind
            cp.kill()
        bar.close()
    return rows

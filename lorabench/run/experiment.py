"""The protocol of one cell, on one page: build, load data, adapt, track, train, check, make the row.

    lorabench run --models cifar-mlp --methods lora --ranks 8      # each cell runs `execute` in its own process

`execute` runs in the cell's own process (see `runner`) and always returns a Row: an exception
becomes an `error` or `oom` row that keeps whatever was measured before it. The order matters:
the driver trackers read the device before the model loads (others' load); the pretraining of
seed 002 runs untimed, before the method is applied; the framework trackers start once weights
and data are in place (their baseline); one probe step does the one-off bookkeeping before the
training loop, which is then left bare; the adapter checks run after the timed region.

A cell of several processes (`--nproc`) runs the same protocol, `measure`, in each of its ranks
(launched by `ranks`, or by torchrun: `python -m lorabench.run.ranks`), with the model wrapped for
its strategy and checked against one process before the first step.
"""

from __future__ import annotations

import gc
import time
import traceback
from contextlib import ExitStack
from typing import Any, Callable

import torch
from torch import nn

from .. import forksafe
from ..errors import first_line
from ..measure import environment, heap, simulation
from ..measure.drivers import driver_trackers, runtime_context
from ..measure.stats import Summary
from ..measure.traces import MemorySnapshot, Traces, profile_steps, write_timeline
from ..measure.trackers import HostMemory, SavedTensors, Timeline, TorchAllocator, Unavailable, unavailable
from ..plan.cells import Cell
from ..results.rows import Row, Status
from ..workload import distributed, methods, models, optimizers, quantization, spec
from ..workload.compiler import Compiled
from ..workload.data import Dataset, load
from ..workload.methods import method as method_of
from ..workload.precision import TORCH, Precision
from ..workload.tasks import Task
from .oom import is_oom
from .train import EpochRecord, Fit, fit, micro_batch


def execute(
    cell: Cell,
    on_epoch: Callable[[EpochRecord, int], None] | None = None,
    sample_interval_s: float = 0.01,
    known: dict[str, Any] | None = None,
    traces: Traces | None = None,
) -> Row:
    """Run a cell of one process here and return its row (a cell of several: `ranks.execute_group`).
    `known` holds figures made before the cell ran (its prediction, the run's matmul rate), so the
    row is whole, derived figures included, the moment it is made."""
    started = time.perf_counter()
    out = measure(cell, None, on_epoch, sample_interval_s, traces)
    measured = {**(known or {}), **out["measured"], "cell_wall_s": time.perf_counter() - started}
    return Row.make(
        cell,
        out["status"],
        measured,
        epochs=out["epochs"],
        pretrain_epochs=out["pretrain"],
        environment=out["env_facts"],
        error=out["error"],
    )


def measure(
    cell: Cell,
    group: distributed.Group | None,
    on_epoch: Callable[[EpochRecord, int], None] | None = None,
    sample_interval_s: float = 0.01,
    traces: Traces | None = None,
) -> dict[str, Any]:
    """The protocol of one cell in this process (one rank of it when `group` is given): {measured,
    epochs, pretrain, env_facts, status, error}. An exception ends it as an error or oom, keeping
    what was measured before."""
    measured: dict[str, Any] = {}
    env_facts: dict[str, str] = {}
    device = None
    epochs: list[dict] = []
    pretrain: list[dict] = []
    error = None
    name = cell.key() + (f"-rank{group.rank}" if group else "")  # of its files under the run directory
    timeline = None
    try:
        torch.manual_seed(cell.seed)
        dtype = TORCH[cell.dtype]
        forksafe.require_clean(torch.device(cell.device))  # one clear line, not a CUDA traceback
        device = group.device(cell.device) if group else torch.device(cell.device)
        if traces is not None:  # memory over the whole cell, with its phases marked
            timeline = Timeline(device)
            timeline.start()
            timeline.mark("build and load")
        mark = timeline.mark if timeline else (lambda label: None)
        if group:
            group.join(device)
        # Built before the model loads, so the device's used memory "before" is others' load.
        drivers, energy, env_facts, missing = driver_trackers(device, sample_interval_s)
        measured.update(missing)
        bundle = spec.base(cell.spec, device)
        task, method, model = bundle.task, method_of(cell.method), bundle.module
        ds = load_data(cell, bundle).to(device, dtype)
        measured["data"] = ds.source
        if cell.pretrain_epochs:  # seed 002: the base is trained in full first, untimed (each rank alike)
            pre = fit(
                model,
                task,
                ds,
                epochs=cell.pretrain_epochs,
                warmup_epochs=0,
                batch_size=cell.batch_size,
                grad_accum=cell.grad_accum,
                lr=cell.lr,
                seed=cell.seed,
                device=device,
            )
            pretrain = [vars(e) for e in pre.epochs]
            del pre  # its optimizer state and gradients are gone before anything is measured
        spec.hold(cell.spec, bundle, device)  # in bits from here on (pretraining ran on the full weights)
        probe = {k: v[: min(cell.batch_size, 32)] for k, v in ds.eval.items()}
        forward = lambda m: task.loss(m, probe)[1].float()  # logits of one batch
        measured["model_file_bytes"] = methods.model_file_bytes(model)
        base_out = None
        if method.adapts:  # the base's outputs, for the adapter-off check after training
            model.eval()
            with torch.no_grad():
                base_out = forward(model)
        adapted = spec.adapt(cell.spec, bundle, device)
        model = trained = adapted.module
        p = adapted.params
        measured.update(
            params_total=p.total,
            params_trainable=p.trainable,
            params_trainable_adapter=p.adapter,
            params_trainable_full=p.full_trained,
            lora_targets=len(adapted.targets),
        )
        if group:
            trained, check = _wrap_checked(model, task, ds, cell, group, device)
            measured.update(check)
        release(model, device)  # pretraining's and the checks' cached blocks must not count as this cell's
        amp = Precision(cell.precision, device)
        compiled = None
        mark("weights and data in place")
        trackers = [HostMemory(sample_interval_s), TorchAllocator(device), *drivers]
        try:
            # Baselines are taken here: weights and data are already in place.
            with ExitStack() as stack:
                for t in trackers:
                    stack.enter_context(t)
                optimizer = optimizers.make(
                    cell.optimizer, [q for q in trained.parameters() if q.requires_grad], cell.lr
                )
                if cell.compiled:  # compiled by a step of its own, so no measured step holds it
                    trained, compiled = torch.compile(trained), Compiled()
                    measured["compile_s"] = compiled.first_step(
                        lambda: probe_step(trained, task, ds, optimizer[0], cell, device, group, False, amp),
                        device,
                    )
                mark("first step (bookkeeping)")
                with MemorySnapshot(
                    traces, device, name
                ) as snapshot:  # the first step's allocations, on request
                    measured.update(probe_step(trained, task, ds, optimizer[0], cell, device, group, amp=amp))
                if group and not group.shards:  # the replicas must agree after a step
                    measured["check_ranks_params_max_abs_diff"] = distributed.params_max_abs_diff(
                        trained, device
                    )
                result = fit(
                    trained,
                    task,
                    ds,
                    epochs=cell.epochs,
                    warmup_epochs=cell.warmup_epochs,
                    batch_size=cell.batch_size,
                    grad_accum=cell.grad_accum,
                    lr=cell.lr,
                    seed=cell.seed,
                    device=device,
                    optimizer=optimizer,
                    on_epoch=_marked(on_epoch, mark),
                    on_timed=lambda edge: (
                        mark("timed epoch" if edge == "begin" else "eval"),
                        compiled and compiled.edge(edge),
                        energy.begin() if edge == "begin" else energy.end(),
                    ),
                    rank=group.rank if group else 0,
                    world=group.world if group else 1,
                    sync=distributed.grad_sync if group else None,
                    after_step=method.step_hook(model),
                    amp=amp,
                )
        finally:
            if timeline is not None:
                timeline.add(trackers)
            for t in trackers:  # one whose start raised has no readings (its error is the row's)
                measured.update(
                    t.result() if t.started else t.unavailable_result(f"{type(t).__name__} did not start")
                )
            measured.update(energy.result())
            if device.type == "cuda":  # what the driver saw beyond the allocator: kept per kind of cell
                measured["gpu_context_bytes"] = (
                    runtime_context(measured, drivers[0].before_is_others)
                    if drivers
                    else unavailable("no driver view of the device")
                )
        mark("after training: trace, checks")
        if compiled:
            measured.update(compiled.result())
        if snapshot.note:
            measured["memory_snapshot"] = snapshot.note
        trace = profile_steps(
            traces,
            lambda: probe_step(trained, task, ds, optimizer[0], cell, device, group, False, amp),
            device,
            name,
        )  # after the timed region, the trackers stopped
        if trace:
            measured["profile_trace"] = trace
        if device.type == "cpu" and (group is None or group.shards):
            # the framework-level peak the CPU has no allocator for, and host RSS without the C
            # library's retention; after the trace, whose timing the trimmed heap's page faults
            # would disturb. On the uncompiled model (the same parameters, sharded in place by FSDP2): a
            # dispatch mode under dynamo would recompile
            measured.update(step_peaks(model, task, ds, optimizer[0], cell, amp))
        held = distributed.held(trained)
        measured["weights_bytes"] = quantization.held_bytes(held)  # a quantised weight's scales included
        measured["trainable_weights_bytes"] = sum(q.nbytes for q in held if q.requires_grad)
        measured.update(fit_metrics(result))
        epochs = [vars(e) for e in result.epochs]
        if result.diverged_at is None:
            measured.update(_checks(cell, method, adapted, trained, forward, base_out, group, device, dtype))
            status = Status.OK
        else:  # a result, not a crash: the row keeps what was measured and says where the loss went
            status = Status.DIVERGED
            last = result.epochs[-1]
            error = {
                "type": "Diverged",
                "message": f"the training loss became {last.train_loss} in epoch "
                f"{result.diverged_at}; training stopped there (try a smaller --lr)",
                "traceback": [],
            }
    except Exception as e:  # the row records the failure; the matrix goes on
        status = Status.OOM if is_oom(e) else Status.ERROR
        error = {
            "type": type(e).__name__,
            "message": str(e).strip().splitlines()[0] if str(e).strip() else "",
            "traceback": [] if isinstance(e, forksafe.BadFork) else traceback.format_exc().splitlines()[-12:],
        }
    if timeline is not None:
        timeline.stop()
        measured["timeline"] = write_timeline(timeline, traces, name)
    # facts of the machine, as this process (this rank, on its own device) sees them
    env_facts = {**_environment(cell, device), **env_facts}
    return {
        "measured": measured,
        "epochs": epochs,
        "pretrain": pretrain,
        "env_facts": env_facts,
        "status": status.value,
        "error": error,
    }


def _environment(cell: Cell, device: torch.device | None) -> dict[str, Any]:
    """environment.capture on the process's own device; its properties left out where the cell
    never reached the device or it has failed (the row must still be made)."""
    try:
        return environment.capture(
            cell.device, device.index or 0 if device is not None else 0, gpu=device is not None
        )
    except Exception as e:  # noqa: BLE001 (a device in an error state: the machine's other facts stand)
        return {
            **environment.capture(cell.device, gpu=False),
            "gpu_properties": f"unavailable: {first_line(e)}",
        }


def _marked(on_epoch, mark):
    """`on_epoch` that first marks the epoch's end on the timeline."""

    def done(record: EpochRecord, total: int) -> None:
        mark(f"epoch {record.epoch} done ({'timed' if record.timed else 'warm-up'})")
        if on_epoch is not None:
            on_epoch(record, total)

    return done


def _checks(cell, method, adapted, trained, forward, base_out, group, device, dtype) -> dict[str, Any]:
    """The method's checks after the timed region, on the leader. FSDP2 holds shards: the leader
    checks a fresh copy of the model loaded with the gathered weights."""
    if group is None:
        return method.checks(adapted, forward, base_out)
    if group.shards:
        whole = distributed.full_state_dict(trained)  # every rank takes part in the gather
        if not group.leader:
            return {}
        _, adapted = spec.build(cell.spec, device)
        adapted.module.load_state_dict(whole)
    return method.checks(adapted, forward, base_out) if group.leader else {}


def _wrap_checked(
    model: nn.Module, task: Task, ds: Dataset, cell: Cell, group: distributed.Group, device: torch.device
) -> tuple[nn.Module, dict[str, float]]:
    """The model wrapped for its strategy, and the loss of the first global micro-batch taken both
    ways before any step: in one process on all of it, and across the ranks on their shards
    (eval mode, so dropout draws no difference). They must agree."""
    b = cell.batch_size
    model.eval()
    with torch.no_grad():
        one = task.loss(model, {k: v[: b * group.world] for k, v in ds.train.items()})[0].item()
        wrapped = distributed.wrap(model, group, device)
        rows = micro_batch(0, group.rank, group.world, b)
        mine = task.loss(wrapped, {k: v[rows] for k, v in ds.train.items()})[0].item()
    distributed.reshard(wrapped)  # before the optimizer is built on its parameters
    model.train()
    return wrapped, {"check_ranks_first_loss_abs_diff": abs(distributed.mean(mine, device) - one)}


def probe_step(
    model: nn.Module,
    task: Task,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    cell: Cell,
    device: torch.device,
    group: distributed.Group | None = None,
    count: bool = True,
    amp: Precision = Precision(),
) -> dict[str, int]:
    """One optimizer step before the training loop, for the one-off bookkeeping: what autograd
    keeps for backward (saved-tensor hooks around the first forward), the gradients' and Adam
    state's bytes, and the allocator at those phase boundaries. It trains like a warm-up step, and
    it allocates Adam's state, so no timed step pays for that. A rank takes its shard of the batch
    and counts the tensors it holds (an FSDP2 shard). With `count=False`, a bare step (what
    --profile traces)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    rank, world = (group.rank, group.world) if group else (0, 1)
    # parameters and the resident data set are not activations
    exclude = {
        distributed.local(t).untyped_storage().data_ptr() for t in (*model.parameters(), *data.train.values())
    }
    out: dict[str, int] = {}
    for m in range(cell.grad_accum):
        rows = micro_batch(m, rank, world, cell.batch_size)
        batch = {k: v[rows] for k, v in data.train.items()}
        with distributed.grad_sync(model, m == cell.grad_accum - 1):
            if m == 0 and count:
                with SavedTensors(exclude) as saved, amp.autocast():
                    loss = task.loss(model, batch)[0]
                out.update(saved.result())
            else:
                with amp.autocast():
                    loss = task.loss(model, batch)[0]
            amp.backward(loss / cell.grad_accum)
    if not count:
        amp.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return out
    out["grads_bytes"] = sum(distributed.local(p.grad).nbytes for p in params if p.grad is not None)
    if device.type == "cuda":  # allocator at the phase boundary: weights + data + grads
        out["torch_allocated_after_first_backward_bytes"] = torch.cuda.memory_allocated(device)
    amp.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    out["optimizer_state_bytes"] = optimizers.held_bytes(optimizer, distributed.local)
    if device.type == "cuda":  # grads freed, optimizer state allocated
        out["torch_allocated_after_first_step_bytes"] = torch.cuda.memory_allocated(device)
    return out


def step_peaks(
    model: nn.Module, task: Task, data: Dataset, optimizer: torch.optim.Optimizer, cell: Cell, amp: Precision
) -> dict[str, int | Unavailable]:
    """The peaks of the second of two more training steps, after the timed region (both cost time
    per operator): `host_tensors_peak_bytes`, the bytes of the torch tensors live at its peak as the simulated step
    counts them (`simulation.LiveTensors` on real tensors), the CPU's framework-level peak; and
    `host_rss_step_peak_bytes`, the tensors it started with plus the rise of host RSS over it with the
    C library's freed heap handed back around every operator (`heap.ReturnedHeap`). Weights and the
    optimizer's state count; the data set does not."""
    batches = [
        {k: v[micro_batch(m, batch_size=cell.batch_size)] for k, v in data.train.items()}
        for m in range(min(cell.grad_accum, 2))
    ]
    model.train()
    for _ in range(2):  # the second is measured: the first pays the dispatch modes' one-time costs
        # (each operator's first trip through Python, ~3 MiB of RSS in a fresh process)
        live, returned = simulation.LiveTensors(), heap.ReturnedHeap()
        with returned:
            simulation.step(
                model, task, batches, optimizer, live, grad_accum=cell.grad_accum, autocast_dtype=amp.cast
            )
    rise = returned.rise_bytes
    return {
        "host_tensors_peak_bytes": live.peak,
        "host_rss_step_peak_bytes": rise if isinstance(rise, Unavailable) else live.start + rise,
    }


def release(model: nn.Module, device: torch.device) -> None:
    """Free what earlier phases left: gradients, collected garbage (a finished optimizer's state),
    and on a GPU the allocator's cached blocks, which would otherwise sit in the cell's reserved
    and driver-view peaks (pretraining's full fine-tuning footprint in a LoRA cell)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_data(cell: Cell, bundle: models.Bundle) -> Dataset:
    """The cell's data set: the task's synthetic stand-in, or the real one at `cell.data`."""
    kw = dict(
        samples=cell.samples,
        eval_samples=cell.eval_samples,
        seq_len=cell.seq_len,
        seed=cell.seed,
        vocab_size=bundle.vocab_size,
        num_labels=bundle.num_labels,
    )
    if cell.synthetic_data:
        return bundle.task.build_data(**kw)
    return load(cell.data, tokenizer_source=bundle.tokenizer_source, **kw)


def fit_metrics(f: Fit) -> dict[str, Any]:
    epochs = Summary.of(f.timed_epoch_s) if f.timed_epoch_s else None
    steps = Summary.of(f.step_s) if f.step_s else None
    none = unavailable(
        "no timed steps"
        if f.diverged_at is None
        else f"no timed steps: training diverged in epoch {f.diverged_at}"
    )
    last = f.epochs[-1]
    return {
        "epoch_s": epochs.median if epochs else none,
        "epoch_s_stdev_pct": epochs.stdev_pct if epochs else none,
        "step_s_p50": steps.median if steps else none,
        "step_s_p90": steps.p90 if steps else none,
        "step_s_stdev_pct": steps.stdev_pct if steps else none,
        "steps_per_epoch": f.steps_per_epoch,
        "samples_per_step": f.samples_per_step,
        "optimizer": f.optimizer_impl,
        "final_eval_loss": last.eval_loss,
        "final_eval_accuracy": last.eval_accuracy,
    }

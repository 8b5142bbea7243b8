"""The protocol of one cell, on one page: build, load data, adapt, track, train, check, make the row.

    lorabench run --models cifar-mlp --methods lora --ranks 8      # each cell runs `execute` in its own process

`execute` runs in the cell's own process (see `runner`) and always returns a Row: an exception
becomes an `error` or `oom` row that keeps whatever was measured before it. The order matters:
the driver trackers read the device before the model loads (others' load); the pretraining of
seed 002 runs untimed, before the method is applied; the framework trackers start once weights
and data are in place (their baseline); one probe step does the one-off bookkeeping before the
training loop, which is then left bare; the adapter checks run after the timed region.

A cell of several processes (`--nproc`) runs the same protocol, `measure`, in each of its processes
(launched by `processes`, or by torchrun: `python -m lorabench.run.processes`), with the model wrapped for
its strategy and checked against one process before the first step.
"""

from __future__ import annotations

import gc
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .. import forksafe
from ..errors import first_line
from ..measure import environment, heap, rates, steptime
from ..measure.drivers import driver_trackers, runtime_context
from ..measure.energy import EnergyMeter
from ..measure.stats import Summary
from ..measure.steptime import SimulatedStep
from ..measure.traces import MemorySnapshot, Traces, profile_steps, write_timeline
from ..measure.trackers import HostMemory, Timeline, TorchAllocator, unavailable
from ..plan.cells import Cell
from ..results.measured import Measured
from ..results.rows import Row, Status
from ..workload import data as datasets
from ..workload import distributed, methods, models, optimizers, quantization, spec
from ..workload.compiler import Compiled
from ..workload.data import ALL, SOURCE, Dataset
from ..workload.methods import method as method_of
from ..workload.precision import TORCH, Precision
from ..workload.tasks import Task
from . import pretraining
from .oom import is_oom
from .probes import probe_step, step_peaks
from .train import EpochRecord, Fit, evaluate, fit, micro_batch


def execute(
    cell: Cell,
    on_epoch: Callable[[EpochRecord, int], None] | None = None,
    sample_interval_s: float = 0.01,
    known: dict[str, Any] | None = None,
    traces: Traces | None = None,
    step: SimulatedStep | None = None,
) -> Row:
    """Run a cell of one process here and return its row (a cell of several: `processes.execute_group`).
    `known` holds figures made before the cell ran (its prediction, the run's matmul rate), so the
    row is whole, derived figures included, the moment it is made; `step`, its simulated step's
    operators, which its step time is predicted from."""
    started = time.perf_counter()
    m = protocol(cell, None, on_epoch, sample_interval_s, traces, step)
    figures = {**(known or {}), **m.figures, "cell_wall_s": time.perf_counter() - started}
    return Row.make(
        cell,
        m.status,
        figures,
        epochs=m.epochs,
        pretrain_epochs=m.pretrain,
        environment=m.env_facts,
        error=m.error,
        curve=m.curve,
    )


@dataclass
class Loaded:
    """The phase that builds and loads: the base model on the device, its data set, and the driver
    trackers, built before the model loads (so the device's use "before" is others' load)."""

    device: torch.device
    bundle: models.Bundle
    data: Dataset
    drivers: list
    energy: EnergyMeter
    source: dict[str, torch.Tensor] | None = None  # the source task's eval split (a trained base's)


@dataclass
class Ready:
    """The phase that adapts: the model as trained (wrapped for its group), the adapted one (its
    checks run on it), and the base's outputs the adapter-off check compares against."""

    model: nn.Module  # adapted, unwrapped
    trained: nn.Module  # what the optimizer steps: the model, or its DDP / FSDP2 wrapping
    adapted: methods.Adapted
    forward: Callable[[nn.Module], torch.Tensor]  # logits of one eval batch
    base_out: torch.Tensor | None


@dataclass
class Trained:
    """The phase that trains inside the trackers: the loop's record and the optimizer."""

    fit: Fit
    optimizer: torch.optim.Optimizer
    compiled: Compiled | None


def protocol(
    cell: Cell,
    group: distributed.Group | None,
    on_epoch: Callable[[EpochRecord, int], None] | None = None,
    sample_interval_s: float = 0.01,
    traces: Traces | None = None,
    step: SimulatedStep | None = None,
) -> Measured:
    """The protocol of one cell in this process (one of its processes when `group` is given), in
    phases: load (build the base, load the data), pretrain (seed 002's base, untimed), adapt (hold
    the base in bits, apply the method, wrap for the group), predict (the step's time, from the
    rates of this process's device), train (inside the trackers: a probe step, then the loop),
    after (a trace, the CPU's step peaks, what is held), check (the method's checks). An exception
    ends it as an error or oom, keeping what was measured before."""
    out = Measured(Status.OK)
    device = None
    name = cell.key() + (f"-process{group.index}" if group else "")  # of its files under the run directory
    timeline = None
    try:
        torch.manual_seed(cell.seed)
        forksafe.require_clean(torch.device(cell.device))  # one clear line, not a CUDA traceback
        device = group.device(cell.device) if group else torch.device(cell.device)
        if traces is not None:  # memory over the whole cell, with its phases marked
            timeline = Timeline(device)
            timeline.start()
            timeline.mark("build and load")
        mark = timeline.mark if timeline else (lambda label: None)
        if group:
            group.join(device)
        loaded = load(cell, device, sample_interval_s, out)
        out.pretrain = pretrain(cell, loaded)
        ready = adapt(cell, loaded, group, out)
        # after the build (a fresh process's first seconds run slow), before the trackers
        if step is not None:  # in the timeline's "build and load" phase, as its memory is
            predict_step(cell, device, step, out)
        mark("weights and data in place")
        trained = train(
            cell, loaded, ready, group, sample_interval_s, traces, name, on_epoch, mark, timeline, out
        )
        mark("after training: trace, checks")
        after(cell, loaded, ready, trained, group, traces, name, out)
        out.epochs = [vars(e) for e in trained.fit.epochs]
        if trained.fit.diverged_at is None:
            out.figures.update(check(cell, loaded, ready, group))
        else:  # a result, not a crash: the row keeps what was measured and says where the loss went
            out.status = Status.DIVERGED
            out.error = {
                "type": "Diverged",
                "message": f"the training loss became {trained.fit.epochs[-1].train_loss} in epoch "
                f"{trained.fit.diverged_at}; training stopped there (try a smaller --lr)",
                "traceback": [],
            }
    except Exception as e:  # the row records the failure; the matrix goes on
        out.status = Status.OOM if is_oom(e) else Status.ERROR
        out.error = {
            "type": type(e).__name__,
            "message": str(e).strip().splitlines()[0] if str(e).strip() else "",
            "traceback": [] if isinstance(e, forksafe.BadFork) else traceback.format_exc().splitlines()[-12:],
        }
    if timeline is not None:
        timeline.stop()
        out.figures["timeline"] = write_timeline(timeline, traces, name)
    # facts of the machine, as this process (on its own device) sees them
    out.env_facts = {**_environment(cell, device), **out.env_facts}
    return out


def load(cell: Cell, device: torch.device, sample_interval_s: float, out: Measured) -> Loaded:
    """Build the driver trackers (before the model loads), make the trained base if the cell starts
    from one and no cell made it before (untimed: `pretraining`), then the base model and the data
    set: the target task's where the cell adapts a trained base, with the source task's eval set
    beside it (for forgetting)."""
    drivers, energy, out.env_facts, missing = driver_trackers(device, sample_interval_s)
    out.figures.update(missing)
    if cell.transfer:
        made = pretraining.ensure(cell.spec, device)
        out.figures["base"] = (
            f"trained base {made.path.name} ("
            + (f"made here in {made.made_s:.1f} s" if made.made_s is not None else "cached")
            + f"; source accuracy {made.source_accuracy:.4f})"
        )
        if made.made_s is not None:
            out.figures["base_made_s"] = made.made_s
        release(None, device)  # what making it cached is not this cell's
    bundle = spec.base(cell.spec, device)
    data = load_data(cell, bundle, cell.data_variant).to(device, TORCH[cell.dtype])
    out.figures["data"] = data.source
    source = None
    if cell.transfer:  # the source task's eval set: what the base knew, before and after
        source = load_data(cell, bundle, SOURCE, samples=1).to(device, TORCH[cell.dtype]).eval
    return Loaded(device, bundle, data, drivers, energy, source)


def pretrain(cell: Cell, loaded: Loaded) -> list[dict]:
    """Seed 002: the base trained in full first, untimed (every process alike); its epochs."""
    if not cell.pretrain_epochs:
        return []
    pre = fit(
        loaded.bundle.module,
        loaded.bundle.task,
        loaded.data,
        epochs=cell.pretrain_epochs,
        warmup_epochs=0,
        batch_size=cell.batch_size,
        grad_accum=cell.grad_accum,
        lr=cell.lr,
        seed=cell.seed,
        device=loaded.device,
    )
    return [vars(e) for e in pre.epochs]  # its optimizer state and gradients go with it


def adapt(cell: Cell, loaded: Loaded, group: distributed.Group | None, out: Measured) -> Ready:
    """Hold the base (in bits, where quantised), read its outputs for the adapter-off check, apply
    the method, count, wrap for the group (checked against one process), free what came before."""
    bundle, device, task = loaded.bundle, loaded.device, loaded.bundle.task
    spec.hold(cell.spec, bundle, device)  # in bits from here on (pretraining ran on the full weights)
    probe = {k: v[: min(cell.batch_size, 32)] for k, v in loaded.data.eval.items()}
    forward = lambda m: task.loss(m, probe)[1].float()  # logits of one batch
    out.figures["model_file_bytes"] = methods.model_file_bytes(bundle.module)
    if loaded.source is not None:  # what the base knows of its source task before it is adapted
        loss, accuracy = evaluate(bundle.module, task, loaded.source, cell.batch_size)
        out.figures.update(source_loss_before=loss, source_accuracy_before=accuracy)
    base_out = None
    if method_of(cell.method).adapts:  # the base's outputs, for the adapter-off check after training
        bundle.module.eval()
        with torch.no_grad():
            base_out = forward(bundle.module)
    adapted = spec.adapt(cell.spec, bundle, device)
    p = adapted.params
    out.figures.update(
        params_total=p.total,
        params_trainable=p.trainable,
        params_trainable_adapter=p.adapter,
        params_trainable_full=p.full_trained,
        lora_targets=len(adapted.targets),
    )
    trained = adapted.module
    if group:
        trained, checked = _wrap_checked(adapted.module, task, loaded.data, cell, group, device)
        out.figures.update(checked)
    release(adapted.module, device)  # pretraining's and the checks' cached blocks are not this cell's
    return Ready(adapted.module, trained, adapted, forward, base_out)


def predict_step(cell: Cell, device: torch.device, step: SimulatedStep, out: Measured) -> None:
    """The step's time, from its simulated operators and the rates of this device measured here, in
    the cell's own process (this machine's speed moves between processes), before the trackers
    start: what the measuring allocated is freed and handed back before they take their baselines.
    (Measured before the model's build instead, the quick preset's bert-tiny step came out 0.82 of
    the measured one, 0.90 after it.)"""
    try:
        found = rates.measure(device, [op for op, _ in step.ops], [cell.compute_dtype], cell.optimizer)
    except (MemoryError, RuntimeError) as e:
        # its operands did not fit in the cell's memory: the cell goes on without a prediction
        why = f"the step-time calibration did not fit in the cell's memory ({type(e).__name__}: {first_line(e)})"
        out.figures["predicted_step_s"] = unavailable(why)
    else:
        predicted = steptime.predict(step.ops, found, step.trained_tensors, cell.optimizer)
        out.figures.update(predicted_step_s=predicted.seconds, predicted_step_by=predicted.said())
    release(None, device)
    if device.type == "cpu":
        heap.hand_back()


def train(
    cell: Cell,
    loaded: Loaded,
    ready: Ready,
    group: distributed.Group | None,
    sample_interval_s: float,
    traces: Traces | None,
    name: str,
    on_epoch: Callable[[EpochRecord, int], None] | None,
    mark: Callable[[str], None],
    timeline: Timeline | None,
    out: Measured,
) -> Trained:
    """Inside the trackers (their baselines: weights and data in place): the optimizer, a compiled
    model's own first step, the probe step, the training loop; every tracker's figures after."""
    device, task, data = loaded.device, loaded.bundle.task, loaded.data
    amp = Precision(cell.precision, device)
    trackers = [HostMemory(sample_interval_s), TorchAllocator(device), *loaded.drivers]
    model, compiled, energy = ready.trained, None, loaded.energy
    try:
        with ExitStack() as stack:
            for t in trackers:
                stack.enter_context(t)
            optimizer, implementation = optimizers.make(
                cell.optimizer, [q for q in model.parameters() if q.requires_grad], cell.lr
            )
            if cell.compiled:  # compiled by a step of its own, so no measured step holds it
                model, compiled = torch.compile(model), Compiled()
                out.figures["compile_s"] = compiled.first_step(
                    lambda: probe_step(model, task, data, optimizer, cell, device, group, False, amp), device
                )
            mark("first step (bookkeeping)")
            with MemorySnapshot(traces, device, name) as snapshot:  # the first step's allocations, on request
                out.figures.update(probe_step(model, task, data, optimizer, cell, device, group, amp=amp))
            if snapshot.note:
                out.figures["memory_snapshot"] = snapshot.note
            if group and not group.shards:  # the replicas must agree after a step
                out.figures["check_ranks_params_max_abs_diff"] = distributed.params_max_abs_diff(
                    model, device
                )
            result = fit(
                model,
                task,
                data,
                epochs=cell.epochs,
                warmup_epochs=cell.warmup_epochs,
                batch_size=cell.batch_size,
                grad_accum=cell.grad_accum,
                lr=cell.lr,
                seed=cell.seed,
                device=device,
                optimizer=(optimizer, implementation),
                on_epoch=_marked(on_epoch, mark),
                on_timed=lambda edge: (
                    mark("timed epoch" if edge == "begin" else "eval"),
                    compiled and compiled.edge(edge),
                    energy.begin() if edge == "begin" else energy.end(),
                ),
                process=group.index if group else 0,
                world=group.world if group else 1,
                sync=distributed.grad_sync if group else None,
                after_step=method_of(cell.method).step_hook(ready.model),
                amp=amp,
                eval_every=cell.eval_every,
            )
    finally:
        if timeline is not None:
            timeline.add(trackers)
        for t in trackers:  # one whose start raised has no readings (its error is the row's)
            out.figures.update(
                t.result() if t.started else t.unavailable_result(f"{type(t).__name__} did not start")
            )
        out.figures.update(energy.result())
        if device.type == "cuda":  # what the driver saw beyond the allocator: kept per kind of cell
            out.figures["gpu_context_bytes"] = (
                runtime_context(out.figures, loaded.drivers[0].before_is_others)
                if loaded.drivers
                else unavailable("no driver view of the device")
            )
    ready.trained = model  # the compiled one, where it was compiled
    return Trained(result, optimizer, compiled)


def after(
    cell: Cell,
    loaded: Loaded,
    ready: Ready,
    trained: Trained,
    group: distributed.Group | None,
    traces: Traces | None,
    name: str,
    out: Measured,
) -> None:
    """After the timed region, the trackers stopped: compilation's figures, a profile trace, the
    CPU's step peaks, the bytes held, the loop's figures."""
    device, task, data = loaded.device, loaded.bundle.task, loaded.data
    amp = Precision(cell.precision, device)
    if trained.compiled:
        out.figures.update(trained.compiled.result())
    trace = profile_steps(
        traces,
        lambda: probe_step(ready.trained, task, data, trained.optimizer, cell, device, group, False, amp),
        device,
        name,
    )
    if trace:
        out.figures["profile_trace"] = trace
    if device.type == "cpu" and (group is None or group.shards):
        # the framework-level peak the CPU has no allocator for, and host RSS without the C
        # library's retention; after the trace, whose timing the trimmed heap's page faults would
        # disturb. On the uncompiled model (the same parameters, sharded in place by FSDP2): a
        # dispatch mode under dynamo would recompile
        out.figures.update(step_peaks(ready.model, task, data, trained.optimizer, cell, amp))
    held = distributed.held(ready.trained)
    out.figures["weights_bytes"] = quantization.weight_bytes(held)  # a quantised weight's scales included
    out.figures["trainable_weights_bytes"] = sum(q.nbytes for q in held if q.requires_grad)
    out.figures.update(fit_metrics(trained.fit))
    out.curve = [vars(p) for p in trained.fit.curve]
    if loaded.source is not None:  # what it still knows of the source task, the adapter on
        loss, accuracy = evaluate(ready.trained, task, loaded.source, cell.batch_size, amp)
        out.figures.update(source_loss_after=loss, source_accuracy_after=accuracy)


def check(cell: Cell, loaded: Loaded, ready: Ready, group: distributed.Group | None) -> dict[str, Any]:
    """The method's checks after training, on the leader. FSDP2 holds shards: the leader checks a
    fresh copy of the model loaded with the gathered weights."""
    method, adapted = method_of(cell.method), ready.adapted
    if group is None:
        return method.checks(adapted, ready.forward, ready.base_out)
    if group.shards:
        whole = distributed.full_state_dict(ready.trained)  # every process takes part in the gather
        if not group.leader:
            return {}
        _, adapted = spec.build(cell.spec, loaded.device)
        adapted.module.load_state_dict(whole)
    return method.checks(adapted, ready.forward, ready.base_out) if group.leader else {}


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


def _wrap_checked(
    model: nn.Module, task: Task, ds: Dataset, cell: Cell, group: distributed.Group, device: torch.device
) -> tuple[nn.Module, dict[str, float]]:
    """The model wrapped for its strategy, and the loss of the first global micro-batch taken both
    ways before any step: in one process on all of it, and across the processes on their shards
    (eval mode, so dropout draws no difference). They must agree."""
    b = cell.batch_size
    model.eval()
    with torch.no_grad():
        one = task.loss(model, {k: v[: b * group.world] for k, v in ds.train.items()})[0].item()
        wrapped = distributed.wrap(model, group, device)
        rows = micro_batch(0, group.index, group.world, b)
        mine = task.loss(wrapped, {k: v[rows] for k, v in ds.train.items()})[0].item()
    distributed.reshard(wrapped)  # before the optimizer is built on its parameters
    model.train()
    return wrapped, {"check_ranks_first_loss_abs_diff": abs(distributed.mean(mine, device) - one)}


def release(model: nn.Module | None, device: torch.device) -> None:
    """Free what earlier phases left: gradients, collected garbage (a finished optimizer's state),
    and on a GPU the allocator's cached blocks, which would otherwise sit in the cell's reserved
    and driver-view peaks (pretraining's full fine-tuning footprint in a LoRA cell)."""
    if model is not None:
        model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_data(cell: Cell, bundle: models.Bundle, variant: str = ALL, samples: int | None = None) -> Dataset:
    """The cell's data set: the task's synthetic stand-in or the digits (every class, or a
    transfer's source or target task: `variant`), or the real one at `cell.data`."""
    kw = dict(
        samples=samples or cell.samples,
        eval_samples=cell.eval_samples,
        seq_len=cell.seq_len,
        seed=cell.seed,
        vocab_size=bundle.vocab_size,
        num_labels=bundle.num_labels,
    )
    if datasets.has_tasks(cell.data):
        return bundle.task.build_data(**kw, variant=variant, name=cell.data)
    return datasets.load(cell.data, tokenizer_source=bundle.tokenizer_source, **kw)


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
        "eval_s": f.eval_s,
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

"""The protocol of one cell, on one page: build, load data, adapt, track, train, check, make the row.

    lorabench run --models cifar-mlp --methods lora --ranks 8      # each cell runs `execute` in its own process

`execute` runs in the cell's own process (see `runner`) and always returns a Row: an exception
becomes an `error` or `oom` row that keeps whatever was measured before it. The order matters:
the driver trackers read the device before the model loads (others' load); the pretraining of
seed 002 runs untimed, before the method is applied; the framework trackers start once weights
and data are in place (their baseline); one probe step does the one-off bookkeeping before the
training loop, which is then left bare; the adapter checks run after the timed region.
"""
from __future__ import annotations

import gc
import time
import traceback
from contextlib import ExitStack
from typing import Any, Callable

import torch
from torch import nn

from . import environment, methods, models
from .cells import Cell
from .data import Dataset, load
from .drivers import driver_trackers
from .methods import METHODS
from .rows import Row, Status
from .stats import Summary
from .tasks import Task
from .trackers import HostMemory, SavedTensors, TorchAllocator, unavailable
from .train import EpochRecord, Fit, fit, make_optimizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def execute(cell: Cell, on_epoch: Callable[[EpochRecord, int], None] | None = None,
            sample_interval_s: float = 0.01, known: dict[str, Any] | None = None) -> Row:
    """Run one cell in this process and return its row. `known` holds figures made before the
    cell ran (its prediction, the run's matmul rate), so the row is whole, derived figures
    included, the moment it is made."""
    measured: dict[str, Any] = dict(known or {})
    env_facts: dict[str, str] = {}
    epochs: list[dict] = []
    pretrain: list[dict] = []
    error = None
    started = time.perf_counter()
    try:
        torch.manual_seed(cell.seed)
        device, dtype = torch.device(cell.device), DTYPES[cell.dtype]
        # Built before the model loads, so the device's used memory "before" is others' load.
        drivers, energy, env_facts, missing = driver_trackers(device, sample_interval_s)
        measured.update(missing)
        bundle = models.build(cell.model, cell.weights, cell.task)
        task, method = bundle.task, METHODS[cell.method]
        model = bundle.module.to(device=device, dtype=dtype)
        ds = load_data(cell, bundle).to(device, dtype)
        measured["data"] = ds.source
        if cell.pretrain_epochs:   # seed 002: the base is trained in full first, untimed
            pre = fit(model, task, ds, epochs=cell.pretrain_epochs, warmup_epochs=0, batch_size=cell.batch_size,
                      grad_accum=cell.grad_accum, lr=cell.lr, seed=cell.seed, device=device)
            pretrain = [vars(e) for e in pre.epochs]
            del pre   # its optimizer state and gradients are gone before anything is measured
        probe = {k: v[:min(cell.batch_size, 32)] for k, v in ds.eval.items()}
        forward = lambda m: task.loss(m, probe)[1].float()   # noqa: E731 (logits of one batch)
        measured["model_file_bytes"] = methods.model_file_bytes(model)
        base_out = None
        if method.adapts:   # the base's outputs, for the adapter-off check after training
            model.eval()
            with torch.no_grad():
                base_out = forward(model)
        adapted = method.apply(bundle, cell.adapter)
        model = adapted.module.to(device=device, dtype=dtype)
        p = adapted.params
        measured.update(params_total=p.total, params_trainable=p.trainable, params_trainable_adapter=p.adapter,
                        params_trainable_full=p.full_trained, lora_targets=len(adapted.targets))
        release(model, device)   # pretraining's and the checks' cached blocks must not count as this cell's
        trackers = [HostMemory(sample_interval_s), TorchAllocator(device), *drivers]
        try:
            # Baselines are taken here: weights and data are already in place.
            with ExitStack() as stack:
                for t in trackers:
                    stack.enter_context(t)
                optimizer = make_optimizer([q for q in model.parameters() if q.requires_grad], cell.lr)
                measured.update(probe_step(model, task, ds, optimizer[0], cell, device))
                result = fit(model, task, ds, epochs=cell.epochs, warmup_epochs=cell.warmup_epochs,
                             batch_size=cell.batch_size, grad_accum=cell.grad_accum, lr=cell.lr, seed=cell.seed,
                             device=device, optimizer=optimizer, on_epoch=on_epoch,
                             on_timed=lambda edge: energy.begin() if edge == "begin" else energy.end())
        finally:
            for t in trackers:
                measured.update(t.result())
            measured.update(energy.result())
        measured["weights_bytes"] = sum(q.nbytes for q in model.parameters())
        measured["trainable_weights_bytes"] = sum(q.nbytes for q in model.parameters() if q.requires_grad)
        measured.update(fit_metrics(result))
        epochs = [vars(e) for e in result.epochs]
        if result.diverged_at is None:
            measured.update(method.checks(adapted, forward, base_out))   # after the timed region; leaves it merged
            status = Status.OK
        else:   # a result, not a crash: the row keeps what was measured and says where the loss went
            status = Status.DIVERGED
            last = result.epochs[-1]
            error = {"type": "Diverged", "message": f"the training loss became {last.train_loss} in epoch "
                     f"{result.diverged_at}; training stopped there (try a smaller --lr)", "traceback": []}
    except Exception as e:   # the row records the failure; the matrix goes on
        status = Status.OOM if _is_oom(e) else Status.ERROR
        error = {"type": type(e).__name__, "message": str(e).strip().splitlines()[0] if str(e).strip() else "",
                 "traceback": traceback.format_exc().splitlines()[-12:]}
    measured["cell_wall_s"] = time.perf_counter() - started
    env = {**environment.capture(cell.device), **env_facts}   # facts of the machine, not of the cell
    return Row.make(cell, status, measured, epochs=epochs, pretrain_epochs=pretrain, environment=env, error=error)


def probe_step(model: nn.Module, task: Task, data: Dataset, optimizer: torch.optim.Optimizer, cell: Cell,
               device: torch.device) -> dict[str, int]:
    """One optimizer step before the training loop, for the one-off bookkeeping: what autograd
    keeps for backward (saved-tensor hooks around the first forward), the gradients' and Adam
    state's bytes, and the allocator at those phase boundaries. It trains like a warm-up step, and
    it allocates Adam's state, so no timed step pays for that."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # parameters and the resident data set are not activations
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *data.train.values())}
    out: dict[str, int] = {}
    for m in range(cell.grad_accum):
        batch = {k: v[m * cell.batch_size:(m + 1) * cell.batch_size] for k, v in data.train.items()}
        if m == 0:
            with SavedTensors(exclude) as saved:
                loss = task.loss(model, batch)[0]
            out.update(saved.result())
        else:
            loss = task.loss(model, batch)[0]
        (loss / cell.grad_accum).backward()
    out["grads_bytes"] = sum(p.grad.nbytes for p in params if p.grad is not None)
    if device.type == "cuda":   # allocator at the phase boundary: weights + data + grads
        out["torch_allocated_after_first_backward_bytes"] = torch.cuda.memory_allocated(device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out["optimizer_state_bytes"] = sum(t.nbytes for st in optimizer.state.values() for t in st.values()
                                       if torch.is_tensor(t))
    if device.type == "cuda":   # grads freed, optimizer state allocated
        out["torch_allocated_after_first_step_bytes"] = torch.cuda.memory_allocated(device)
    return out


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
    kw = dict(samples=cell.samples, eval_samples=cell.eval_samples, seq_len=cell.seq_len, seed=cell.seed,
              vocab_size=bundle.vocab_size, num_labels=bundle.num_labels)
    if cell.data == "synthetic":
        return bundle.task.build_data(**kw)
    return load(cell.data, tokenizer_source=bundle.tokenizer_source, **kw)


def fit_metrics(f: Fit) -> dict[str, Any]:
    epochs = Summary.of(f.timed_epoch_s) if f.timed_epoch_s else None
    steps = Summary.of(f.step_s) if f.step_s else None
    none = unavailable("no timed steps" if f.diverged_at is None else
                       f"no timed steps: training diverged in epoch {f.diverged_at}")
    last = f.epochs[-1]
    return {
        "epoch_s": epochs.median if epochs else none,
        "epoch_s_stdev_pct": epochs.stdev_pct if epochs else none,
        "step_s_p50": steps.median if steps else none,
        "step_s_p90": steps.p90 if steps else none,
        "step_s_stdev_pct": steps.stdev_pct if steps else none,
        "steps_per_epoch": f.steps_per_epoch,
        "optimizer": f.optimizer_impl,
        "final_eval_loss": last.eval_loss,
        "final_eval_accuracy": last.eval_accuracy,
    }


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    # torch's CPU allocator raises a plain RuntimeError when malloc fails
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)

"""The training protocol: warm-up epochs untimed, timed epochs after them, an eval after each.

    lorabench run --models bert-tiny --methods lora --ranks 8 --epochs 3 --warmup-epochs 1

Data is resident on the device; each micro-batch is gathered from it by its slice of a
permutation drawn once per epoch, so no DataLoader worker or host-to-device copy sits inside a
timed step, and no shuffled copy of the whole data set is ever made (one would count as
activations: 1.2 GiB of them on seed-cifar-mlp's 50,000 images). Step times come from CUDA
events on a GPU (recorded without synchronising, read after the epoch's closing synchronize)
and from perf_counter on the CPU, where every op has finished when it returns. Epoch time is
wall time between two device synchronizations. Nothing in the step calls `.item()`, which
would synchronise the device once per step. The loop is the training loop and nothing else: the
one-off memory bookkeeping (saved tensors, phase readings) happens in `probes.probe_step`,
before it, so bench/test_harness_overhead.py compares like with like.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.distributed
from torch import Tensor, nn

from ..workload import optimizers
from ..workload.data import Dataset
from ..workload.precision import Precision
from ..workload.tasks import Task

_NO_CONTEXT = contextlib.nullcontext()  # reusable: one object for every micro-batch of a single process


@dataclass
class EpochRecord:
    epoch: int  # 1-based, warm-up epochs included
    timed: bool
    epoch_s: float
    train_loss: float  # mean over the epoch's micro-batches
    eval_loss: float
    eval_accuracy: float  # classification: accuracy; causal LM: next-token accuracy on unmasked labels


@dataclass
class Point:
    """One evaluation on the way: after `step` optimizer steps and `train_s` seconds of training
    (warm-up epochs included, every evaluation's own time left out)."""

    step: int
    train_s: float
    eval_loss: float
    eval_accuracy: float


@dataclass
class Fit:
    epochs: list[EpochRecord]
    step_s: list[float]  # every optimizer step of the timed epochs
    steps_per_epoch: int
    samples_per_step: int  # batch_size x grad_accum x processes
    optimizer_impl: str
    diverged_at: int | None = None  # the epoch whose training loss was not finite; training stopped there
    curve: list[Point] = field(default_factory=list)  # quality over training time, every evaluation
    eval_s: float = 0.0  # the evaluations' own time, kept out of every epoch and step time

    @property
    def timed_epoch_s(self) -> list[float]:
        return [e.epoch_s for e in self.epochs if e.timed]


def micro_batch(index: int, process: int = 0, world: int = 1, batch_size: int = 1) -> slice:
    """The rows process `process` of `world` takes of global micro-batch `index`: its own `batch_size`
    slice of every batch_size x world rows, so the processes together read each global batch once."""
    lo = (index * world + process) * batch_size
    return slice(lo, lo + batch_size)


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, split: dict[str, Tensor], batch_size: int, amp: Precision = Precision()
) -> tuple[float, float]:
    """(mean loss per batch element, accuracy) over `split`."""
    was_training = model.training
    model.eval()
    n = next(iter(split.values())).shape[0]
    loss_sum = torch.zeros((), device=next(iter(split.values())).device, dtype=torch.float64)
    correct = torch.zeros_like(loss_sum)
    counted = 0
    for i in range(0, n, batch_size):
        batch = {k: v[i : i + batch_size] for k, v in split.items()}
        with amp.autocast():
            loss, logits = task.loss(model, batch)
        loss_sum += loss.double() * batch["labels"].shape[0]
        c, k = task.correct(logits, batch["labels"])
        correct += c
        counted += k
    model.train(was_training)
    return loss_sum.item() / n, correct.item() / max(counted, 1)


class _Clock:
    """Per-step timing: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._pending: list[tuple] = []
        self._t0 = 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending.append((ev,))
        else:
            self._t0 = time.perf_counter()

    def stop(self, out: list[float]) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending[-1] += (ev,)
        else:
            out.append(time.perf_counter() - self._t0)

    def collect(self, out: list[float]) -> None:
        """After `sync()`: turn the recorded event pairs into seconds."""
        out.extend(a.elapsed_time(b) / 1e3 for a, b in self._pending)  # elapsed_time is in ms
        self._pending.clear()


def fit(
    model: nn.Module,
    task: Task,
    data: Dataset,
    *,
    epochs: int,
    warmup_epochs: int,
    batch_size: int,
    grad_accum: int = 1,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device,
    optimizer: tuple[torch.optim.Optimizer, str] | None = None,
    on_epoch: Callable[[EpochRecord, int], None] | None = None,
    on_timed: Callable[[str], None] | None = None,
    process: int = 0,
    world: int = 1,
    sync: Callable[[nn.Module, bool], ContextManager] | None = None,
    after_step: Callable[[int], None] | None = None,
    amp: Precision | None = None,
    eval_every: int = 0,
) -> Fit:
    """Train `model` in place (with `optimizer`, an (optimizer, name) pair, when the caller made
    one); `on_epoch(record, total_epochs)` is called after each epoch, and `on_timed("begin" |
    "end")` at the synchronised edges of each timed epoch (energy counters).

    As process `process` of `world`, every process draws the same permutation and takes its own
    `batch_size` slice of each global micro-batch (batch_size x world); `sync(model, last)` gives
    the context in which a micro-batch's backward reduces gradients only on the step's last one,
    and the epoch's training loss is the mean over processes. `after_step(step)` runs between each
    optimizer step and the zeroing of the gradients (AdaLoRA's rank schedule reads them). `amp`
    is the cell's precision: autocast around each forward, its backward and step (fp32: neither).

    Quality over time: the eval set is evaluated after each epoch and, with `eval_every` > 0, after
    every `eval_every` optimizer steps as well (`Fit.curve`), each evaluation timed between two
    synchronisations and left out of the epoch's time, the steps' and the curve's training time."""
    amp = amp or Precision("fp32", device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, impl = optimizer or optimizers.make(optimizers.DEFAULT, params, lr)
    n = next(iter(data.train.values())).shape[0]
    per_step = batch_size * grad_accum * world
    steps = n // per_step  # the ragged tail is dropped so every step has the same shape
    clock = _Clock(device)
    generator = torch.Generator().manual_seed(seed)
    records: list[EpochRecord] = []
    step_s: list[float] = []
    total_epochs = warmup_epochs + epochs
    curve: list[Point] = []
    trained_s = eval_s = 0.0  # training time so far (evaluations left out); the evaluations' time

    def point(step: int) -> float:
        """Evaluate after `step` optimizer steps; the seconds the evaluation took."""
        clock.sync()
        e0 = time.perf_counter()
        loss, accuracy = evaluate(model, task, data.eval, batch_size, amp)  # .item(): synchronised
        curve.append(Point(step, trained_s + (e0 - t0) - in_epoch_eval, loss, accuracy))
        return time.perf_counter() - e0

    model.train()
    for epoch in range(1, total_epochs + 1):
        timed = epoch > warmup_epochs
        perm = torch.randperm(n, generator=generator).to(device)
        clock.sync()
        if timed and on_timed:
            on_timed("begin")
        t0 = time.perf_counter()
        in_epoch_eval = 0.0
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        epoch_steps: list[float] = []
        for s in range(steps):
            clock.start()
            for m in range(grad_accum):
                idx = perm[micro_batch(s * grad_accum + m, process, world, batch_size)]
                with sync(model, m == grad_accum - 1) if sync is not None else _NO_CONTEXT:
                    with (
                        amp.autocast()
                    ):  # [0]: the logits are not kept alive into the next micro-batch's forward
                        loss = task.loss(model, {k: v[idx] for k, v in data.train.items()})[0]
                    amp.backward(loss / grad_accum)
                loss_sum += loss.detach().float()
            amp.step(optimizer)
            if after_step is not None:
                after_step((epoch - 1) * steps + s)
            optimizer.zero_grad(set_to_none=True)
            clock.stop(epoch_steps)
            done = (epoch - 1) * steps + s + 1
            if eval_every and done % eval_every == 0 and s < steps - 1:  # the epoch's last: below
                in_epoch_eval += point(done)
        clock.sync()
        epoch_s = time.perf_counter() - t0 - in_epoch_eval
        if timed and on_timed:
            on_timed("end")
        clock.collect(epoch_steps)
        if world > 1:  # one training loss for the cell; every process then stops on the same epoch
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= world
        if timed:
            step_s.extend(epoch_steps)
        trained_s += epoch_s
        eval_s += in_epoch_eval
        t0, in_epoch_eval = time.perf_counter(), 0.0  # the epoch's closing evaluation, on the curve too
        eval_s += point(epoch * steps)
        eval_loss, eval_acc = curve[-1].eval_loss, curve[-1].eval_accuracy
        record = EpochRecord(
            epoch, timed, epoch_s, loss_sum.item() / (steps * grad_accum), eval_loss, eval_acc
        )
        records.append(record)
        if on_epoch is not None:
            on_epoch(record, total_epochs)
        if not math.isfinite(record.train_loss):  # diverged: more epochs of NaN measure nothing
            return Fit(records, step_s, steps, per_step, impl, diverged_at=epoch, curve=curve, eval_s=eval_s)
    return Fit(records, step_s, steps, per_step, impl, curve=curve, eval_s=eval_s)

"""How long a matrix takes, before it runs: each cell's step, epoch and whole time, from its simulated
step's operators (`steptime`) and the rates of the device it will run on (`rates`).

    lorabench run --dry-run --preset seed-bert                 # this machine's CPU, measured now
    lorabench run --dry-run --preset seed-bert --target h100   # a GPU you do not have

Where the rates come from, in order: a `--target` accelerator's rates as `lorabench check` recorded
them on one (`calibration`), else its data sheet (`accelerators`); a GPU of this machine, measured
in a child (this process never initialises CUDA); this machine's CPU, measured here. Every
distinct kernel of the cells is timed once on its own operands' layout, shared by the cells that
run it (a LoRA cell and full fine-tuning share most of theirs).

A cell's time is its training steps (warm-up, timed and pretraining epochs) and one probe step
before them (two more on the CPU, for its step peaks), and its evaluations (a forward pass over
the evaluation split at every epoch's end and every `--eval-every` steps). Not in it: the cell's
process start, building the model, loading the data, making a trained base the first time, and
the time-model's own calibration in the cell (a second or two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import child
from ..measure import calibration, rates, simulation, steptime
from ..measure.rates import Rates
from ..measure.steptime import StepTime
from ..measure.trackers import Unavailable, unavailable
from . import accelerators
from .cells import Cell

CALIBRATE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Duration:
    """A cell's predicted times, in seconds."""

    step: StepTime
    epoch_s: float  # the training steps of one epoch
    cell_s: float  # every training step, the probe steps and the evaluations

    def to_metrics(self) -> dict[str, float | str]:
        return {
            "dry_run_step_s": self.step.seconds,
            "dry_run_epoch_s": self.epoch_s,
            "dry_run_cell_s": self.cell_s,
            "dry_run_rates": self.step.rates,
        }


def duration(cell: Cell, step: StepTime) -> Duration:
    """`cell`'s times from its predicted `step`."""
    steps = cell.samples // (cell.batch_size * cell.grad_accum)  # as train.fit: the ragged tail dropped
    epochs = cell.warmup_epochs + cell.epochs
    evaluations = epochs + (steps * epochs // cell.eval_every if cell.eval_every else 0)
    per_sample = step.forward_s / (cell.batch_size * cell.grad_accum)
    probes = 1 + (2 if not cell.on_gpu else 0)
    train = steps * (epochs + cell.pretrain_epochs) * step.seconds
    return Duration(
        step,
        steps * step.seconds,
        train + probes * step.seconds + evaluations * cell.eval_samples * per_sample,
    )


def _ops(simulated) -> list:
    return [op for op, _ in simulated.ops] if isinstance(simulated, simulation.Simulated) else []


def rates_for(cells: list[Cell], surveys: list, target: str | None, start_method: str) -> Rates | Unavailable:
    """The rates the cells are predicted with (see the module's docstring), or why there are none."""
    ops = [op for s in surveys for op in _ops(s.prediction.simulated)]
    dtypes = sorted({c.compute_dtype for c in cells})
    optimizers = list(dict.fromkeys(c.optimizer for c in cells)) or ["adam"]
    if target is not None:
        accelerator = accelerators.find(target)
        for name, record in calibration.known().items():
            if accelerator.matches(name) and record.get("rates"):
                return Rates.from_dict(
                    {**record["rates"], "source": f"recorded by lorabench check ({record.get('torch')})"}
                )
        return accelerator.rates(*rates.hosts(torch.device("cpu"), optimizers))
    device = cells[0].device if cells else "cpu"
    if device == "cpu":
        return rates.measure(torch.device("cpu"), ops, dtypes, optimizers, source="measured by the dry run")
    try:
        return child.call(
            rates.measure,
            (torch.device(device), ops, dtypes, optimizers, None, "measured by the dry run"),
            start_method=start_method,
            timeout_s=CALIBRATE_TIMEOUT_S,
            name="lorabench-rates",
        )
    except child.ChildFailed as e:
        return unavailable(f"the device's rates could not be measured: {e}")


def durations(cells: list[Cell], surveys: list, found: Rates | Unavailable) -> list[Duration | Unavailable]:
    """Each cell's predicted times, or why there are none."""
    out: list[Duration | Unavailable] = []
    for cell, s in zip(cells, surveys):
        simulated = s.prediction.simulated
        if isinstance(found, Unavailable):
            out.append(found)
        elif cell.nproc > 1:
            out.append(unavailable("a cell of several processes: its communication is not in the time model"))
        elif not isinstance(simulated, simulation.Simulated):
            why = simulated.reason if isinstance(simulated, Unavailable) else "the step was not simulated"
            out.append(unavailable(why))
        else:
            step = steptime.predict(simulated.ops, found, simulated.trained_tensors, cell.optimizer)
            out.append(duration(cell, step))
    return out

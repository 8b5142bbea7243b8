"""Make a trained base (`workload.bases`): the model trained in full on its task's source data,
once, saved where every later cell of that model finds it.

    lorabench run --weights trained --models bert-tiny --methods full,lora --ranks 8

A cell that starts from a trained base makes it first if no earlier cell or run did, untimed and
outside every tracker's window, under a file lock, so cells running side by side (one per GPU)
make it once. What the base reached on its source task is saved beside it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock

from ..files import write_json
from ..workload import bases, digits, models
from ..workload.data import SOURCE
from ..workload.spec import Spec
from .train import evaluate, fit


@dataclass(frozen=True)
class Made:
    path: Path
    made_s: float | None  # seconds it took to make here; None: it was made before (cached)
    source_accuracy: float  # what the base reached on its source task's eval set
    source_loss: float


def ensure(spec: Spec, device: torch.device, source: bases.Source | None = None) -> Made:
    """The base of `spec.model`, made on `device` unless it exists already (`source`: how it is
    trained, `bases.SOURCE` by default)."""
    source = source or bases.SOURCE
    task = models.build(spec.model, "random", spec.task).task.name if spec.task is None else spec.task
    file = bases.path(spec.model, task, source, spec.data)
    file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(file) + ".lock"):
        known = bases.about(spec.model, task, source, spec.data)
        if file.exists() and known:
            return Made(file, None, known["source_accuracy"], known["source_loss"])
        t0 = time.perf_counter()
        torch.manual_seed(source.seed)
        bundle = models.build(spec.model, "random", spec.task)
        module = bundle.module.to(device)
        samples = source.samples
        if spec.data == digits.NAME:  # the digits' source half, every training scan of it at most
            samples = min(samples, digits.training_scans(SOURCE))
        data = bundle.task.build_data(
            samples=samples,
            eval_samples=source.eval_samples,
            seq_len=source.seq_len,
            seed=source.seed,
            vocab_size=bundle.vocab_size,
            num_labels=bundle.num_labels,
            variant=SOURCE,
            name=spec.data,
        ).to(device, torch.float32)
        module.requires_grad_(True)
        result = fit(
            module,
            bundle.task,
            data,
            epochs=source.epochs,
            warmup_epochs=0,
            batch_size=source.batch_size,
            lr=source.lr,
            seed=source.seed,
            device=device,
        )
        loss, accuracy = evaluate(module, bundle.task, data.eval, source.batch_size)
        from safetensors.torch import save_model

        tmp = file.with_suffix(".tmp")
        save_model(module, str(tmp))  # tied weights stored once (save_model, not save_file)
        tmp.replace(file)
        made_s = time.perf_counter() - t0
        write_json(
            file.with_suffix(".json"),
            {
                "model": spec.model,
                "task": bundle.task.name,
                "source": asdict(source),
                "data": data.source,
                "source_accuracy": accuracy,
                "source_loss": loss,
                "epochs": [vars(e) for e in result.epochs],
                "made_s": made_s,
                "device": str(device),
            },
        )
        return Made(file, made_s, accuracy, loss)

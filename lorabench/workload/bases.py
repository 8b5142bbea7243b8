"""A pretrained base made offline: the model trained in full on its task's source data, once, and
kept on disk; the cells that start from it (`--weights trained`) then adapt it to the related
target task, so their quality figures compare like with like.

    lorabench run                                   # the quick preset starts from trained bases
    lorabench run --weights trained --models tiny-llama --methods full,lora --ranks 8

A base is kept in the user's cache ($LORABENCH_CACHE, else ~/.cache/lorabench) under bases/, one
safetensors file per model configuration, task and source training (`SOURCE`: its data, seed,
epochs and learning rate are in the file's name through `key`), with a JSON beside it saying how
it was made and what it reached on its source task. A second run reuses it; deleting the folder
makes the next run train it again. `run.pretraining` makes it; `load` reads it into a model built
from the same configuration.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..errors import InputError
from ..files import cache_dir
from .data import SYNTHETIC


@dataclass(frozen=True)
class Source:
    """How a base is trained on its task's source data: full fine-tuning from the configuration's
    random weights (seeded), Adam, this many samples, epochs and this learning rate."""

    samples: int = 2048
    eval_samples: int = 512
    seq_len: int = 64  # tokens per sample of a text task's source data (the target's may differ)
    batch_size: int = 32
    epochs: int = 3
    lr: float = 1e-3
    seed: int = 0  # one base per model for every cell's seed: the seeds' spread is the adaptation's


SOURCE = Source()
VERSION = 3  # of the source tasks' definitions (workload.data): a change makes new bases


class BaseMissing(InputError):
    """A cell asked for a trained base that has not been made."""


def key(model: str, task: str, source: Source | None = None, data: str = SYNTHETIC) -> str:
    """The base's identity: the model, its task, its source training, the data set whose source
    task it learnt (the synthetic stand-in's key leaves it out, as before the digits) and the
    data's version."""
    source = source or SOURCE
    which = {} if data == SYNTHETIC else {"data": data}
    blob = json.dumps(
        {"model": model, "task": task, "source": asdict(source), "version": VERSION, **which}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def path(model: str, task: str, source: Source | None = None, data: str = SYNTHETIC) -> Path:
    """Where the base of `model` for `task` lives: cache/bases/<model>-<key>.safetensors."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")
    return cache_dir() / "bases" / f"{safe}-{key(model, task, source, data)}.safetensors"


def about(model: str, task: str, source: Source | None = None, data: str = SYNTHETIC) -> dict | None:
    """What was recorded when the base was made (its source accuracy and loss, the time it took),
    or None where it has not been made."""
    try:
        return json.loads(path(model, task, source, data).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None


def load(
    module: nn.Module, model: str, task: str, source: Source | None = None, data: str = SYNTHETIC
) -> None:
    """Read the base's weights into `module`, built from the same configuration."""
    from safetensors.torch import load_model

    file = path(model, task, source, data)
    if not file.exists():
        raise BaseMissing(
            f"the trained base of {model} ({task}) has not been made ({file}); `lorabench run` makes it "
            "before its first cell"
        )
    load_model(module, str(file), strict=True, device=str(next(module.parameters()).device))

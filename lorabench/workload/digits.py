"""A real transfer that runs offline: scikit-learn's handwritten digits (1,797 scans of 8x8 pixels,
UCI's optical digits test set), which ship inside the scikit-learn package.

    lorabench run --models cifar-mlp --data sklearn-digits --weights trained --methods full,lora

The source task is the digits 0-4, the target task the digits 5-9 (new classes: the base has seen
the strokes, never these labels); a run on random or published weights takes all ten. Each scan is
scaled to [-1, 1] (as seed 002 normalises CIFAR-10) and enlarged to the image task's 3 x 32 x 32 by
repeating each pixel 4 x 4 in every channel, so every image model takes it. A fixed fifth of each
class is the eval set, the same for every seed; the seed draws the training samples and their
order. There are about 1,440 training scans (about 720 per half): a cell asking for more samples
than its classes have is refused before the run starts.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .data import ALL, DIGITS, SOURCE, TARGET, DataError, Dataset

NAME = DIGITS  # its --data value
CLASSES = {ALL: range(10), SOURCE: range(5), TARGET: range(5, 10)}
EVAL_SHARE = 5  # every fifth scan of a class is held out for evaluation


@functools.cache
def _scans() -> tuple[Tensor, Tensor]:
    """Every scan as a (3, 32, 32) image in [-1, 1], and its digit."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            f"--data {NAME} reads the digits scikit-learn ships; install it: pip install scikit-learn"
        ) from None
    digits = load_digits()  # the package's own file: no download
    x = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0 * 2 - 1  # pixels are 0..16
    x = x.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2).unsqueeze(1).expand(-1, 3, -1, -1)
    return x.contiguous(), torch.as_tensor(digits.target, dtype=torch.long)


def _split(variant: str) -> tuple[Tensor, Tensor]:
    """The indices of the variant's training scans and of its held-out ones."""
    x, y = _scans()
    wanted = torch.isin(y, torch.tensor(list(CLASSES[variant])))
    rank_in_class = torch.zeros_like(y)
    for digit in range(10):
        members = (y == digit).nonzero().flatten()
        rank_in_class[members] = torch.arange(len(members))
    held_out = rank_in_class % EVAL_SHARE == 0
    return (wanted & ~held_out).nonzero().flatten(), (wanted & held_out).nonzero().flatten()


def training_scans(variant: str = ALL) -> int:
    return len(_split(variant)[0])


def load(samples: int, eval_samples: int, seed: int, variant: str = ALL) -> Dataset:
    """`samples` training scans of the variant's classes, drawn by `seed`, and up to
    `eval_samples` of its held-out ones."""
    x, y = _scans()
    train, test = _split(variant)
    test = test[:eval_samples]
    if samples > len(train):
        raise DataError(
            f"--data {NAME}: the {variant} task has {len(train)} training scans, fewer than --samples {samples}"
        )
    take = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:samples]]
    digits = CLASSES[variant]
    return Dataset(
        {"x": x[take], "labels": y[take]},
        {"x": x[test], "labels": y[test]},
        f"scikit-learn's handwritten digits {digits[0]}-{digits[-1]} ({samples} train / {len(test)} test"
        + (
            "; the source task)"
            if variant == SOURCE
            else "; the target task: new classes)"
            if variant == TARGET
            else ")"
        ),
    )

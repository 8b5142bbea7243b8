"""Data sets: tensors resident in memory, built once per cell outside every timed region.

    lorabench run --models cifar-mlp --samples 256     # a synthetic CIFAR-shaped set of 256

Each task has a synthetic stand-in of the real set's shape that a model can learn, so loss and
accuracy move on a machine with no data and no network: CIFAR-shaped images made of a class
prototype plus noise; token sequences whose class is marked by class-specific tokens; and
arithmetic token progressions for causal LM, with the prompt part of each label masked (-100)
as seed 001 does. Real data sets arrive through `--data PATH` (the workloads issue).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100   # label value the loss skips (prompt tokens, padding)


@dataclass
class Dataset:
    task: str
    train: dict[str, Tensor]   # every tensor shares its first dimension (samples)
    eval: dict[str, Tensor]
    source: str                # what the data is, for the report

    def to(self, device: torch.device, dtype: torch.dtype) -> "Dataset":
        """Move to the device once, casting floating inputs to the training dtype."""
        def move(split: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in split.items()}
        return Dataset(self.task, move(self.train), move(self.eval), self.source)


def synthetic_images(n: int, n_eval: int, num_classes: int, generator: torch.Generator) -> Dataset:
    """CIFAR-10-shaped (3, 32, 32) images: 0.15 x prototype(class) + N(0, 1) noise.

    The noise dominates each pixel (as real images vary), but over 3,072 pixels the prototypes
    are separable, so an MLP reaches well above chance within a few hundred steps.
    """
    prototypes = torch.randn(num_classes, 3, 32, 32, generator=generator)

    def split(count: int) -> dict[str, Tensor]:
        labels = torch.randint(num_classes, (count,), generator=generator)
        x = 0.15 * prototypes[labels] + torch.randn(count, 3, 32, 32, generator=generator)
        return {"x": x, "labels": labels}

    return Dataset("image-classification", split(n), split(n_eval),
                   f"synthetic CIFAR-shaped images ({num_classes} class prototypes + noise)")


def synthetic_text_classification(n: int, n_eval: int, seq_len: int, vocab_size: int, num_labels: int,
                                  generator: torch.Generator) -> Dataset:
    """Random token sequences; a sample of class c holds marker token (2 + c) at 4 random places."""
    markers = 4
    if vocab_size < 2 + num_labels + 8:
        raise ValueError(f"vocabulary of {vocab_size} is too small for synthetic text classification")

    def split(count: int) -> dict[str, Tensor]:
        labels = torch.randint(num_labels, (count,), generator=generator)
        ids = torch.randint(2 + num_labels, vocab_size, (count, seq_len), generator=generator)
        places = torch.rand(count, seq_len, generator=generator).argsort(dim=1)[:, :min(markers, seq_len)]
        ids.scatter_(1, places, (2 + labels).unsqueeze(1).expand_as(places))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return Dataset("sequence-classification", split(n), split(n_eval),
                   f"synthetic token sequences ({num_labels} classes marked by class tokens), {seq_len} tokens")


def synthetic_causal_lm(n: int, n_eval: int, seq_len: int, vocab_size: int, generator: torch.Generator) -> Dataset:
    """Arithmetic progressions t_i = (s + d*i) mod V' (V' = min(vocab, 1000), d in 1..7): the
    next token is predictable from the two before it. The first quarter is the prompt: labels -100."""
    modulus = min(vocab_size, 1000)
    prompt = seq_len // 4

    def split(count: int) -> dict[str, Tensor]:
        start = torch.randint(modulus, (count, 1), generator=generator)
        step = torch.randint(1, 8, (count, 1), generator=generator)
        ids = (start + step * torch.arange(seq_len)) % modulus
        labels = ids.clone()
        labels[:, :prompt] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return Dataset("causal-lm", split(n), split(n_eval),
                   f"synthetic token progressions (prompt masked), {seq_len} tokens")


def build(task: str, *, samples: int, eval_samples: int, seq_len: int, seed: int,
          vocab_size: int | None = None, num_labels: int | None = None) -> Dataset:
    """The synthetic data set for `task`; the same seed gives every method the same data."""
    g = torch.Generator().manual_seed(seed)
    if task == "image-classification":
        return synthetic_images(samples, eval_samples, num_labels or 10, g)
    if task == "sequence-classification":
        return synthetic_text_classification(samples, eval_samples, seq_len, vocab_size, num_labels or 2, g)
    if task == "causal-lm":
        return synthetic_causal_lm(samples, eval_samples, seq_len, vocab_size, g)
    raise ValueError(f"no data set for task {task!r}")

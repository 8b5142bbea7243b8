"""Tasks: what a model is trained to do, as objects that own their loss, correctness and data.

    lorabench run --models hf:./my-model --task causal-lm    # picks one of TASKS

A task knows how to run a batch through a model (loss and logits), what counts as a correct
prediction, which learnable synthetic stand-in its data has, how many tokens a sample holds (for
FLOPs and activations), and which PEFT task type its LoRA config takes. Nothing outside this
module compares a task's name: the rest of lorabench looks a task up in TASKS and asks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data, digits


@dataclass(frozen=True)
class Task:
    name: str
    peft_task_type: str | None  # peft.TaskType member name; SEQ_CLS also trains a classifier head in full
    hf_auto_class: str | None  # transformers AutoModel class for bring-your-own models
    classifier: bool  # labels are classes of the whole sample (num_labels applies)
    sequence: bool  # a sample is seq_len tokens; otherwise one input row
    data_kind: str  # the kind of real data set (data.detect) this task reads
    synthetic: Callable[..., data.Dataset]

    def tokens_per_sample(self, seq_len: int) -> int:
        return seq_len if self.sequence else 1

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(loss, logits) for one batch."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        return F.cross_entropy(logits, batch["labels"]), logits

    def loss_saved_bytes(self, rows: int, vocab: int) -> int:
        """Bytes the loss keeps for backward beyond the model's layers (a classifier's few logits: 0)."""
        return 0

    def correct(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        """(number of correct predictions as a tensor, number of predictions)."""
        return (logits.argmax(-1) == labels).sum(), labels.numel()

    def build_data(
        self,
        *,
        samples: int,
        eval_samples: int,
        seq_len: int,
        seed: int,
        vocab_size: int | None = None,
        num_labels: int | None = None,
        variant: str = data.ALL,
        name: str = data.SYNTHETIC,
    ) -> data.Dataset:
        """A data set of this task that has a source and a target task (`data.has_tasks`): its
        synthetic stand-in, or the digits (`name`); the same seed gives every method the same data.
        `variant`: every class, or the source or target task of a transfer (`data.VARIANTS`)."""
        if name == digits.NAME:
            return digits.load(samples, eval_samples, seed, variant)
        g = torch.Generator().manual_seed(seed)
        return self.synthetic(
            samples,
            eval_samples,
            seq_len=seq_len,
            vocab_size=vocab_size,
            num_labels=num_labels,
            generator=g,
            variant=variant,
        )


class ImageClassification(Task):
    def loss(self, model, batch):
        logits = model(batch["x"])
        return F.cross_entropy(logits, batch["labels"]), logits


class CausalLM(Task):
    def loss(self, model, batch):
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]
        )
        return out.loss, out.logits

    def loss_saved_bytes(self, rows, vocab):
        # transformers' loss upcasts the logits to fp32; log_softmax keeps its fp32 output for backward
        return rows * vocab * 4

    def correct(self, logits, labels):
        pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]  # position i predicts token i + 1
        mask = target != data.IGNORE_INDEX
        return (pred[mask] == target[mask]).sum(), int(mask.sum())


TASKS: dict[str, Task] = {
    "image-classification": ImageClassification(
        "image-classification",
        None,
        None,
        classifier=True,
        sequence=False,
        data_kind="cifar10",
        synthetic=lambda n, n_eval, *, num_labels, generator, variant, **_: data.synthetic_images(
            n, n_eval, num_labels or 10, generator, variant
        ),
    ),
    "sequence-classification": Task(
        "sequence-classification",
        "SEQ_CLS",
        "AutoModelForSequenceClassification",
        classifier=True,
        sequence=True,
        data_kind="text-classification",
        synthetic=lambda n, n_eval, *, seq_len, vocab_size, num_labels, generator, variant: (
            data.synthetic_text_classification(
                n, n_eval, seq_len, vocab_size, num_labels or 2, generator, variant
            )
        ),
    ),
    "causal-lm": CausalLM(
        "causal-lm",
        "CAUSAL_LM",
        "AutoModelForCausalLM",
        classifier=False,
        sequence=True,
        data_kind="instructions",
        synthetic=lambda n, n_eval, *, seq_len, vocab_size, generator, variant, **_: data.synthetic_causal_lm(
            n, n_eval, seq_len, vocab_size, generator, variant
        ),
    ),
}


def task_of_data(kind: str) -> Task:
    """The task that a real data set of `kind` (data.detect) trains."""
    return next(t for t in TASKS.values() if t.data_kind == kind)

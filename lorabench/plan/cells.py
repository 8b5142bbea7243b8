"""Experiment cells: one frozen, self-validating dataclass per (model, method, rank, settings).

    lorabench run --help            # the "cell settings" flags are generated from Cell's fields

A cell is pure data: building it validates every field, so a bad matrix is refused before
anything runs or is written. Each settings field carries its CLI spelling and help text in its
metadata, so a new setting is one line here and appears in `lorabench run --help`, the TOML
`[settings]` table and `--resume`'s refusal of matrix flags at once. Matrices and presets are in
`plan`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import InputError
from ..workload import data, precision
from ..workload.checkpointing import CHECKPOINTING
from ..workload.compiler import COMPILE
from ..workload.distributed import DEFAULT_STRATEGY, STRATEGIES
from ..workload.methods import BASELINE, Adapter, MethodError
from ..workload.methods import method as method_of
from ..workload.models import MODELS, WEIGHTS, is_byo
from ..workload.optimizers import OPTIMIZERS
from ..workload.precision import PRECISIONS
from ..workload.quantization import QUANTIZATIONS
from ..workload.settings import Choice, unknown
from ..workload.spec import Spec
from ..workload.tasks import TASKS
from ..workload.zoo import ARCHITECTURES
from ..workload.zoo import NAMES as ZOO
from .axes import AXES
from .flags import Flag, cli_flags, csv_list, int_list, setting

DEVICES: dict[str, Choice] = {
    "cpu": Choice("the host's cores"),
    "cuda": Choice("a CUDA or ROCm GPU (HIP answers to cuda)", on=True),
}


class CellError(InputError):
    """A cell or matrix a user asked for is invalid; the message says why and what is accepted."""


def choices(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


@dataclass(frozen=True)
class Cell:
    """One experiment: train `model` with `method` (at `rank`) under fixed settings.

    `epochs` counts the timed epochs; `warmup_epochs` untimed epochs run before them, so a cell
    trains `warmup_epochs + epochs` epochs in all and evaluates after each one.
    """

    model: str  # the matrix's axes: --models, --methods, --ranks, --repeat
    method: str
    rank: int | None = None  # LoRA rank; None for full fine-tuning
    alpha: float | None = setting(None, "LoRA alpha (default: equal to the rank, scale 1)", parse=float)
    dropout: float = setting(0.0, "LoRA dropout (PEFT)", parse=float)
    targets: tuple[str, ...] | str | None = setting(  # module names, or one regex; None: the model's default
        None,
        "",
        Flag(
            "--targets",
            "LoRA target modules, comma-separated names (PEFT's rule: a module matches when "
            "its name equals one or ends with '.'+one); default: the model's",
            csv_list,
        ),
        Flag(
            "--target-regex",
            r"LoRA targets as one regex matched against whole module names "
            r"(seed 001: '.*\.1.*query_key_value')",
        ),
    )
    modules_to_save: tuple[str, ...] = setting(
        (), "modules trained in full beside the adapters (PEFT)", parse=csv_list
    )
    batch_size: int = setting(
        32,
        "samples per micro-batch (per process); a list is an axis, e.g. 16,32",
        parse=int_list,
        metavar="N[,N...]",
    )
    grad_accum: int = setting(1, "micro-batches per optimizer step", parse=int)
    seq_len: int = setting(
        64,
        "tokens per sample (text models; ignored by the image MLP); a list is an axis, e.g. 128,512",
        parse=int_list,
        metavar="N[,N...]",
    )
    epochs: int = setting(2, "timed epochs per cell", parse=int)
    warmup_epochs: int = setting(1, "untimed epochs before the timed ones", parse=int)
    samples: int = setting(512, "training samples per epoch", parse=int)
    eval_samples: int = setting(256, "samples in the eval pass after each epoch", parse=int)
    lr: float = setting(1e-3, "learning rate of the optimizer", parse=float)
    device: str = setting(
        "cpu",
        "auto: cuda when torch sees a GPU (a ROCm build counts as cuda), else cpu",
        choices=("auto", *DEVICES),
    )
    dtype: str = setting(
        "float32",
        "the older spelling of --precision: float32 = fp32, bfloat16 = bf16, float16 = fp16 "
        "(the dtype weights and Adam's state are kept in)",
        choices=tuple(precision.TORCH),
    )
    precision: str = setting(
        "fp32",
        "the dtype of weights and optimizer state, and of autocast's products (*-mixed: fp32 weights, "
        "16-bit products; fp16-mixed with a GradScaler); a list is an axis (`lorabench list`)",
        parse=csv_list,
        metavar="|".join(PRECISIONS),
    )
    seed: int = setting(
        0,
        "seed of the data, its order and the adapters' initialisation (a trained base is every seed's); "
        "a list is an axis, e.g. 0,1,2: quality figures get their spread",
        parse=int_list,
        metavar="N[,N...]",
    )
    weights: str = setting(
        "random",
        "random (from the configuration, default), trained (lorabench's own base, made once on the task's "
        "source data and cached) or pretrained (published weights)",
        choices=tuple(WEIGHTS),
    )
    data: str = setting(
        "synthetic",
        "synthetic (default), sklearn-digits (the handwritten digits scikit-learn ships: images), a "
        "CIFAR-10 directory, a .csv/.jsonl with text,label, or a .jsonl with instruction,input,output",
    )
    task: str | None = setting(
        None,
        "task of an hf: model when it cannot be inferred from its configuration",
        choices=tuple(t for t in TASKS if TASKS[t].hf_auto_class),
    )
    grad_checkpointing: str = setting(
        "off",
        "recompute each block's activations in backward instead of keeping "
        "them (transformers' own; per Linear for the MLP): off or on; a list is an "
        "axis, e.g. off,on",
        parse=csv_list,
        metavar="|".join(CHECKPOINTING),
    )
    compile: str = setting(
        "off",
        "torch.compile the model (inductor); its compile time is measured apart, before the "
        "first step, and graph breaks counted: off or on; a list is an axis",
        parse=csv_list,
        metavar="|".join(COMPILE),
    )
    quantize: str = setting(
        "none",
        "hold the frozen base's Linear layers (all but the head) in 4-bit NormalFloat "
        "(nf4, QLoRA) or 8 bits (int8) through bitsandbytes, pip install 'lorabench[quant]'; "
        "adapter methods only; a list is an axis",
        parse=csv_list,
        metavar="|".join(QUANTIZATIONS),
    )
    optimizer: str = setting(
        "adam",
        "the optimizer (default adam, the seeds'; the 8-bit ones need pip install 'lorabench[quant]'); "
        "a list is an axis (`lorabench list` describes each)",
        parse=csv_list,
        metavar="|".join(OPTIMIZERS),
    )
    nproc: int = setting(
        1,
        "processes per cell, one per device on a GPU host, launched as torchrun does (gloo on the "
        "CPU, nccl/rccl on a GPU); a list is an axis, e.g. 1,2",
        parse=int_list,
        metavar="N[,N...]",
    )
    strategy: str | None = setting(
        None,
        "how the processes of a cell share the model: ddp (a replica each, gradients "
        "all-reduced) or fsdp2 (fully_shard per block / Linear); default ddp; a list is an "
        "axis, e.g. ddp,fsdp2; only for --nproc 2 or more",
        parse=csv_list,
        metavar="|".join(STRATEGIES),
    )
    pretrain_epochs: int = setting(
        0,
        "train the base in full this many epochs before the method, untimed (seed 002 "
        "continues LoRA from trained weights)",
        parse=int,
    )
    eval_every: int = setting(
        0,
        "evaluate every N optimizer steps as well as after each epoch, for quality over time "
        "(0: after each epoch only); the evaluations' time is kept out of the timed figures",
        parse=int,
        metavar="N",
    )
    repeat: int = 0  # index of a repetition of the same cell (--repeat N)

    def __post_init__(self) -> None:
        for name, (kinds, what) in field_types().items():
            value = getattr(self, name)
            # Normalise so equal cells hash equal: lists (from TOML) to tuples, whole numbers to floats.
            if isinstance(value, list) and tuple in kinds:
                object.__setattr__(self, name, value := tuple(value))
            elif (
                isinstance(value, int) and not isinstance(value, bool) and float in kinds and int not in kinds
            ):
                object.__setattr__(self, name, value := float(value))
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise CellError(f"{name} must be {what}, got {value!r}")
        if isinstance(self.targets, tuple) and not all(isinstance(t, str) for t in self.targets):
            raise CellError(f"targets must be module names (strings), got {self.targets!r}")
        if not all(isinstance(t, str) for t in self.modules_to_save):
            raise CellError(f"modules_to_save must be module names (strings), got {self.modules_to_save!r}")
        if self.model not in MODELS and self.model not in ZOO and not is_byo(self.model):
            raise CellError(
                f"unknown model {self.model!r}; choose from {choices(MODELS)}, tiny-<arch> or medium-<arch> "
                f"(arch: {choices(ARCHITECTURES)}) or hf:<dir or hub id>"
            )
        try:
            why = method_of(self.method).conflict(self)
        except MethodError as e:
            why = str(e)
        if why:
            raise CellError(why)
        if self.rank is not None:
            _positive_int("rank", self.rank)
        for name in ("batch_size", "grad_accum", "seq_len", "epochs", "samples", "eval_samples", "nproc"):
            _positive_int(name, getattr(self, name))
        _nonnegative_int("warmup_epochs", self.warmup_epochs)
        _nonnegative_int("pretrain_epochs", self.pretrain_epochs)
        _nonnegative_int("eval_every", self.eval_every)
        if self.task is not None:
            if self.task not in TASKS:
                raise CellError(f"unknown task {self.task!r}; choose from {choices(TASKS)}")
            if not is_byo(self.model):
                raise CellError(f"--task applies to hf: models only; {self.model} knows its task")
        _nonnegative_int("repeat", self.repeat)
        _nonnegative_int("seed", self.seed)
        if self.samples < self.batch_size * self.grad_accum * self.nproc:
            raise CellError(
                f"samples ({self.samples}) must be at least batch_size x grad_accum{' x nproc' * (self.nproc > 1)} "
                f"({self.batch_size * self.grad_accum * self.nproc}) so an epoch has one optimizer step"
            )
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise CellError(f"lr must be a number > 0, got {self.lr!r}")
        for name, (what, registry) in REGISTRIES.items():
            value = getattr(self, name)
            why = None if value is None else unknown(what, value, registry)
            if why:
                raise CellError(why)
        try:  # one cell, one spelling: --dtype bfloat16 is --precision bf16, and the dtype follows a precision
            p, d = precision.resolve(self.precision, self.dtype)
        except ValueError as e:
            raise CellError(str(e)) from None
        object.__setattr__(self, "precision", p)
        object.__setattr__(self, "dtype", d)
        if self.nproc > 1 and self.strategy is None:  # one spelling per cell, so equal cells hash equal
            object.__setattr__(self, "strategy", DEFAULT_STRATEGY)
        for name, (_, registry) in REGISTRIES.items():  # each value says what it asks of the rest
            value = getattr(self, name)
            why = None if value is None else registry[value].conflict(self)
            if why:
                raise CellError(why)

    @property
    def scale(self) -> float | None:
        """LoRA's output scale alpha / r (None for full fine-tuning)."""
        if self.rank is None:
            return None
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def is_baseline(self) -> bool:
        """The method other columns are compared against (full fine-tuning)."""
        return self.method == BASELINE

    @property
    def adapter(self) -> Adapter:
        """What the method is asked to apply."""
        steps = (
            self.samples
            // (self.batch_size * self.grad_accum * self.nproc)
            * (self.warmup_epochs + self.epochs)
        )
        return Adapter(
            self.rank, self.alpha, self.dropout, self.targets, self.modules_to_save, self.model, steps
        )

    @property
    def compute_dtype(self) -> str:
        """The dtype of the step's matrix products: autocast's, or the weights'."""
        return PRECISIONS[self.precision].compute

    # What the settings' values mean, asked of their registries (never compared as spellings).
    @property
    def on_gpu(self) -> bool:
        return DEVICES[self.device].on

    @property
    def checkpointed(self) -> bool:
        return CHECKPOINTING[self.grad_checkpointing].on

    @property
    def compiled(self) -> bool:
        return COMPILE[self.compile].on

    @property
    def quantized(self) -> bool:
        return QUANTIZATIONS[self.quantize].bits is not None

    @property
    def pretrained(self) -> bool:
        """Whether the weights mean something (published ones, or a base lorabench trained) rather
        than the configuration's random ones: whether quality is comparable."""
        return WEIGHTS[self.weights].published or WEIGHTS[self.weights].trained

    @property
    def published_weights(self) -> bool:
        """Whether the weights are published ones, loaded with from_pretrained."""
        return WEIGHTS[self.weights].published

    @property
    def transfer(self) -> bool:
        """Whether the cell adapts a trained base to its task's target (and measures forgetting)."""
        return WEIGHTS[self.weights].trained

    @property
    def data_variant(self) -> str:
        """What of its data set the cell trains on: a transfer's target task, else every class."""
        return data.TARGET if self.transfer else data.ALL

    @property
    def synthetic_data(self) -> bool:
        return data.is_synthetic(self.data)

    @property
    def sharded(self) -> bool:
        """Whether the cell's processes each hold a shard of the model (FSDP2)."""
        return self.strategy is not None and STRATEGIES[self.strategy].shards

    @property
    def spec(self) -> Spec:
        """What the cell trains (`workload.spec`): what the survey, the simulation and the run build."""
        return Spec(
            model=self.model,
            method=self.method,
            adapter=self.adapter,
            weights=self.weights,
            task=self.task,
            dtype=self.dtype,
            quantize=self.quantize,
            checkpointing=self.checkpointed,
            data=self.data,
        )

    @property
    def method_label(self) -> str:
        """The method at its rank: `full`, `lora r=8`, `lora-reparam r=1`."""
        return self.method if self.rank is None else f"{self.method} r={self.rank}"

    @property
    def label(self) -> str:
        """Column name in reports: the method at its rank, then each axis that is not at its quiet
        default (AXES' tags, in their order): `lora r=8`, `lora r=8 ckpt bf16-mixed`, `full fsdp2 n=2`."""
        tags = [
            a.tag(getattr(self, name))
            for name, a in AXES.items()
            if a.tag and not a.is_quiet(getattr(self, name))
        ]
        return " ".join([self.method_label, *tags])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name, a in AXES.items():  # a cell at their defaults keeps the key it had before they were added
            if a.is_quiet(d[name]):
                del d[name]
        if isinstance(d["targets"], tuple):
            d["targets"] = list(d["targets"])
        d["modules_to_save"] = list(d["modules_to_save"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cell":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CellError(f"unknown cell field(s) {', '.join(unknown)}; accepted: {choices(known)}")
        return cls(**d)

    def variant_key(self, across_seeds: bool = False) -> str:
        """Identity of the cell whatever its repeat index: the repeats of one cell share it (and,
        `across_seeds`, its seeds: a report folds them into one variant with their spread)."""
        left_out = ("repeat", "seed") if across_seeds else ("repeat",)
        return json.dumps({k: v for k, v in self.to_dict().items() if k not in left_out}, sort_keys=True)

    def key(self) -> str:
        """Stable identity of the cell across runs (resume, compare, merge): a hash of every field."""
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_WORDS = {int: "a whole number", float: "a number", str: "a string", tuple: "a list of names"}


@functools.cache
def field_types() -> dict[str, tuple[tuple[type, ...], str]]:
    """{field: (accepted types, how a message names them)}, read from Cell's annotations, so a new
    field is checked the moment it is declared."""
    out = {}
    for name, hint in typing.get_type_hints(Cell).items():
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds = tuple(typing.get_origin(o) or o for o in options)
        out[name] = (kinds, " or ".join(_WORDS[k] for k in kinds if k is not type(None)))
    return out


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CellError(f"{name} must be a whole number >= 1, got {value!r}")


def _nonnegative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CellError(f"{name} must be a whole number >= 0, got {value!r}")


# The settings whose values are registry entries: (how a message names the field, its registry).
REGISTRIES: dict[str, tuple[str, dict[str, Any]]] = {
    "device": ("device", DEVICES),
    "dtype": ("dtype", precision.DTYPES),
    "precision": ("precision", PRECISIONS),
    "weights": ("weights", WEIGHTS),
    "quantize": ("quantization", QUANTIZATIONS),
    "optimizer": ("optimizer", OPTIMIZERS),
    "compile": ("compile", COMPILE),
    "grad_checkpointing": ("grad_checkpointing", CHECKPOINTING),
    "strategy": ("strategy", STRATEGIES),
}
CELL_FIELDS = tuple(f.name for f in dataclasses.fields(Cell))
SETTINGS = tuple(f for f in dataclasses.fields(Cell) if cli_flags(f))  # what flags and [settings] may set

"""Experiment cells: one frozen dataclass per (model, method, rank, settings), matrices and presets.

    lorabench run --dry-run --preset quick      # expands the preset below into cells

A cell is pure data: building it validates every field, so a bad matrix is refused before
anything runs or is written. Presets are named tuples of `Matrix` (models x methods x ranks with
shared settings); CLI flags and a TOML file override them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from .methods import METHODS
from .models import MODELS, is_byo

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
WEIGHTS = ("random", "pretrained")


class CellError(ValueError):
    """A cell or matrix a user asked for is invalid; the message says why and what is accepted."""


def _choices(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


@dataclass(frozen=True)
class Cell:
    """One experiment: train `model` with `method` (at `rank`) under fixed settings.

    `epochs` counts the timed epochs; `warmup_epochs` untimed epochs run before them, so a cell
    trains `warmup_epochs + epochs` epochs in all and evaluates after each one.
    """

    model: str
    method: str
    rank: int | None = None           # LoRA rank; None for full fine-tuning
    alpha: float | None = None        # LoRA scale is alpha / rank; None means alpha = rank (scale 1)
    dropout: float = 0.0              # LoRA dropout (PEFT only)
    targets: tuple[str, ...] | str | None = None  # module names, or one regex; None: the model's default
    modules_to_save: tuple[str, ...] = ()         # modules trained in full beside the adapters (PEFT)
    batch_size: int = 32
    grad_accum: int = 1               # micro-batches per optimizer step
    seq_len: int = 64                 # tokens per sample (text models; ignored by the image MLP)
    epochs: int = 2
    warmup_epochs: int = 1
    samples: int = 512                # training samples per epoch
    eval_samples: int = 256
    lr: float = 1e-3
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    weights: str = "random"           # "random": built from the configuration; "pretrained": from_pretrained
    data: str = "synthetic"           # "synthetic" or a path to a local data set
    task: str | None = None           # hf: models only, when the task cannot be inferred
    pretrain_epochs: int = 0          # train the base in full this long before the method (seed 002), untimed
    repeat: int = 0                   # index of a repetition of the same cell (--repeat N)

    def __post_init__(self) -> None:
        # Normalise list-like inputs so equal cells hash equal (targets from TOML arrive as lists).
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.modules_to_save, list):
            object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        if isinstance(self.alpha, int) and not isinstance(self.alpha, bool):
            object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.lr, int) and not isinstance(self.lr, bool):
            object.__setattr__(self, "lr", float(self.lr))
        for name, (types, what) in FIELD_TYPES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, types):
                raise CellError(f"{name} must be {what}, got {value!r}")
        if isinstance(self.targets, tuple) and not all(isinstance(t, str) for t in self.targets):
            raise CellError(f"targets must be module names (strings), got {self.targets!r}")
        if not all(isinstance(t, str) for t in self.modules_to_save):
            raise CellError(f"modules_to_save must be module names (strings), got {self.modules_to_save!r}")
        if self.model not in MODELS and not is_byo(self.model):
            raise CellError(f"unknown model {self.model!r}; choose from {_choices(MODELS)} or hf:<dir or hub id>")
        if self.method not in METHODS:
            raise CellError(f"unknown method {self.method!r}; choose from {_choices(METHODS)}")
        if self.method == "full":
            if self.rank is not None:
                raise CellError("a rank was given to full fine-tuning; ranks apply to the lora methods only")
            if self.targets is not None or self.modules_to_save:
                raise CellError("targets and modules_to_save apply to the lora methods only")
        else:
            if self.rank is None:
                raise CellError(f"method {self.method!r} needs a rank (a whole number >= 1)")
            _positive_int("rank", self.rank)
            if self.alpha is not None and not self.alpha > 0:
                raise CellError(f"alpha must be > 0, got {self.alpha}")
            if not 0.0 <= self.dropout < 1.0:
                raise CellError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("batch_size", "grad_accum", "seq_len", "epochs", "samples", "eval_samples"):
            _positive_int(name, getattr(self, name))
        _nonnegative_int("warmup_epochs", self.warmup_epochs)
        _nonnegative_int("pretrain_epochs", self.pretrain_epochs)
        if self.task is not None:
            from .models import TASKS
            if self.task not in TASKS:
                raise CellError(f"unknown task {self.task!r}; choose from {_choices(TASKS)}")
            if not is_byo(self.model):
                raise CellError(f"--task applies to hf: models only; {self.model} knows its task")
        _nonnegative_int("repeat", self.repeat)
        _nonnegative_int("seed", self.seed)
        if self.samples < self.batch_size * self.grad_accum:
            raise CellError(
                f"samples ({self.samples}) must be at least batch_size x grad_accum "
                f"({self.batch_size * self.grad_accum}) so an epoch has one optimizer step"
            )
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise CellError(f"lr must be a number > 0, got {self.lr!r}")
        if self.device not in DEVICES:
            raise CellError(f"unknown device {self.device!r}; choose from {_choices(DEVICES)}")
        if self.dtype not in DTYPES:
            raise CellError(f"unknown dtype {self.dtype!r}; choose from {_choices(DTYPES)}")
        if self.weights not in WEIGHTS:
            raise CellError(f"unknown weights {self.weights!r}; choose from {_choices(WEIGHTS)}")

    @property
    def scale(self) -> float | None:
        """LoRA's output scale alpha / r (None for full fine-tuning)."""
        if self.rank is None:
            return None
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def label(self) -> str:
        """Column name in reports: `full`, `lora r=8`, `lora-reparam r=1`."""
        return self.method if self.rank is None else f"{self.method} r={self.rank}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["targets"], tuple):
            d["targets"] = list(d["targets"])
        d["modules_to_save"] = list(d["modules_to_save"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cell":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CellError(f"unknown cell field(s) {', '.join(unknown)}; accepted: {_choices(known)}")
        return cls(**d)

    def key(self) -> str:
        """Stable identity of the cell across runs (resume, compare, merge): a hash of every field."""
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_INT, _NUM, _STR = (int,), (int, float), (str,)
FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": (_STR, "a model name"), "method": (_STR, "a method name"),
    "rank": ((int, type(None)), "a whole number"), "alpha": ((float, type(None)), "a number"),
    "dropout": (_NUM, "a number"), "targets": ((tuple, str, type(None)), "a list of module names or a regex"),
    "modules_to_save": ((tuple,), "a list of module names"),
    **{k: (_INT, "a whole number") for k in ("batch_size", "grad_accum", "seq_len", "epochs", "warmup_epochs",
                                             "samples", "eval_samples", "seed", "repeat")},
    "lr": ((float,), "a number"), "device": (_STR, "a device name"), "dtype": (_STR, "a dtype name"),
    "weights": (_STR, "random or pretrained"), "data": (_STR, "synthetic or a path"),
    "task": ((str, type(None)), "a task name"), "pretrain_epochs": (_INT, "a whole number"),
}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CellError(f"{name} must be a whole number >= 1, got {value!r}")


def _nonnegative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CellError(f"{name} must be a whole number >= 0, got {value!r}")


CELL_FIELDS = tuple(f.name for f in dataclasses.fields(Cell))
# Settings of the adapter: a matrix leaves them out of its full fine-tuning cells.
LORA_FIELDS = ("alpha", "dropout", "targets", "modules_to_save")


@dataclass(frozen=True)
class Matrix:
    """models x methods x ranks, sharing `settings` (any other Cell field)."""

    models: tuple[str, ...]
    methods: tuple[str, ...]
    ranks: tuple[int, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        lora_methods = [m for m in self.methods if m != "full"]
        if lora_methods and not self.ranks:
            raise CellError(f"methods {', '.join(lora_methods)} need at least one rank (--ranks)")
        out = []
        full_settings = {k: v for k, v in self.settings.items() if k not in LORA_FIELDS}
        for model in self.models:
            for method in self.methods:
                for rank in ([None] if method == "full" else self.ranks):
                    settings = full_settings if method == "full" else self.settings
                    out.append(Cell(model=model, method=method, rank=rank, **settings))
        return out


# Settings of the CPU default: small synthetic data so the whole matrix runs in about a minute.
QUICK = {"batch_size": 32, "samples": 512, "eval_samples": 256, "seq_len": 64, "epochs": 2, "warmup_epochs": 1}

# Seed 002: batch 8, Adam 1e-3, the full CIFAR-10 train/test split; 2 epochs from scratch (a
# warm-up, then a timed one), then LoRA rank 1, alpha 1 continued from those trained weights.
SEED_CIFAR = {"batch_size": 8, "samples": 50000, "eval_samples": 10000, "lr": 1e-3, "epochs": 1, "warmup_epochs": 1}

# Seed 003 (slides): BERT-Tiny and BERT-Base, full vs LoRA r=8 (PEFT defaults: query, value), 5
# epochs. The slides give no learning rate or data size: the HF Trainer's default 5e-5 for full
# fine-tuning, 5e-4 for LoRA (adapters start at zero and need a larger step), 4,096 samples.
SEED_BERT = {"batch_size": 32, "seq_len": 128, "samples": 4096, "eval_samples": 1024, "epochs": 4, "warmup_epochs": 1}

# Seed 001: Bloom 1b4 (zh), LoraConfig(r=8 default, alpha 8 default, target regex on the blocks
# whose index starts with 1, modules_to_save=["word_embeddings"]), batch 1 x 8 accumulated, 256
# tokens, lr 5e-5 (Trainer default). The seed trains one epoch; an untimed warm-up epoch is added.
SEED_BLOOM = {"batch_size": 1, "grad_accum": 8, "seq_len": 256, "samples": 512, "eval_samples": 64, "lr": 5e-5,
              "epochs": 1, "warmup_epochs": 1, "alpha": 8.0, "targets": r".*\.1.*query_key_value",
              "modules_to_save": ("word_embeddings",)}

RANKS = (1, 2, 4, 8, 16, 32, 64)

PRESETS: dict[str, tuple[Matrix, ...]] = {
    "quick": (Matrix(("cifar-mlp", "bert-tiny"), ("full", "lora"), (2, 8), QUICK),),
    # The nightly GPU job: small enough for minutes, large enough that steps are not launch-bound.
    "ci": (Matrix(("cifar-mlp", "bert-tiny"), ("full", "lora", "lora-reparam"), (8,),
                  {"batch_size": 64, "samples": 4096, "eval_samples": 512, "seq_len": 128, "epochs": 3,
                   "warmup_epochs": 1}),),
    "seed-cifar-mlp": (
        Matrix(("cifar-mlp",), ("full",), (), SEED_CIFAR),
        Matrix(("cifar-mlp",), ("lora-reparam",), (1,), {**SEED_CIFAR, "alpha": 1.0, "pretrain_epochs": 2}),
    ),
    "seed-bert": (
        Matrix(("bert-tiny", "bert-base"), ("full",), (), {**SEED_BERT, "lr": 5e-5}),
        Matrix(("bert-tiny", "bert-base"), ("lora",), (8,), {**SEED_BERT, "lr": 5e-4}),
    ),
    "seed-bloom": (Matrix(("bloom-1b4-zh",), ("lora",), (8,), SEED_BLOOM),),
    # Every rank against full fine-tuning. The MLP's head has 10 outputs, which caps a rank on it
    # at 10: its sweep adapts the two hidden layers (fc1, fc2) at every rank instead.
    "ranks": (
        Matrix(("bert-tiny", "bert-base"), ("full", "lora"), RANKS, QUICK),
        Matrix(("cifar-mlp",), ("full", "lora"), RANKS, {**QUICK, "targets": ("fc1", "fc2")}),
    ),
}


def plan(
    presets: Iterable[str] = ("quick",),
    models: Iterable[str] | None = None,
    methods: Iterable[str] | None = None,
    ranks: Iterable[int] | None = None,
    overrides: dict[str, Any] | None = None,
    repeat: int = 1,
) -> list[Cell]:
    """Expand presets into cells, with axis replacements and field overrides applied.

    `models` restricts each preset matrix to the models it names; a requested model that no
    matrix names gets the first matrix's methods, ranks and settings. `methods` and `ranks`
    replace those axes everywhere; `overrides` replace cell fields everywhere.
    """
    matrices: list[Matrix] = []
    for name in presets:
        if name not in PRESETS:
            raise CellError(f"unknown preset {name!r}; choose from {_choices(PRESETS)}")
        matrices.extend(PRESETS[name])
    if models is not None:
        wanted = list(dict.fromkeys(models))
        covered = {m for mx in matrices for m in mx.models}
        kept = [dataclasses.replace(mx, models=tuple(m for m in mx.models if m in wanted)) for mx in matrices]
        extra = tuple(m for m in wanted if m not in covered)
        if extra:
            kept.append(dataclasses.replace(matrices[0], models=extra))
        matrices = [mx for mx in kept if mx.models]
    if methods is not None:
        matrices = [dataclasses.replace(mx, methods=tuple(methods)) for mx in matrices]
    if ranks is not None:
        if methods is not None and all(m == "full" for m in methods):
            raise CellError("--ranks was given but the only method is full; ranks apply to the lora methods")
        matrices = [dataclasses.replace(mx, ranks=tuple(ranks)) for mx in matrices]
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(CELL_FIELDS))
    if unknown:
        raise CellError(f"unknown setting(s) {', '.join(unknown)}; accepted: {_choices(CELL_FIELDS)}")
    if repeat < 1:
        raise CellError(f"repeat must be a whole number >= 1, got {repeat}")
    base: list[Cell] = []
    for mx in matrices:
        base += dataclasses.replace(mx, settings={**mx.settings, **overrides}).cells()
    cells: dict[str, Cell] = {}
    # Repeat-major order (the whole matrix, then the whole matrix again): the spread of a cell's
    # repeats then covers the drift of the machine over the run, not just a few seconds of it.
    for r in range(repeat):
        for cell in base:
            c = dataclasses.replace(cell, repeat=r)
            cells.setdefault(c.key(), c)   # identical cells from overlapping presets run once
    return list(cells.values())


def shard(cells: list[Cell], costs: list[float], k: int, n: int) -> list[Cell]:
    """Cells of shard k (1-based) of n: every cell lands in exactly one shard, balanced by cost.

    Greedy longest-processing-time: the costliest cell goes to the least loaded shard, ties broken
    by the cell's key and the shard's index, so every machine computes the same partition.
    """
    if not 1 <= k <= n:
        raise CellError(f"--shard {k}/{n}: K must be between 1 and N")
    load = [0.0] * n
    owner: dict[str, int] = {}
    for cost, cell in sorted(zip(costs, cells), key=lambda ck: (-ck[0], ck[1].key())):
        i = min(range(n), key=lambda j: (load[j], j))
        load[i] += cost
        owner[cell.key()] = i + 1
    return [c for c in cells if owner[c.key()] == k]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise CellError(f"--shard must look like K/N (e.g. 2/4), got {text!r}") from None
    if n < 1 or not 1 <= k <= n:
        raise CellError(f"--shard {text}: need 1 <= K <= N")
    return k, n


# Keys a --config TOML file may hold, with their types; [settings] takes any Cell field.
CONFIG_KEYS: dict[str, tuple[type, str]] = {
    "preset": (list, "a list of preset names"), "models": (list, "a list of model names"),
    "methods": (list, "a list of method names"), "ranks": (list, "a list of whole numbers"),
    "repeat": (int, "a whole number"), "settings": (dict, "a table of cell settings"),
}


def load_config(path: str) -> dict[str, Any]:
    """Read and validate a TOML config (tomllib: data only, nothing executed)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        raise CellError(f"--config {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CellError(f"--config {path}: not valid TOML ({e})") from None
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise CellError(f"--config {path}: unknown key(s) {', '.join(unknown)}; accepted: {_choices(CONFIG_KEYS)}")
    for key, (kind, what) in CONFIG_KEYS.items():
        if key in config and (isinstance(config[key], bool) or not isinstance(config[key], kind)):
            raise CellError(f"--config {path}: {key} must be {what}, got {config[key]!r}")
    if "ranks" in config and not all(isinstance(r, int) and not isinstance(r, bool) for r in config["ranks"]):
        raise CellError(f"--config {path}: ranks must be a list of whole numbers, got {config['ranks']!r}")
    bad = sorted(set(config.get("settings", {})) - set(CELL_FIELDS) - {"model", "method", "rank", "repeat"})
    if bad:
        raise CellError(f"--config {path}: unknown setting(s) {', '.join(bad)}; accepted: {_choices(CELL_FIELDS)}")
    for key in ("model", "method", "rank", "repeat"):
        if key in config.get("settings", {}):
            raise CellError(f"--config {path}: {key} is an axis of the matrix, not a setting; use models/methods/ranks/repeat")
    return config

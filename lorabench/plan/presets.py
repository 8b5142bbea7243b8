"""Presets and matrices expanded into cells: what a user asked for, before anything is surveyed.

    lorabench list                               # every preset with its cell count
    lorabench run --dry-run --preset quick       # expands, surveys and prints the plan

Presets are named tuples of `Matrix` (models x methods x ranks with shared settings); CLI flags
and a TOML file (`config`) override them. `admission` then surveys the cells and decides which run.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from ..measure import environment
from ..workload.data import SYNTHETIC, has_tasks
from ..workload.methods import METHODS, MethodError
from ..workload.methods import method as method_of
from ..workload.zoo import ARCHITECTURES
from .axes import ADAPTER_FIELDS, MATRIX_FIELDS
from .cells import CELL_FIELDS, Cell, CellError, choices
from .config import load_config


@dataclass(frozen=True)
class Matrix:
    """models x methods x ranks, sharing `settings` (any other Cell field); a setting of MATRIX_FIELDS
    given as a list is one more axis."""

    models: tuple[str, ...]
    methods: tuple[str, ...]
    ranks: tuple[int, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, Any] = field(default_factory=dict)  # settings of the adapter methods' cells only

    def cells(self) -> list[Cell]:
        try:
            kinds = {m: method_of(m) for m in self.methods}
        except MethodError as e:
            raise CellError(str(e)) from None
        ranked = [m for m in self.methods if kinds[m].ranked]
        if ranked and not self.ranks:
            raise CellError(f"methods {', '.join(ranked)} need at least one rank (--ranks)")
        out = []
        for model in self.models:
            for method in self.methods:
                adapts = kinds[method].adapts
                for rank in self.ranks if kinds[method].ranked else [None]:
                    for values in itertools.product(*self._axes().values()):
                        settings = {**self.settings, **dict(zip(self._axes(), values))}
                        if not adapts:
                            settings = {k: v for k, v in settings.items() if k not in ADAPTER_FIELDS}
                        else:
                            settings = {**settings, **self.adapters}
                        if settings.get("nproc", 1) == 1:
                            settings.pop("strategy", None)  # one process shares nothing
                        out.append(Cell(model=model, method=method, rank=rank, **settings))
        return list({c.key(): c for c in out}.values())

    def _axes(self) -> dict[str, tuple]:
        """{field: values} of the settings given as lists (an axis each)."""
        return {
            k: tuple(v)
            for k, v in self.settings.items()
            if k in MATRIX_FIELDS and isinstance(v, (list, tuple))
        }


# Settings of the CPU default: small synthetic data so the whole matrix runs in about a minute.
QUICK = {
    "batch_size": 32,
    "samples": 512,
    "eval_samples": 256,
    "seq_len": 64,
    "epochs": 2,
    "warmup_epochs": 1,
}
# Quality compared like with like: every method adapts the same trained base (`--weights trained`,
# made once per model and cached) to its task's target, evaluated every 4 steps for its curve.
TRANSFER = {"weights": "trained", "eval_every": 4}
# Adapters start at zero (LoRA's B) and need a larger step than full fine-tuning (the seeds' slides:
# 5e-5 full, 5e-4 LoRA). Measured on the quick preset's transfer: the MLP's LoRA r=8 reached 0.55 at
# 1e-3 and 0.90 at 5e-3, 0.55 at 2e-2; full fine-tuning of BERT-Tiny collapsed to 0.5 at 3e-3.
ADAPTER_LR = {"lr": 5e-3}

# Seed 002: batch 8, Adam 1e-3, the full CIFAR-10 train/test split; 2 epochs from scratch (a
# warm-up, then a timed one), then LoRA rank 1, alpha 1 continued from those trained weights.
SEED_CIFAR = {
    "batch_size": 8,
    "samples": 50000,
    "eval_samples": 10000,
    "lr": 1e-3,
    "epochs": 1,
    "warmup_epochs": 1,
}

# Seed 003 (slides): BERT-Tiny and BERT-Base, full vs LoRA r=8 (PEFT defaults: query, value), 5
# epochs. The slides give no learning rate or data size: the HF Trainer's default 5e-5 for full
# fine-tuning, 5e-4 for LoRA (adapters start at zero and need a larger step), 4,096 samples.
SEED_BERT = {
    "batch_size": 32,
    "seq_len": 128,
    "samples": 4096,
    "eval_samples": 1024,
    "epochs": 4,
    "warmup_epochs": 1,
}

# Seed 001: Bloom 1b4 (zh), LoraConfig(r=8 default, alpha 8 default, target regex on the blocks
# whose index starts with 1, modules_to_save=["word_embeddings"]), batch 1 x 8 accumulated, 256
# tokens, lr 5e-5 (Trainer default). The seed trains one epoch; an untimed warm-up epoch is added.
SEED_BLOOM = {
    "batch_size": 1,
    "grad_accum": 8,
    "seq_len": 256,
    "samples": 512,
    "eval_samples": 64,
    "lr": 5e-5,
    "epochs": 1,
    "warmup_epochs": 1,
    "alpha": 8.0,
    "targets": r".*\.1.*query_key_value",
    "modules_to_save": ("word_embeddings",),
}

RANKS = (1, 2, 4, 8, 16, 32, 64)

# The memory savers lorabench has, all at once: what practitioners reach for when full fine-tuning
# does not fit (the `fair` preset turns them on for both methods).
SAVERS = {"optimizer": "adamw-8bit", "precision": "bf16-mixed", "grad_checkpointing": "on"}

# Scaling on a GPU host: full fine-tuning replicated (DDP) and sharded (FSDP2) against LoRA, on 1 to
# 8 processes, a GPU each (the counts this host has no GPUs for are left out). bf16 is not used:
# the comparison is of memory and throughput at the seed's fp32.
SCALE = {
    "batch_size": 8,
    "seq_len": 256,
    "samples": 2048,
    "eval_samples": 256,
    "epochs": 2,
    "warmup_epochs": 1,
    "nproc": (1, 2, 4, 8),
}

PRESETS: dict[str, tuple[Matrix, ...]] = {
    "quick": (
        Matrix(("cifar-mlp", "bert-tiny"), ("full", "lora"), (2, 8), {**QUICK, **TRANSFER}, ADAPTER_LR),
    ),
    # What each method costs in quality, with its spread: three seeds of the MLP and BERT-Tiny, full
    # fine-tuning and every LoRA-family method, each adapting the same trained base.
    "quality": (
        Matrix(
            ("cifar-mlp", "bert-tiny"),
            ("full", "lora", "lora-reparam", "dora", "rslora", "loha", "lokr", "adalora", "vera"),
            (8,),
            {**QUICK, **TRANSFER, "seed": (0, 1, 2)},
            ADAPTER_LR,
        ),
    ),
    # The nightly GPU job: small enough for minutes, large enough that steps are not launch-bound.
    "ci": (
        Matrix(
            ("cifar-mlp", "bert-tiny"),
            ("full", "lora", "lora-reparam"),
            (8,),
            {
                "batch_size": 64,
                "samples": 4096,
                "eval_samples": 512,
                "seq_len": 128,
                "epochs": 3,
                "warmup_epochs": 1,
            },
        ),
    ),
    "seed-cifar-mlp": (
        Matrix(("cifar-mlp",), ("full",), (), SEED_CIFAR),
        Matrix(("cifar-mlp",), ("lora-reparam",), (1,), {**SEED_CIFAR, "alpha": 1.0, "pretrain_epochs": 2}),
    ),
    "seed-bert": (
        Matrix(("bert-tiny", "bert-base"), ("full",), (), {**SEED_BERT, "lr": 5e-5}),
        Matrix(("bert-tiny", "bert-base"), ("lora",), (8,), {**SEED_BERT, "lr": 5e-4}),
    ),
    "seed-bloom": (Matrix(("bloom-1b4-zh",), ("lora",), (8,), SEED_BLOOM),),
    # What the knobs buy LoRA on BERT-Tiny: every precision, with and without gradient checkpointing.
    "knobs": (
        Matrix(
            ("bert-tiny",),
            ("lora",),
            (8,),
            {
                **QUICK,
                "precision": ("fp32", "bf16-mixed", "fp16-mixed", "bf16"),
                "grad_checkpointing": ("off", "on"),
            },
        ),
    ),
    # Every method on BERT-Tiny at r=8 (IA3 takes no rank), against full fine-tuning.
    "peft-methods": (Matrix(("bert-tiny",), tuple(METHODS), (8,), QUICK),),
    "scale": (
        Matrix(
            ("bert-base", "bloom-560m"), ("full",), (), {**SCALE, "lr": 5e-5, "strategy": ("ddp", "fsdp2")}
        ),
        Matrix(("bert-base", "bloom-560m"), ("lora",), (8,), {**SCALE, "lr": 5e-4, "strategy": ("ddp",)}),
    ),
    # Every rank against full fine-tuning. The MLP's head has 10 outputs, which caps a rank on it
    # at 10: its sweep adapts the two hidden layers (fc1, fc2) at every rank instead.
    # What LoRA buys once full fine-tuning uses the same memory savers (an 8-bit optimizer, bf16
    # autocast, gradient checkpointing): each side with and without them; the headline also sets the
    # leanest LoRA against the leanest full fine-tuning that ran.
    "fair": (
        Matrix(("cifar-mlp", "bert-tiny"), ("full", "lora"), (8,), QUICK),
        Matrix(("cifar-mlp", "bert-tiny"), ("full", "lora"), (8,), {**QUICK, **SAVERS}),
    ),
    # The architectures people bring, tiny, through full fine-tuning and every PEFT method: each cell
    # ok, or skipped with PEFT's reason where PEFT cannot build that pair; predicted peaks beside the
    # measured ones. (lora-reparam, lorabench's own, adapts nn.Linear only: not GPT-2's Conv1D.)
    "zoo": (
        Matrix(
            tuple(f"tiny-{arch}" for arch in ARCHITECTURES),
            ("full", *(name for name, m in METHODS.items() if m.uses_peft)),
            (8,),
            {**QUICK, "samples": 128, "eval_samples": 64, "seq_len": 64},
        ),
    ),
    # What each method costs in quality on the architectures people bring: the tiny zoo adapting
    # trained bases to their targets, full fine-tuning and every PEFT method, one seed.
    "zoo-quality": (
        Matrix(
            tuple(f"tiny-{arch}" for arch in ARCHITECTURES),
            ("full", *(name for name, m in METHODS.items() if m.uses_peft)),
            (8,),
            {**QUICK, **TRANSFER},
            ADAPTER_LR,
        ),
    ),
    "ranks": (
        Matrix(("bert-tiny", "bert-base"), ("full", "lora"), RANKS, QUICK),
        Matrix(("cifar-mlp",), ("full", "lora"), RANKS, {**QUICK, "targets": ("fc1", "fc2")}),
    ),
}


def expand(
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
            raise CellError(f"unknown preset {name!r}; choose from {choices(PRESETS)}")
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
        if methods is not None and not any(m in METHODS and METHODS[m].ranked for m in methods):
            raise CellError(
                f"--ranks was given but the only method is {', '.join(methods)}; ranks apply to the "
                "methods that take one"
            )
        matrices = [dataclasses.replace(mx, ranks=tuple(ranks)) for mx in matrices]
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(CELL_FIELDS))
    if unknown:
        raise CellError(f"unknown setting(s) {', '.join(unknown)}; accepted: {choices(CELL_FIELDS)}")
    if repeat < 1:
        raise CellError(f"repeat must be a whole number >= 1, got {repeat}")
    base: list[Cell] = []
    for mx in matrices:
        adapters = {k: v for k, v in mx.adapters.items() if k not in overrides}  # what was asked wins
        settings = {**mx.settings, **overrides}
        if not has_tasks(settings.get("data", SYNTHETIC)) and "weights" not in overrides:
            # a preset's trained base adapts to a source task's related target (synthetic, the
            # digits): with the user's files, it starts from the configuration's weights (or
            # --weights pretrained, as asked)
            settings.pop("weights", None)
        base += dataclasses.replace(mx, settings=settings, adapters=adapters).cells()
    if overrides.get("strategy") is not None and all(c.nproc == 1 for c in base):
        raise CellError("--strategy applies to cells of several processes; give --nproc 2 or more")
    cells: dict[str, Cell] = {}
    # Repeat-major order (the whole matrix, then the whole matrix again): the spread of a cell's
    # repeats then covers the drift of the machine over the run, not just a few seconds of it.
    for r in range(repeat):
        for cell in base:
            c = dataclasses.replace(cell, repeat=r)
            cells.setdefault(c.key(), c)  # identical cells from overlapping presets run once
    return list(cells.values())


def request(
    *,
    config: str | None = None,
    presets=None,
    models=None,
    methods=None,
    ranks=None,
    repeat=None,
    settings: dict[str, Any] | None = None,
    planning: bool = False,
) -> list[Cell]:
    """The cells a user asked for: a TOML config, overridden by what was given on the command line
    (None: not given), the device resolved ("auto": a GPU when torch sees one; `planning`: a GPU
    this machine does not have may be named, and as many of them as asked)."""
    cfg = load_config(config) if config else {}
    merged = {**cfg.get("settings", {}), **(settings or {})}
    merged["device"] = environment.resolve_device(merged.get("device") or "auto", planning)
    cells = expand(
        presets or cfg.get("preset") or ["quick"],
        models or cfg.get("models"),
        methods or cfg.get("methods"),
        ranks or cfg.get("ranks"),
        merged,
        repeat if repeat is not None else cfg.get("repeat", 1),
    )
    return cells if planning else within_host(cells, asked="nproc" in merged)


def within_host(cells: list[Cell], asked: bool) -> list[Cell]:
    """The cells this host has devices for: a process per GPU on a GPU run, at least a core per
    process on the CPU. More processes than that are refused when --nproc (or the config) asked
    for them, and left out of a preset's axis (`scale`: "1, 2, 4, 8 as the host allows")."""
    if not cells:
        return cells
    device = cells[0].device
    have = torch.cuda.device_count() if device == "cuda" else (os.cpu_count() or 1)
    what = "GPU(s) visible" if device == "cuda" else "CPU cores (a rank needs one at least)"
    too_many = sorted({c.nproc for c in cells if c.nproc > have})
    if too_many and asked:
        raise CellError(f"--nproc {too_many[-1]}: this host has {have} {what}; choose at most {have}")
    kept = [c for c in cells if c.nproc <= have]
    if not kept:
        raise CellError(f"every cell needs more processes than this host has {what} ({have})")
    return kept

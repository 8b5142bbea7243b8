"""The plan of a run: matrices and presets expanded into cells, surveyed before anything runs.

    lorabench run --dry-run --preset quick      # expands, surveys and prints the plan

Presets are named tuples of `Matrix` (models x methods x ranks with shared settings); CLI flags
and a TOML file override them. Every cell is then surveyed (`survey`: on torch's meta device,
milliseconds), which refuses an unbuildable cell before anything is written, balances shards by
predicted cost, and gates cells predicted not to fit in free memory or that the device cannot run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from . import child, environment
from .cells import AXIS_FIELDS, CELL_FIELDS, LORA_FIELDS, Cell, CellError, _choices
from .config import load_config
from .methods import METHODS, MethodError
from .methods import method as method_of
from .survey import PROBE_TIMEOUT_S, RUNS_ANYWHERE, PlanError, Survey, probe, survey_all


@dataclass(frozen=True)
class Matrix:
    """models x methods x ranks, sharing `settings` (any other Cell field); a setting of AXIS_FIELDS
    given as a list is one more axis."""

    models: tuple[str, ...]
    methods: tuple[str, ...]
    ranks: tuple[int, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

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
                for rank in (self.ranks if kinds[method].ranked else [None]):
                    for values in itertools.product(*self._axes().values()):
                        settings = {**self.settings, **dict(zip(self._axes(), values))}
                        if not adapts:
                            settings = {k: v for k, v in settings.items() if k not in LORA_FIELDS}
                        if settings.get("nproc", 1) == 1:
                            settings.pop("strategy", None)   # one process shares nothing
                        out.append(Cell(model=model, method=method, rank=rank, **settings))
        return list({c.key(): c for c in out}.values())

    def _axes(self) -> dict[str, tuple]:
        """{field: values} of the settings given as lists (an axis each)."""
        return {k: tuple(v) for k, v in self.settings.items() if k in AXIS_FIELDS and isinstance(v, (list, tuple))}


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

# Scaling on a GPU host: full fine-tuning replicated (DDP) and sharded (FSDP2) against LoRA, on 1 to
# 8 processes, a GPU each (the counts this host has no GPUs for are left out). bf16 is not used:
# the comparison is of memory and throughput at the seed's fp32.
SCALE = {"batch_size": 8, "seq_len": 256, "samples": 2048, "eval_samples": 256, "epochs": 2, "warmup_epochs": 1,
         "nproc": (1, 2, 4, 8)}

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
    # What the knobs buy LoRA on BERT-Tiny: every precision, with and without gradient checkpointing.
    "knobs": (Matrix(("bert-tiny",), ("lora",), (8,), {**QUICK, "precision": ("fp32", "bf16-mixed", "fp16-mixed", "bf16"),
                                                      "grad_checkpointing": ("off", "on")}),),
    # Every method on BERT-Tiny at r=8 (IA3 takes no rank), against full fine-tuning.
    "peft-methods": (Matrix(("bert-tiny",), tuple(METHODS), (8,), QUICK),),
    "scale": (Matrix(("bert-base", "bloom-560m"), ("full",), (), {**SCALE, "lr": 5e-5, "strategy": ("ddp", "fsdp2")}),
              Matrix(("bert-base", "bloom-560m"), ("lora",), (8,), {**SCALE, "lr": 5e-4, "strategy": ("ddp",)})),
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
        if methods is not None and not any(m in METHODS and METHODS[m].ranked for m in methods):
            raise CellError(f"--ranks was given but the only method is {', '.join(methods)}; ranks apply to the "
                            "methods that take one")
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
    if overrides.get("strategy") is not None and all(c.nproc == 1 for c in base):
        raise CellError("--strategy applies to cells of several processes; give --nproc 2 or more")
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


def matrix_id(cells: list[Cell]) -> str:
    """Identity of a whole matrix (before sharding): shards of one matrix share it."""
    return hashlib.sha256("\n".join(c.key() for c in cells).encode()).hexdigest()[:16]


def predicted_cost(cell: Cell, s: Survey) -> float:
    """Training FLOPs of the whole cell (balances shards); 6 per parameter and token where they
    could not be counted."""
    steps = cell.samples // (cell.batch_size * cell.grad_accum)
    per_step = s.prediction.flops_per_step
    if per_step is None:
        per_step = 6.0 * s.params.total * s.prediction.tokens_per_step
    return per_step * steps * (cell.epochs + cell.warmup_epochs + cell.pretrain_epochs)


def fit_gate(cells: list[Cell], surveys: list[Survey], free: int | None, what: str, force: bool) -> dict[str, str]:
    """{cell key: why it is skipped} for cells predicted to need more than `free` bytes (`what`
    says what was read). A prediction is per device: the ranks of a CPU cell all draw on the one
    host memory. When no cell fits, the whole plan is refused (PlanError)."""
    if free is None or force:
        return {}
    gib = 2 ** 30
    need = {c.key(): s.prediction.total_bytes * (c.nproc if c.device == "cpu" else 1) for c, s in zip(cells, surveys)}
    skipped = {c.key(): f"predicted to need {need[c.key()] / gib:.2f} GiB; {what}: {free / gib:.2f} GiB "
                        "(--force runs it anyway)" for c in cells if need[c.key()] > free}
    if cells and len(skipped) == len(cells):
        raise PlanError(f"no cell fits this device: the largest is predicted to need {max(need.values()) / gib:.2f} "
                        f"GiB, {what}: {free / gib:.2f} GiB (--force runs them anyway)")
    return skipped


def request(*, config: str | None = None, presets=None, models=None, methods=None, ranks=None, repeat=None,
            settings: dict[str, Any] | None = None) -> list[Cell]:
    """The cells a user asked for: a TOML config, overridden by what was given on the command line
    (None: not given), the device resolved ("auto": a GPU when torch sees one)."""
    cfg = load_config(config) if config else {}
    merged = {**cfg.get("settings", {}), **(settings or {})}
    merged["device"] = environment.resolve_device(merged.get("device") or "auto")
    cells = plan(presets or cfg.get("preset") or ["quick"], models or cfg.get("models"), methods or cfg.get("methods"),
                 ranks or cfg.get("ranks"), merged, repeat if repeat is not None else cfg.get("repeat", 1))
    return within_host(cells, asked="nproc" in merged)


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


@dataclass
class Plan:
    """What a run will do: its cells (this shard's), the whole matrix, their surveys, and the cells
    the fit gate skips, with why."""

    cells: list[Cell]
    matrix: list[Cell]
    surveys: list[Survey]
    skipped: dict[str, str] = field(default_factory=dict)
    shard: str | None = None
    fit_note: str | None = None   # why no fit check could be made, when none was

    @classmethod
    def of(cls, cells: list[Cell], shard_spec: str | None = None, force: bool = False,
           start_method: str = "forkserver") -> "Plan":
        """Survey every cell, keep shard K/N of them, gate those predicted not to fit, and skip those
        whose precision or quantisation the device cannot run (asked in a child: `probe`)."""
        k_n = parse_shard(shard_spec) if shard_spec else None
        surveys = survey_all(cells)
        matrix = cells
        if k_n:
            chosen = {c.key() for c in shard(cells, [predicted_cost(c, s) for c, s in zip(cells, surveys)], *k_n)}
            surveys = [s for c, s in zip(cells, surveys) if c.key() in chosen]
            cells = [c for c in cells if c.key() in chosen]
        device = cells[0].device if cells else "cpu"
        free, what = environment.free_memory_bytes(device)
        skipped = fit_gate(cells, surveys, free, what, force)
        # a precision this device cannot run, a quantisation bitsandbytes cannot serve: skipped, with why
        asked = {axis: sorted({getattr(c, axis) for c in cells} - {everywhere}) for axis, everywhere in RUNS_ANYWHERE.items()}
        asked = {axis: values for axis, values in asked.items() if values}
        if asked:
            try:
                answers = child.call(probe, (device, asked), start_method=start_method, timeout_s=PROBE_TIMEOUT_S,
                                     name="lorabench-probe")
            except child.ChildFailed as e:
                answers = {axis: {v: f"could not ask {device} whether it runs {axis} {v}: {e}" for v in values}
                           for axis, values in asked.items()}
            for axis, whys in answers.items():
                skipped.update({c.key(): whys[getattr(c, axis)] for c in cells if whys.get(getattr(c, axis))})
        return cls(cells, matrix, surveys, skipped, shard_spec,
                   None if free is not None else f"no fit check before running: {what}")

    def known(self) -> dict[str, dict[str, Any]]:
        """Figures known of each cell before it runs (its prediction), by cell key."""
        return {c.key(): s.prediction.to_metrics() for c, s in zip(self.cells, self.surveys)}

    def gemms(self) -> dict[str, list[tuple[int, int, int]]]:
        """The GEMM shapes of the cells that will run, by dtype: what the matmul ceiling is measured on."""
        out: dict[str, set] = {}
        for c, s in zip(self.cells, self.surveys):
            if c.key() not in self.skipped:
                out.setdefault(c.compute_dtype, set()).update(s.gemms)
        return {dtype: sorted(shapes) for dtype, shapes in out.items()}

    def to_json(self, run_id: str, argv: list[str]) -> dict[str, Any]:
        return {"run_id": run_id, "argv": argv, "matrix_id": matrix_id(self.matrix), "shard": self.shard,
                "lorabench_commit": environment.project_commit(), "skipped": self.skipped,
                "cells": [c.to_dict() for c in self.cells], "matrix": [c.to_dict() for c in self.matrix]}

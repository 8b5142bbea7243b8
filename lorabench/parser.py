"""The command line's parser: every command and flag, the values they take, and how bad input is
refused (one line, exit code 2).

    lorabench --help

The "cell settings" flags of `run` are generated from `Cell`'s fields and `RunOptions`'; the
commands themselves are in `commands`, dispatched by `cli.main`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable

EXIT_OK, EXIT_FAILED_CELLS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MATRIX_FLAGS = (
    "preset",
    "models",
    "methods",
    "ranks",
    "repeat",
    "config",
    "shard",
)  # the matrix, beside the settings


class UsageError(Exception):
    """Bad input found by the CLI itself: reported as one line, exit code 2 (as errors.InputError)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _argtype(parse):
    """An argparse type whose error message is the parser's own ValueError."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": 2**30,
    "gib": 2**30,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}


def _accelerators() -> list[str]:
    from .plan.accelerators import ACCELERATORS

    return list(ACCELERATORS)


def _size(value: str) -> int:
    """A memory size: 24GiB, 80GB (decimal), 16G (binary), 512MiB; bytes without a unit."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 24GiB, 80GB or 512MiB, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _ranks(value: str) -> list[int]:
    from .plan.flags import csv_list

    try:
        return [int(v) for v in csv_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ranks must be whole numbers separated by commas, got {value!r}"
        ) from None


def _number(ok: Callable[[float], bool], expected: str):
    """An argparse type: a number `ok` accepts; else 'expected <expected>, got ...'."""

    def convert(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            x = None
        if x is None or not ok(x):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return x

    return convert


_accuracy = _number(lambda x: 0 < x <= 1, "an accuracy above 0 and at most 1, such as 0.9")  # one to reach
_loss = _number(lambda x: x > 0, "a loss above 0, such as 0.5")  # one to get under


def _reading(parser) -> None:
    """How a report reads the rows: whose headline, and the quality target time is measured to."""
    parser.add_argument(
        "--headline-by",
        choices=["memory", "time"],
        default="memory",
        help="the LoRA variant each model's headline names: least memory (default), or least time at "
        "equal quality",
    )
    aim = parser.add_mutually_exclusive_group()
    aim.add_argument(
        "--target-accuracy",
        type=_accuracy,
        metavar="A",
        help="time to target is the training time to the first evaluation with at least this accuracy "
        "(default: 95%% of full fine-tuning's best)",
    )
    aim.add_argument(
        "--target-loss",
        type=_loss,
        metavar="L",
        help="time to target is the training time to the first evaluation with at most this loss",
    )


def _add_flags(group, cls) -> None:
    """One flag per field of `cls` (Cell, RunOptions) that declares one; several for a field with
    alternatives. Defaults stay None here: the dataclass's own default applies when a flag is not given."""
    from .plan.flags import cli_flags

    for f in dataclasses.fields(cls):
        for flag in cli_flags(f):
            kw: dict[str, Any] = {
                "help": flag.help or None,
                "metavar": flag.metavar,
                "choices": flag.choices,
                "dest": flag.dest,
            }
            if flag.parse is not None:  # int and float keep argparse's own "invalid int value" message
                kw["type"] = flag.parse if flag.parse in (int, float) else _argtype(flag.parse)
            group.add_argument(flag.flag, **kw)


def given(args: argparse.Namespace, cls) -> dict[str, Any]:
    """{field: value} of the flags given for `cls`; of a field's alternative flags (--targets,
    --target-regex), one at most."""
    from .plan.flags import cli_flags

    out = {}
    for f in dataclasses.fields(cls):
        given = [(fl.flag, getattr(args, fl.dest)) for fl in cli_flags(f)]
        given = [(flag, v) for flag, v in given if v is not None]
        if len(given) > 1:
            raise UsageError(f"give {' or '.join(flag for flag, _ in given)}, not both")
        if given:
            out[f.name] = given[0][1]
    return out


def _run_outputs(group) -> None:
    """Where a command that runs cells writes them, and its progress bars (`run`, `plan --verify`)."""
    group.add_argument(
        "--out", type=Path, default=Path("results"), help="results directory (default: results)"
    )
    group.add_argument(
        "--report-dir", type=Path, default=Path("report"), help="report directory (default: report)"
    )
    group.add_argument(
        "--progress",
        choices=["auto", "on", "off"],
        default="auto",
        help="progress bars (auto: only when stderr is a terminal)",
    )


def _plan_parser(sub, _list) -> None:
    """`lorabench plan`: the search's fixed choices, its free dimensions, the budget and --verify."""
    from .plan.flags import int_list
    from .plan.search import DEFAULT_MARGIN, OPEN
    from .run.worker import RunOptions

    pl = sub.add_parser(
        "plan",
        help="the fastest configuration of a model that fits a memory budget, predicted, and its command",
        description="Predict every candidate's peak and step time from its simulated step, nothing trained: "
        "micro-batch with gradient accumulation (the effective batch kept), gradient checkpointing, and the "
        "precision, optimizer, method and rank where left open (a list searches, one value fixes). Print the "
        "fastest that fits the budget less a margin, the Pareto front of memory against throughput and the "
        "command that runs the choice; --verify runs it and holds the prediction against the measurement.",
    )
    g = pl.add_argument_group("what to fine-tune (fixed)")
    g.add_argument("--models", type=_list, required=True, help="models to plan for (see `lorabench list`)")
    g.add_argument("--batch-size", type=int, default=16, metavar="N", help="the effective batch (default 16)")
    g.add_argument("--seq-len", type=int, metavar="N", help="tokens per sample (default: the cell's, 64)")
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="where it runs (default: auto; cuda with --target)"
    )
    f = pl.add_argument_group("what to search (a list searches, one value fixes)")
    f.add_argument("--methods", type=_list, default=["full", "lora"], help="methods (default: full,lora)")
    f.add_argument("--ranks", type=_ranks, default=[8, 16], help="LoRA ranks (default: 8,16)")
    f.add_argument(
        "--micro-batches",
        type=_argtype(lambda v: list(int_list(v))),
        help="micro-batch sizes (default: every power of two dividing --batch-size)",
    )
    for name, values in OPEN.items():
        f.add_argument(
            "--" + name.replace("_", "-"),
            type=_list,
            default=list(values),
            help=f"default: {','.join(values)}",
        )
    b = pl.add_argument_group("the budget")
    b.add_argument("--fit-memory", type=_size, metavar="SIZE", help="device memory to fit (24GiB, 80GB)")
    b.add_argument(
        "--target",
        metavar="NAME",
        help="an accelerator you do not have: its memory (unless --fit-memory) and its rates; one of "
        + ", ".join(_accelerators()),
    )
    b.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        metavar="FRACTION",
        help=f"of the budget kept free against the prediction's error (default {DEFAULT_MARGIN})",
    )
    o = pl.add_argument_group("output and proof")
    o.add_argument("--all", action="store_true", help="list every candidate, not only the fastest that fit")
    o.add_argument(
        "--quality",
        type=Path,
        metavar="RUN_DIR",
        help="show the quality figures of a run beside the candidates",
    )
    o.add_argument(
        "--verify",
        nargs="?",
        const="choice",
        choices=("choice", "front", "fits"),
        help="run the choice (or the front, or every candidate that fits) and hold each prediction "
        "against its measurement",
    )
    o.add_argument(
        "--samples",
        type=int,
        metavar="N",
        help="training samples per epoch of a verifying run (default: 3 effective batches)",
    )
    _run_outputs(o)
    _add_flags(o, RunOptions)
    pl.set_defaults(
        profile=False, memory_snapshot=False, headline_by="memory", target_accuracy=None, target_loss=None
    )


def build_parser() -> argparse.ArgumentParser:
    from .measure.environment import installed_version
    from .plan.cells import Cell
    from .plan.flags import csv_list
    from .plan.presets import PRESETS
    from .results.compare import THRESHOLDS
    from .run.worker import RunOptions
    from .workload.methods import METHODS

    parser = _Parser(
        prog="lorabench",
        description=(
            "Measure what LoRA buys against full fine-tuning on this machine: trainable parameters, "
            "peak memory, epoch time and task quality, at every rank."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="run a matrix of cells and write results and a report",
        description=(
            "Run every cell of the matrix (models x methods x ranks) in its own process, append one JSON line per "
            "cell to OUT/<run-id>/results.jsonl as it ends, then write REPORT_DIR/<run-id>.md and print the "
            "comparison. With no arguments: the `quick` preset on the best device present."
        ),
    )
    m = run.add_argument_group("matrix")
    _list = _argtype(lambda v: list(csv_list(v)))
    m.add_argument(
        "--preset", type=_list, help=f"presets to expand (default: quick; choices: {', '.join(PRESETS)})"
    )
    m.add_argument("--models", type=_list, help="models to run (replaces the preset's; see `lorabench list`)")
    m.add_argument("--methods", type=_list, help=f"methods to run: {', '.join(METHODS)}")
    m.add_argument("--ranks", type=_ranks, help="LoRA ranks, e.g. 1,8,64")
    m.add_argument(
        "--repeat", type=int, metavar="N", help="run each cell N times (spread across runs; default 1)"
    )
    m.add_argument(
        "--config",
        metavar="FILE.toml",
        help="TOML file with preset/models/methods/ranks/repeat and a "
        "[settings] table of cell fields; flags given on the command line override it",
    )
    m.add_argument(
        "--shard",
        metavar="K/N",
        help="run only shard K of N (balanced by predicted cost); combine the "
        "shards' run directories with `lorabench merge`",
    )
    _add_flags(run.add_argument_group("cell settings (override the preset)"), Cell)
    o = run.add_argument_group("output and control")
    o.add_argument(
        "--download", action="store_true", help="download CIFAR-10 into --data DIR first (needs a network)"
    )
    o.add_argument(
        "--dry-run", action="store_true", help="build every cell, print counts and the plan, train nothing"
    )
    o.add_argument("--strict", action="store_true", help="exit 1 when any cell did not finish ok")
    o.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="finish an interrupted run: run only the cells of RUN_DIR's plan that have no row yet",
    )
    o.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: also re-run cells whose row is not ok (their old rows are replaced)",
    )
    o.add_argument(
        "--profile",
        action="store_true",
        help="per cell, a torch.profiler Chrome trace of a few steps "
        "after the timed epochs: RUN_DIR/traces/<cell-key>.json (chrome://tracing, ui.perfetto.dev)",
    )
    o.add_argument(
        "--memory-snapshot",
        action="store_true",
        help="per CUDA cell, the allocator's history over the "
        "first step: RUN_DIR/snapshots/<cell-key>.pickle (pytorch.org/memory_viz)",
    )
    o.add_argument(
        "--fit-memory",
        type=_size,
        metavar="SIZE",
        help="gate the cells against this much device memory instead of what is free here (24GiB, 80GB): "
        "with --dry-run, whether each cell would fit a GPU you do not have, from the model's configuration alone",
    )
    o.add_argument(
        "--target",
        metavar="NAME",
        help="with --dry-run, plan for an accelerator you do not have: its memory for the fit check "
        "(unless --fit-memory) and its rates for the predicted times, as `lorabench check` recorded "
        "them on one, else from its data sheet; one of " + ", ".join(_accelerators()),
    )
    o.add_argument(
        "--force",
        action="store_true",
        help="run cells predicted not to fit in free memory (otherwise they are recorded as skipped)",
    )
    _reading(o)
    _run_outputs(o)
    _add_flags(o, RunOptions)

    rep = sub.add_parser(
        "report",
        help="render the markdown report of one or more run directories",
        description="Render RUN_DIR/results.jsonl into markdown (from the results files alone). "
        "Several run directories (shards, repeats) render as one report.",
    )
    rep.add_argument("run_dirs", type=Path, nargs="*", metavar="RUN_DIR")
    rep.add_argument(
        "--pytest-benchmark",
        type=Path,
        metavar="FILE.json",
        help="render a pytest-benchmark JSON (pytest bench/ --benchmark-json FILE) instead",
    )
    rep.add_argument(
        "--report-dir", type=Path, default=Path("report"), help="where <run-id>.md goes (default: report)"
    )
    rep.add_argument("-o", "--output", type=Path, help="write the report to this file instead")
    _reading(rep)

    cmp_ = sub.add_parser(
        "compare",
        help="compare two runs and flag regressions",
        description="Match the cells of two runs by their parameters, print the change of every "
        "figure, and flag regressions past the thresholds (and past twice the measured "
        "spread where repeats exist).",
    )
    cmp_.add_argument(
        "runs",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="BASE_RUN NEW_RUN; with --history, the new run alone",
    )
    cmp_.add_argument(
        "--history",
        type=Path,
        metavar="HISTORY",
        help="judge the run against the median of the last --window comparable nights of this "
        "history (lorabench history add) instead of one base run",
    )
    cmp_.add_argument(
        "--window",
        type=int,
        default=7,
        metavar="K",
        help="nights of the history a run is judged against (default 7)",
    )
    for kind, (default, unit, worse) in THRESHOLDS.items():
        cmp_.add_argument(
            f"--{kind}-threshold",
            type=float,
            default=default,
            metavar="PCT" if unit == "%" else unit.upper(),
            help=f"{worse} by more than this many {unit.replace('%', '%%')} (default {default:g})",
        )
    cmp_.add_argument(
        "--fail-on-regression", action="store_true", help="exit 1 when any regression is flagged"
    )
    cmp_.add_argument(
        "--allow-environment-change",
        action="store_true",
        help="compare runs whose device model, GPU driver or torch version differ (refused otherwise)",
    )
    cmp_.add_argument("-o", "--output", type=Path, help="also write the comparison (markdown) to this file")

    chk = sub.add_parser(
        "check",
        help="prove the measurement stack on this machine (run it on a new machine)",
        description="Measure what is known in advance with the trackers a cell uses; print check, "
        "measured, expected, verdict; exit 1 if any fails (see lorabench/hostcheck.py and gpucheck.py).",
    )
    chk.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the GPU checks too when torch sees a GPU (default)",
    )

    prf = sub.add_parser(
        "proof",
        help="everything a first GPU must show, in one command (about 6 minutes on one H100)",
        description="Run `lorabench check --device cuda`, the driver's view of this process, the quantised "
        "weights' bytes, tests/physics/test_gpu.py with the GPU required, bert-base LoRA at seed 003's shape "
        "and the quick preset; write OUT/proof.json and OUT/proof.md (docs/proof.md), the runs under OUT/runs. "
        "Exit 1 when a step failed.",
    )
    prf.add_argument("out", type=Path, metavar="OUT", help="the folder the proof is written to (created)")
    prf.add_argument(
        "--dry-run",
        action="store_true",
        help="every step on the CPU (bert-tiny for bert-base): proves the command, not a device",
    )

    _plan_parser(sub, _list)

    lst = sub.add_parser("list", help="list models, methods and presets", description="List the registries.")
    lst.add_argument("--metrics", action="store_true", help="print the table of figures a result row holds")

    mrg = sub.add_parser(
        "merge",
        help="combine the run directories of shards into one run",
        description="Combine the results of `lorabench run --shard K/N` runs of one matrix into OUT, "
        "refusing shards of different matrices or lorabench versions, then report it.",
    )
    mrg.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="run directories of the shards")
    mrg.add_argument(
        "--out", type=Path, required=True, metavar="RUN_DIR", help="the merged run directory (new)"
    )
    mrg.add_argument(
        "--report-dir", type=Path, default=Path("report"), help="report directory (default: report)"
    )
    hst = sub.add_parser(
        "history",
        help="keep every nightly run and draw each figure over time",
        description="A history is a folder (history.jsonl): every run added with its commit, date and "
        "environment. `lorabench compare --history` gates a run against a window of its nights.",
    )
    hsub = hst.add_subparsers(dest="history_command", metavar="ACTION", parser_class=_Parser, required=True)
    hadd = hsub.add_parser("add", help="append a run to a history (created when absent)")
    hadd.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    hadd.add_argument("--to", type=Path, required=True, metavar="HISTORY", help="the history folder")
    hadd.add_argument(
        "--github-benchmark",
        type=Path,
        metavar="DIR",
        help="also write the run's gated figures as github-action-benchmark JSON: "
        "DIR/smaller-is-better.json (customSmallerIsBetter) and DIR/bigger-is-better.json",
    )
    hrep = hsub.add_parser("report", help="a markdown page of every gated figure over the nights")
    hrep.add_argument("history", type=Path, metavar="HISTORY")
    hrep.add_argument(
        "-o", "--output", type=Path, help="the page (default: HISTORY/index.md); its pictures go beside it"
    )
    hrep.add_argument(
        "--window", type=int, default=7, metavar="K", help="nights each night is judged against (default 7)"
    )
    return parser

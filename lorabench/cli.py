"""The command line: `lorabench run | report | compare | check | proof | list | merge | history`. It
parses, validates and prints.

    lorabench --help

Every input is validated before any work starts; a bad one prints one line naming the problem
and the accepted values, exits with code 2, and writes nothing. The "cell settings" flags of
`run` are generated from `Cell`'s fields; the work itself is done by `plan`, `runner`,
`rundir` and `report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

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


def _size(value: str) -> int:
    """A memory size: 24GiB, 80GB (decimal), 16G (binary), 512MiB; bytes without a unit."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 24GiB, 80GB or 512MiB, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _ranks(value: str) -> list[int]:
    from .plan.cells import csv_list

    try:
        return [int(v) for v in csv_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ranks must be whole numbers separated by commas, got {value!r}"
        ) from None


def _add_flags(group, cls) -> None:
    """One flag per field of `cls` (Cell, RunOptions) that declares one; several for a field with
    alternatives. Defaults stay None here: the dataclass's own default applies when a flag is not given."""
    from .plan.cells import cli_flags

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


def _given(args: argparse.Namespace, cls) -> dict[str, Any]:
    """{field: value} of the flags given for `cls`; of a field's alternative flags (--targets,
    --target-regex), one at most."""
    from .plan.cells import cli_flags

    out = {}
    for f in dataclasses.fields(cls):
        given = [(fl.flag, getattr(args, fl.dest)) for fl in cli_flags(f)]
        given = [(flag, v) for flag, v in given if v is not None]
        if len(given) > 1:
            raise UsageError(f"give {' or '.join(flag for flag, _ in given)}, not both")
        if given:
            out[f.name] = given[0][1]
    return out


def build_parser() -> argparse.ArgumentParser:
    from .measure.environment import installed_version
    from .plan.cells import Cell, csv_list
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
    o.add_argument("--out", type=Path, default=Path("results"), help="results directory (default: results)")
    o.add_argument(
        "--report-dir", type=Path, default=Path("report"), help="report directory (default: report)"
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
        "--force",
        action="store_true",
        help="run cells predicted not to fit in free memory (otherwise they are recorded as skipped)",
    )
    o.add_argument(
        "--headline-by",
        choices=["memory", "time"],
        default="memory",
        help="the LoRA variant each model's "
        "headline names: least memory (default), or least time at equal quality",
    )
    o.add_argument(
        "--progress",
        choices=["auto", "on", "off"],
        default="auto",
        help="progress bars (auto: only when stderr is a terminal)",
    )
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
    rep.add_argument(
        "--headline-by",
        choices=["memory", "time"],
        default="memory",
        help="the LoRA variant each headline names: least memory (default), or least time at equal quality",
    )

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
        "measured, expected, verdict; exit 1 if any fails (see lorabench/check.py).",
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


def _options(args: argparse.Namespace, device: str):
    """Validated run options, shared by new and resumed runs."""
    from .results.rundir import writable_dir
    from .run.worker import RunOptions

    writable_dir(args.report_dir, "--report-dir")
    return RunOptions(
        **_given(args, RunOptions), profile=args.profile, memory_snapshot=args.memory_snapshot
    ).on(device)


def cmd_run(args: argparse.Namespace) -> int:
    from .plan import admission, presets
    from .plan.cells import Cell
    from .render import tables
    from .results.rundir import RunDir, writable_dir
    from .run import worker
    from .workload import data

    if args.resume is not None:
        return _resume(args)
    if args.retry_failed:
        raise UsageError("--retry-failed goes with --resume RUN_DIR")
    cells = presets.request(
        config=args.config,
        presets=args.preset,
        models=args.models,
        methods=args.methods,
        ranks=args.ranks,
        repeat=args.repeat,
        settings=_given(args, Cell),
        planning=args.dry_run and args.fit_memory is not None,  # a GPU you do not have, planned for
    )
    device = cells[0].device if cells else "cpu"
    options = _options(args, device)
    writable_dir(args.out, "--out")
    for path in sorted({c.data for c in cells if not c.synthetic_data} if args.download else ()):
        data.download_cifar10(path)
    if not args.dry_run:
        worker.start_workers(options.start_method, cells)  # its imports overlap with the model builds below
    the_plan = admission.Plan.of(cells, args.shard, args.force, options.start_method, args.fit_memory)
    cells = the_plan.cells
    if the_plan.fit_note:
        print(f"lorabench: {the_plan.fit_note}", file=sys.stderr)
    if args.dry_run:
        print(
            tables.plan_table(cells, the_plan.surveys, the_plan.skipped)
            if cells
            else "(this shard has no cells)"
        )
        skipped = [
            f"- {c.model} {c.label}: {the_plan.skipped[c.key()]}"
            for c in cells
            if c.key() in the_plan.skipped
        ]
        if skipped:
            print("\nSkipped (they would be recorded so, with why):\n" + "\n".join(skipped))
        where = f", shard {args.shard} of a {len(the_plan.matrix)}-cell matrix" if args.shard else ""
        print(f"\n{len(cells)} cells on {device}{where}; dry run: nothing trained, nothing written.")
        return EXIT_OK
    run = RunDir.create(args.out)
    with run.lock():
        run.write_plan(the_plan.to_json(run.run_id, sys.argv[1:]))
        return _execute(args, run, the_plan, options)


def _resume(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .measure import environment
    from .plan import admission
    from .plan.cells import SETTINGS, cli_flags
    from .plan.survey import survey_all
    from .results.rundir import RunDir, RunDirError
    from .run import worker

    given = [
        flag
        for dest, flag in [(a, "--" + a) for a in MATRIX_FLAGS]
        + [(fl.dest, fl.flag) for f in SETTINGS for fl in cli_flags(f)]
        if getattr(args, dest) is not None
    ]
    if given or args.dry_run:
        raise UsageError(
            f"--resume takes its cells from RUN_DIR/{RunDir.PLAN}; drop {', '.join(given) or '--dry-run'}"
        )
    try:
        run = RunDir.open(args.resume)
        saved = run.plan()
        cells = saved["cells"]
        device = environment.resolve_device(cells[0].device if cells else "cpu")
        options = _options(args, device)
        with run.lock():
            if run.took_over:
                print(
                    f"lorabench: took over the lock of {run.took_over}, which is no longer running",
                    file=sys.stderr,
                )
            todo, done, warnings = run.pending(cells, args.retry_failed)
            for w in warnings:
                print(f"lorabench: warning: {w}", file=sys.stderr)
            print(
                f"lorabench: resuming {run}: {done} of {len(cells)} cells have rows, {len(todo)} to run",
                file=sys.stderr,
            )
            if todo:
                worker.start_workers(options.start_method, todo)
            skipped = {} if args.force else dict(saved.get("skipped", {}))
            return _execute(args, run, admission.Plan(todo, cells, survey_all(todo), skipped), options)
    except RunDirError as e:  # its message starts with the directory
        raise UsageError(f"--resume {e}") from None
    except InputError as e:  # a plan that no longer builds, or no GPU for a cuda run
        raise UsageError(f"--resume {args.resume}: {e}") from None


def _execute(args: argparse.Namespace, run, the_plan, options) -> int:
    """Run the plan's cells into `run` (skipped ones get their row at once), then report the run directory."""
    from .render import report
    from .run import runner

    cells, skipped = the_plan.cells, the_plan.skipped
    progress = {"on": True, "off": False}.get(args.progress, sys.stderr.isatty())
    n = sum(c.key() not in skipped for c in cells)
    print(f"lorabench: {n} cells on {cells[0].device if cells else 'cpu'} -> {run}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        runner.run_cells(run, cells, the_plan.known(), skipped, options, progress, the_plan.gemms())
    except KeyboardInterrupt:
        print(
            f"\nlorabench: interrupted; every finished cell is in {run.results_path}.\n"
            f"Resume with: lorabench run --resume {run}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    rows, warnings = run.rows()  # the report comes from the results file alone
    report_path = report.write(
        rows, args.report_dir / f"{run.run_id}.md", warnings, args.headline_by, [run.path]
    )
    print(report.summary(rows, args.headline_by))
    failed = sum(not r.ok for r in rows)
    print(f"{n} cells in {time.perf_counter() - t0:.1f} s; the run has {len(rows)} rows, {failed} not ok.")
    print(
        f"Results: {run.results_path}\nReport:  {report_path} (every figure; definitions in docs/metrics.md)"
    )
    return EXIT_FAILED_CELLS if (args.strict and failed) else EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    from .render import report
    from .results.rundir import RunDir, writable_dir

    writable_dir(args.out.parent, "--out")
    writable_dir(args.report_dir, "--report-dir")
    run, merged, missing = RunDir.merge(args.dirs, args.out)
    report_path = report.write(merged, args.report_dir / f"{run.run_id}.md", run_dirs=[run.path, *args.dirs])
    print(
        f"merged {len(args.dirs)} shards: {len(merged)} of {len(run.plan()['cells'])} cells"
        + (f" ({missing} cells have no row in any shard)" if missing else "")
        + f" -> {run}; report {report_path}"
    )
    return EXIT_OK


def _load_rows(run_dirs) -> tuple[list, list]:
    from .results.rundir import RunDir

    rows, warnings = RunDir.load(run_dirs)
    for w in warnings:
        print(f"lorabench: warning: {w}", file=sys.stderr)
    return rows, warnings


def cmd_report(args: argparse.Namespace) -> int:
    from .render import benchmarks, report
    from .results.rundir import writable_dir

    if (args.pytest_benchmark is None) == (not args.run_dirs):
        raise UsageError("give run directories (RUN_DIR) or --pytest-benchmark FILE.json, one of the two")
    if args.pytest_benchmark is not None:
        data = benchmarks.load_pytest_benchmark(args.pytest_benchmark)
        out = args.output or args.report_dir / f"{args.pytest_benchmark.stem}.md"
        write = lambda: out.write_text(benchmarks.pytest_benchmark_report(data), encoding="utf-8")
    else:
        rows, warnings = _load_rows(args.run_dirs)
        name = rows[0].run_id if len(args.run_dirs) == 1 else args.run_dirs[0].name + "-combined"
        out = args.output or args.report_dir / f"{name}.md"
        write = lambda: report.write(rows, out, warnings, args.headline_by, args.run_dirs)
    if out.is_dir():  # checked before anything (plots included) is written
        raise UsageError(f"--output {out} is a directory; give a file name")
    writable_dir(out.parent, "--report-dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    write()
    print(out)
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from .render.comparison import comparison_report
    from .results.compare import THRESHOLDS, compare

    limits = {kind: getattr(args, f"{kind}_threshold") for kind in THRESHOLDS}
    if args.history is not None:
        if len(args.runs) != 1:
            raise UsageError("with --history give one run (the night to judge), not a base run as well")
        if args.window < 1:
            raise UsageError(f"--window must be a whole number >= 1, got {args.window}")
        from .render.trends import window_report
        from .results.history import night_of, tonight

        night = night_of(args.runs[0], _load_rows(args.runs)[0])
        series = tonight(args.history, night, args.window, limits)
        text, failed = (
            window_report(series, args.runs[0].name, args.window),
            any(s.points[-1].flagged for s in series),
        )
    else:
        if len(args.runs) != 2:
            raise UsageError("give BASE_RUN NEW_RUN (or --history HISTORY RUN)")
        base, new = args.runs
        result = compare(_load_rows([base])[0], _load_rows([new])[0], limits, args.allow_environment_change)
        text, failed = comparison_report(result, base.name, new.name), bool(result.regressions)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    return EXIT_FAILED_CELLS if (args.fail_on_regression and failed) else EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    import json

    from .results import history

    if args.history_command == "add":
        night = history.add(history.night_of(args.run_dir, _load_rows([args.run_dir])[0]), args.to)
        print(f"{night.name}: {len(night.cells)} cells added to {args.to}")
        if args.github_benchmark is not None:
            args.github_benchmark.mkdir(parents=True, exist_ok=True)
            smaller, bigger = history.github_benchmark(night)
            for name, entries in (("smaller-is-better.json", smaller), ("bigger-is-better.json", bigger)):
                (args.github_benchmark / name).write_text(json.dumps(entries, indent=1), encoding="utf-8")
        return EXIT_OK
    from .render.trends import history_page

    if args.window < 1:
        raise UsageError(f"--window must be a whole number >= 1, got {args.window}")
    nights = history.load(args.history)
    if not nights:
        raise UsageError(
            f"{args.history}: no history there (lorabench history add RUN_DIR --to {args.history})"
        )
    out = args.output or args.history / "index.md"
    if out.is_dir():
        raise UsageError(f"--output {out} is a directory; give a file name")
    series = history.series_of(nights, args.window)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = history_page(series, out.parent / out.stem, f"{out.stem}/")
    out.write_text(page, encoding="utf-8")
    print(out)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from . import check
    from .measure import environment
    from .render import listings

    device = environment.resolve_device(args.device)
    t0 = time.perf_counter()
    results = check.run_checks(device, lambda name: print(f"lorabench check: {name} ...", file=sys.stderr))
    print(listings.check_table(results, device, time.perf_counter() - t0))
    return EXIT_OK if all(c.ok for c in results) else EXIT_FAILED_CELLS


def cmd_proof(args: argparse.Namespace) -> int:
    from . import proof
    from .measure import environment
    from .results.rundir import writable_dir

    if not args.dry_run:
        environment.resolve_device("cuda")  # one line and exit 2 where torch sees no GPU
    writable_dir(args.out, "OUT")
    done = proof.prove(
        args.out, args.dry_run, lambda name: print(f"lorabench proof: {name} ...", file=sys.stderr)
    )
    for step in done.steps:
        print(f"{step.name:18s} {step.status:8s} {step.seconds:6.1f} s")
    print(f"Proof: {args.out / 'proof.md'} and {args.out / 'proof.json'}")
    return EXIT_OK if all(s.status != "failed" for s in done.steps) else EXIT_FAILED_CELLS


def cmd_list(args: argparse.Namespace) -> int:
    from .render import listings

    print(listings.metrics_table() if args.metrics else listings.registries())
    return EXIT_OK


COMMANDS = {
    "run": cmd_run,
    "report": cmd_report,
    "list": cmd_list,
    "merge": cmd_merge,
    "compare": cmd_compare,
    "check": cmd_check,
    "history": cmd_history,
    "proof": cmd_proof,
}


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import InputError
    from .forksafe import keep_out
    from .run.worker import quiet_library_warnings

    keep_out()  # the parent of a run never initialises CUDA: bitsandbytes' import would (lorabench/forksafe.py)
    quiet_library_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except (UsageError, InputError) as e:
        print(f"lorabench {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

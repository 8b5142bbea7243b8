"""The command line: `lorabench run | report | list`.

    lorabench --help

Every input is validated before any work starts; a bad one prints one line naming the problem
and the accepted values, exits with code 2, and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_FAILED_CELLS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one line, no usage dump, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
    return items


def _ranks(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ranks must be whole numbers separated by commas, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .cells import DTYPES, PRESETS, WEIGHTS
    from .runner import START_METHODS

    parser = _Parser(prog="lorabench", description=(
        "Measure what LoRA buys against full fine-tuning on this machine: trainable parameters, "
        "peak memory, epoch time and task quality, at every rank."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run a matrix of cells and write results and a report", description=(
        "Run every cell of the matrix (models x methods x ranks) in its own process, append one JSON line per "
        "cell to OUT/<run-id>/results.jsonl as it ends, then write REPORT_DIR/<run-id>.md and print the "
        "comparison. With no arguments: the `quick` preset on the best device present."))
    m = run.add_argument_group("matrix")
    m.add_argument("--preset", type=_csv,
                   help=f"comma-separated presets to expand (default: quick; choices: {', '.join(PRESETS)})")
    m.add_argument("--models", type=_csv, help="models to run (replaces the preset's; see `lorabench list`)")
    m.add_argument("--methods", type=_csv, help="methods to run: full, lora, lora-reparam")
    m.add_argument("--ranks", type=_ranks, help="LoRA ranks, e.g. 1,8,64")
    m.add_argument("--repeat", type=int, metavar="N", help="run each cell N times (spread across runs; default 1)")
    m.add_argument("--config", metavar="FILE.toml", help="TOML file with preset/models/methods/ranks/repeat and a "
                   "[settings] table of cell fields; flags given on the command line override it")
    m.add_argument("--shard", metavar="K/N", help="run only shard K of N (balanced by predicted cost); combine the "
                   "shards' run directories with `lorabench merge`")
    s = run.add_argument_group("cell settings (override the preset)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when torch sees a GPU (a ROCm build counts as cuda), else cpu")
    s.add_argument("--epochs", type=int, help="timed epochs per cell")
    s.add_argument("--warmup-epochs", type=int, help="untimed epochs before the timed ones")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--samples", type=int, help="training samples per epoch")
    s.add_argument("--eval-samples", type=int, help="samples in the eval pass after each epoch")
    s.add_argument("--seq-len", type=int, help="tokens per sample (text models)")
    s.add_argument("--lr", type=float, help="Adam learning rate")
    s.add_argument("--alpha", type=float, help="LoRA alpha (default: equal to the rank, scale 1)")
    s.add_argument("--dropout", type=float, help="LoRA dropout (PEFT)")
    s.add_argument("--targets", type=_csv, help="LoRA target modules, comma-separated names (PEFT's rule: a module "
                   "matches when its name equals one or ends with '.'+one); default: the model's")
    s.add_argument("--target-regex", help="LoRA targets as one regex matched against whole module names "
                   r"(seed 001: '.*\.1.*query_key_value')")
    s.add_argument("--modules-to-save", type=_csv, help="modules trained in full beside the adapters (PEFT)")
    s.add_argument("--pretrain-epochs", type=int, help="train the base in full this many epochs before the method, "
                   "untimed (seed 002 continues LoRA from trained weights)")
    s.add_argument("--data", help="synthetic (default), a CIFAR-10 directory, a .csv/.jsonl with text,label, or a "
                   ".jsonl with instruction,input,output")
    s.add_argument("--download", action="store_true", help="download CIFAR-10 into --data DIR first (needs a network)")
    s.add_argument("--task", choices=["sequence-classification", "causal-lm"],
                   help="task of an hf: model when it cannot be inferred from its configuration")
    s.add_argument("--dtype", choices=DTYPES)
    s.add_argument("--weights", choices=WEIGHTS, help="random (from the configuration, default) or pretrained")
    s.add_argument("--seed", type=int)
    o = run.add_argument_group("output and control")
    o.add_argument("--out", type=Path, default=Path("results"), help="results directory (default: results)")
    o.add_argument("--report-dir", type=Path, default=Path("report"), help="report directory (default: report)")
    o.add_argument("--dry-run", action="store_true", help="build every cell, print counts and the plan, train nothing")
    o.add_argument("--cell-timeout", type=float, metavar="S", help="seconds after which a cell is killed (row: timeout)")
    o.add_argument("--strict", action="store_true", help="exit 1 when any cell did not finish ok")
    o.add_argument("--resume", type=Path, metavar="RUN_DIR", help="finish an interrupted run: run only the cells of "
                   "RUN_DIR/plan.json that have no row yet")
    o.add_argument("--retry-failed", action="store_true", help="with --resume: also re-run cells whose row is not ok "
                   "(their old rows are replaced)")
    o.add_argument("--parallel", default="1", metavar="auto|N", help="cells at a time, one per visible GPU, each "
                   "pinned by CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES (auto: one per GPU; the CPU runs one)")
    o.add_argument("--sample-interval-ms", type=float, default=10.0, metavar="MS",
                   help="sampling period of the memory samplers (host RSS, NVML, amdsmi); default 10")
    o.add_argument("--force", action="store_true", help="run cells predicted not to fit in free memory (otherwise "
                   "they are recorded as skipped)")
    o.add_argument("--cell-memory-limit", type=float, metavar="MIB", help="host memory (MiB) a cell's process may "
                   "map beyond what it holds at its start (RLIMIT_AS); an allocation past it ends the cell as oom")
    o.add_argument("--start-method", choices=START_METHODS, default="forkserver",
                   help="how each cell's fresh process starts (forkserver: forked from a clean server that "
                        "preloaded torch/transformers/peft; spawn: a new interpreter per cell)")
    o.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bars (auto: only when stderr is a terminal)")

    rep = sub.add_parser("report", help="render the markdown report of one or more run directories",
                         description="Render RUN_DIR/results.jsonl into markdown (from the results files alone). "
                                     "Several run directories (shards, repeats) render as one report.")
    rep.add_argument("run_dirs", type=Path, nargs="*", metavar="RUN_DIR")
    rep.add_argument("--pytest-benchmark", type=Path, metavar="FILE.json",
                     help="render a pytest-benchmark JSON (pytest bench/ --benchmark-json FILE) instead")
    rep.add_argument("--report-dir", type=Path, default=Path("report"), help="where <run-id>.md goes (default: report)")
    rep.add_argument("-o", "--output", type=Path, help="write the report to this file instead")

    cmp_ = sub.add_parser("compare", help="compare two runs and flag regressions",
                          description="Match the cells of two runs by their parameters, print the change of every "
                                      "figure, and flag regressions past the thresholds (and past twice the measured "
                                      "spread where repeats exist).")
    cmp_.add_argument("base", type=Path, metavar="BASE_RUN")
    cmp_.add_argument("new", type=Path, metavar="NEW_RUN")
    cmp_.add_argument("--time-threshold", type=float, default=10.0, metavar="PCT", help="slower by more than this %% (default 10)")
    cmp_.add_argument("--memory-threshold", type=float, default=5.0, metavar="PCT", help="larger by more than this %% (default 5)")
    cmp_.add_argument("--quality-threshold", type=float, default=1.0, metavar="POINTS",
                      help="accuracy lower by more than this many points (default 1)")
    cmp_.add_argument("--fail-on-regression", action="store_true", help="exit 1 when any regression is flagged")
    cmp_.add_argument("-o", "--output", type=Path, help="also write the comparison (markdown) to this file")

    sub.add_parser("list", help="list models, methods and presets", description="List the registries.")

    mrg = sub.add_parser("merge", help="combine the run directories of shards into one run",
                         description="Combine the results of `lorabench run --shard K/N` runs of one matrix into OUT, "
                                     "refusing shards of different matrices or lorabench versions, then report it.")
    mrg.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="run directories of the shards")
    mrg.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="the merged run directory (new)")
    mrg.add_argument("--report-dir", type=Path, default=Path("report"), help="report directory (default: report)")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lorabench")
    except PackageNotFoundError:
        return "unknown"


def _writable_dir(path: Path, flag: str) -> None:
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{flag} {path}: {p} is a file, not a directory")
            return


def resolve_device(requested: str) -> str:
    import torch
    has_gpu = torch.cuda.is_available()   # true on ROCm builds too (HIP masquerades as cuda)
    if requested == "cuda" and not has_gpu:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else (
            f"ROCm {torch.version.hip}" if torch.version.hip else "CPU-only")
        raise UsageError(f"--device cuda: torch sees no GPU here (torch {torch.__version__}, {build} build); "
                         "use --device cpu or auto")
    if requested == "auto":
        return "cuda" if has_gpu else "cpu"
    return requested


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {"epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "batch_size": args.batch_size,
             "samples": args.samples, "eval_samples": args.eval_samples, "seq_len": args.seq_len, "lr": args.lr,
             "alpha": args.alpha, "dtype": args.dtype, "weights": args.weights, "seed": args.seed,
             "dropout": args.dropout, "targets": tuple(args.targets) if args.targets else args.target_regex,
             "modules_to_save": tuple(args.modules_to_save) if args.modules_to_save else None,
             "pretrain_epochs": args.pretrain_epochs, "data": args.data, "task": args.task}
    if args.targets and args.target_regex:
        raise UsageError("give --targets or --target-regex, not both")
    return {k: v for k, v in flags.items() if v is not None}


MATRIX_FLAGS = ("preset", "models", "methods", "ranks", "repeat", "config", "shard", "device", "epochs",
                "warmup_epochs", "batch_size", "samples", "eval_samples", "seq_len", "lr", "alpha", "dtype",
                "weights", "seed", "dropout", "targets", "target_regex", "modules_to_save", "pretrain_epochs",
                "data", "task")


def _parallel(text: str, device: str) -> int:
    import torch
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if text == "auto":
        return max(gpus, 1)
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"--parallel must be auto or a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise UsageError(f"--parallel must be auto or a whole number >= 1, got {n}")
    if n > 1 and device != "cuda":
        raise UsageError("--parallel > 1 runs one cell per GPU; on the CPU, cells would share cores and distort "
                         "each other's timings")
    if n > 1 and n > gpus:
        raise UsageError(f"--parallel {n}: only {gpus} GPU(s) visible")
    return n


def _control(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Validated run-control options shared by new and resumed runs."""
    if args.cell_timeout is not None and not args.cell_timeout > 0:
        raise UsageError(f"--cell-timeout must be > 0 seconds, got {args.cell_timeout:g}")
    if args.cell_memory_limit is not None and not args.cell_memory_limit > 0:
        raise UsageError(f"--cell-memory-limit must be > 0 MiB, got {args.cell_memory_limit:g}")
    _writable_dir(args.report_dir, "--report-dir")
    if not args.sample_interval_ms > 0:
        raise UsageError(f"--sample-interval-ms must be > 0, got {args.sample_interval_ms:g}")
    return {"timeout_s": args.cell_timeout, "start_method": args.start_method,
            "sample_interval_s": args.sample_interval_ms / 1e3,
            "parallel": _parallel(args.parallel, device),
            "memory_limit_bytes": int(args.cell_memory_limit * 2 ** 20) if args.cell_memory_limit else None}


def _survey_all(cells) -> list:
    """What is known of every cell before it runs (counts, task, prediction), built on the meta
    device; an unbuildable cell, data of the wrong kind, or weights that cannot be had are bad input."""
    from . import data, runner
    from .methods import MethodError
    from .models import ModelError, check_pretrained

    surveys, kinds = {}, {}
    for cell in cells:
        shape = (cell.model, cell.method, cell.rank, cell.targets, cell.modules_to_save, cell.task,
                 cell.batch_size, cell.grad_accum, cell.seq_len, cell.dtype)
        if shape not in surveys:
            try:
                surveys[shape] = runner.survey(cell)
            except (ModelError, MethodError) as e:
                raise UsageError(str(e)) from None
        cell_survey = surveys[shape]
        if cell.data != "synthetic":
            if cell.data not in kinds:   # detection parses the whole file: once per path
                try:
                    kinds[cell.data] = data.detect(cell.data)
                except data.DataError as e:
                    raise UsageError(str(e)) from None
            kind = kinds[cell.data]
            if data.task_of(kind) != cell_survey.task:
                raise UsageError(f"--data {cell.data} holds {kind} data ({data.task_of(kind)}) but {cell.model} is a "
                                 f"{cell_survey.task} model")
    for model in sorted({c.model for c in cells if c.weights == "pretrained"}):
        try:
            check_pretrained(model)
        except ModelError as e:
            raise UsageError(str(e)) from None
    return [surveys[(c.model, c.method, c.rank, c.targets, c.modules_to_save, c.task, c.batch_size, c.grad_accum,
                     c.seq_len, c.dtype)] for c in cells]


def _fit_gate(cells, surveys, device: str, force: bool) -> dict[str, str]:
    """{cell key: why it is skipped} for cells predicted not to fit in free memory. When no cell
    fits, the whole plan is refused up front."""
    from .environment import free_memory_bytes

    free, what = free_memory_bytes(device)
    if free is None:
        print(f"lorabench: no fit check before running: {what}", file=sys.stderr)
        return {}
    if force:
        return {}
    gib = 2 ** 30
    skipped = {c.key(): f"predicted to need {s.prediction.total_bytes / gib:.2f} GiB; {what}: {free / gib:.2f} GiB "
                        "(--force runs it anyway)"
               for c, s in zip(cells, surveys) if s.prediction.total_bytes > free}
    if cells and len(skipped) == len(cells):
        need = max(s.prediction.total_bytes for s in surveys)
        raise UsageError(f"no cell fits this device: the largest is predicted to need {need / gib:.2f} GiB, "
                         f"{what}: {free / gib:.2f} GiB (--force runs them anyway)")
    return skipped


def cmd_run(args: argparse.Namespace) -> int:
    from . import environment, report, results, runner
    from .cells import CellError, load_config, parse_shard, plan, shard

    if args.resume is not None:
        return _resume(args)
    if args.retry_failed:
        raise UsageError("--retry-failed goes with --resume RUN_DIR")
    try:
        config = load_config(args.config) if args.config else {}
        settings = dict(config.get("settings", {}))
        device = resolve_device(args.device or settings.pop("device", None) or "auto")
        repeat = args.repeat if args.repeat is not None else config.get("repeat", 1)
        cells = plan(args.preset or config.get("preset") or ["quick"], args.models or config.get("models"),
                     args.methods or config.get("methods"), args.ranks or config.get("ranks"),
                     {**settings, **_overrides(args), "device": device}, repeat)
        k_n = parse_shard(args.shard) if args.shard else None
    except CellError as e:
        raise UsageError(str(e)) from None
    control = _control(args, device)
    _writable_dir(args.out, "--out")
    if args.download:
        _download(cells)
    if not args.dry_run:
        runner.start_workers(args.start_method, cells)   # its imports overlap with the model builds below
    surveys = _survey_all(cells)
    matrix_id = runner.matrix_id(cells)
    if k_n:
        chosen = {c.key() for c in shard(cells, [runner.predicted_cost(c, s) for c, s in zip(cells, surveys)], *k_n)}
        surveys = [s for c, s in zip(cells, surveys) if c.key() in chosen]
        matrix, cells = cells, [c for c in cells if c.key() in chosen]
    else:
        matrix = cells
    skipped = _fit_gate(cells, surveys, device, args.force)
    if args.dry_run:
        print(report.plan_table(cells, surveys, skipped) if cells else "(this shard has no cells)")
        where = f", shard {args.shard} of a {len(matrix)}-cell matrix" if k_n else ""
        print(f"\n{len(cells)} cells on {device}{where}; dry run: nothing trained, nothing written.")
        return EXIT_OK

    run_id = results.new_run_id()
    run_dir = args.out / run_id
    run_dir.mkdir(parents=True)
    with results.RunLock(run_dir):
        results.write_json(run_dir / results.PLAN_FILE, {
            "run_id": run_id, "argv": sys.argv[1:], "matrix_id": matrix_id, "shard": args.shard,
            "lorabench_commit": environment.project_commit(), "skipped": skipped,
            "cells": [c.to_dict() for c in cells], "matrix": [c.to_dict() for c in matrix]})
        return _execute(args, cells, run_dir, run_id, control, surveys, skipped)


def _download(cells) -> None:
    from . import data
    for path in sorted({c.data for c in cells if c.data != "synthetic"}):
        try:
            data.download_cifar10(path)
        except Exception as e:   # no network, or a refused connection: one line, exit 2
            raise UsageError(f"--download: cannot fetch CIFAR-10 into {path} ({type(e).__name__}: {e})") from None


def _resume(args: argparse.Namespace) -> int:
    from . import results
    from .cells import Cell, CellError

    given = [f"--{f.replace('_', '-')}" for f in MATRIX_FLAGS if getattr(args, f) is not None]
    if given or args.dry_run:
        raise UsageError(f"--resume takes its cells from RUN_DIR/{results.PLAN_FILE}; drop {', '.join(given) or '--dry-run'}")
    run_dir = args.resume
    plan_path = run_dir / results.PLAN_FILE
    if not plan_path.is_file():
        raise UsageError(f"--resume {run_dir}: no {results.PLAN_FILE} here; pass a run directory made by `lorabench run`")
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        cells = [Cell.from_dict(c) for c in plan["cells"]]
    except (ValueError, KeyError, TypeError, CellError) as e:
        raise UsageError(f"--resume {run_dir}: unreadable {results.PLAN_FILE} ({e})") from None
    device = cells[0].device if cells else "cpu"
    if device == "cuda":
        resolve_device("cuda")
    control = _control(args, device)
    try:
        lock = results.RunLock(run_dir).__enter__()
    except results.RunDirLocked as e:
        raise UsageError(str(e)) from None
    try:
        if lock.took_over:
            print(f"lorabench: took over the lock of {lock.took_over}, which is no longer running", file=sys.stderr)
        rows, warnings = results.read_rows(run_dir) if (run_dir / results.RESULTS_FILE).exists() else ([], [])
        for w in warnings:
            print(f"lorabench: warning: {w}", file=sys.stderr)
        keep = [r for r in results.final_rows(rows).values() if not (args.retry_failed and r["status"] != "ok")]
        if warnings or len(keep) != len(rows):
            results.rewrite_rows(run_dir, keep)   # drop a torn line and replaced rows before appending
        done = {r["cell_key"] for r in keep}
        todo = [c for c in cells if c.key() not in done]
        print(f"lorabench: resuming {run_dir}: {len(done)} of {len(cells)} cells have rows, {len(todo)} to run",
              file=sys.stderr)
        if todo:
            from . import runner
            runner.start_workers(args.start_method, todo)
        surveys = _survey_all(todo)
        skipped = {} if args.force else {k: v for k, v in plan.get("skipped", {}).items()}
        return _execute(args, todo, run_dir, plan["run_id"], control, surveys, skipped)
    finally:
        lock.__exit__(None, None, None)


def _execute(args: argparse.Namespace, cells, run_dir: Path, run_id: str, control: dict[str, Any],
             surveys, skipped: dict[str, str]) -> int:
    """Run `cells` into run_dir (skipped ones get their row at once), then report the run directory."""
    from . import report, results, runner

    predicted = {c.key(): s.prediction.to_metrics() for c, s in zip(cells, surveys)}
    for cell in cells:
        if cell.key() in skipped:
            body = runner.failure("skipped", "PredictedNotToFit", skipped[cell.key()])
            body["metrics"].update(predicted[cell.key()])
            results.append_row(run_dir, runner.make_row(run_id, cell, body, 0.0))
    cells = [c for c in cells if c.key() not in skipped]
    progress = {"on": True, "off": False}.get(args.progress, sys.stderr.isatty())
    device = cells[0].device if cells else "cpu"
    print(f"lorabench: {len(cells)} cells on {device} -> {run_dir}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        flops = runner.calibrate(device, cells[0].dtype, control["start_method"]) if cells else None
        if flops:
            results.write_json(run_dir / "calibration.json", {"device": device, "dtype": cells[0].dtype,
                                                              "matmul_flops": flops})
        runner.run_matrix(cells, run_dir, run_id, progress=progress, predicted=predicted, matmul_flops=flops,
                          **control)
    except KeyboardInterrupt:
        print(f"\nlorabench: interrupted; every finished cell is in {run_dir / results.RESULTS_FILE}.\n"
              f"Resume with: lorabench run --resume {run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    rows, warnings = results.read_rows(run_dir)   # the report comes from the results file alone
    args.report_dir.mkdir(parents=True, exist_ok=True)
    report_path = args.report_dir / f"{run_id}.md"
    report_path.write_text(report.render(rows, warnings, plot_dir=args.report_dir / run_id, plot_link=f"{run_id}/"),
                           encoding="utf-8")
    print(report.summary(rows))
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(cells)} cells in {time.perf_counter() - t0:.1f} s; the run has {len(rows)} rows, {failed} not ok. "
          f"Results: {run_dir / results.RESULTS_FILE}  Report: {report_path}")
    return EXIT_FAILED_CELLS if (args.strict and failed) else EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    from . import report, results

    out = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not an empty directory; merge into a new one")
    _writable_dir(out.parent, "--out")
    _writable_dir(args.report_dir, "--report-dir")
    plans, rows = [], []
    for d in args.dirs:
        try:
            plans.append(json.loads((d / results.PLAN_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            raise UsageError(f"{d}: no readable {results.PLAN_FILE}; pass run directories made by `lorabench run --shard`") from None
        shard_rows, warnings = results.read_rows(d) if (d / results.RESULTS_FILE).exists() else ([], [])
        for w in warnings:
            print(f"lorabench: warning: {w}", file=sys.stderr)
        rows.append(list(results.final_rows(shard_rows).values()))
    for d, p in zip(args.dirs[1:], plans[1:]):
        if p.get("matrix_id") != plans[0].get("matrix_id"):
            raise UsageError(f"{d} ran a different matrix than {args.dirs[0]} ({p.get('matrix_id')} vs "
                             f"{plans[0].get('matrix_id')}); merge only shards of one matrix")
        if p.get("lorabench_commit") != plans[0].get("lorabench_commit"):
            raise UsageError(f"{d} was made by lorabench {p.get('lorabench_commit')} and {args.dirs[0]} by "
                             f"{plans[0].get('lorabench_commit')}; merge only shards of one code version")
    owner: dict[str, Path] = {}
    for d, shard_rows in zip(args.dirs, rows):
        for r in shard_rows:
            if r["cell_key"] in owner:
                raise UsageError(f"cell {r['cell']['model']} {r['label']} is in both {owner[r['cell_key']]} and {d}; "
                                 "were the shards of one --shard K/N split?")
            owner[r["cell_key"]] = d
    matrix = plans[0]["matrix"]
    from .cells import Cell
    order = {Cell.from_dict(c).key(): i for i, c in enumerate(matrix)}
    merged = sorted((r for shard_rows in rows for r in shard_rows), key=lambda r: order.get(r["cell_key"], len(order)))
    missing = len(set(order) - set(owner))
    out.mkdir(parents=True, exist_ok=True)
    results.rewrite_rows(out, merged)
    results.write_json(out / results.PLAN_FILE, {**plans[0], "run_id": out.name, "shard": None, "cells": matrix,
                                                 "merged_from": [str(d) for d in args.dirs]})
    env = next((d / results.ENVIRONMENT_FILE for d in args.dirs if (d / results.ENVIRONMENT_FILE).exists()), None)
    if env is not None:
        (out / results.ENVIRONMENT_FILE).write_text(env.read_text(encoding="utf-8"), encoding="utf-8")
    args.report_dir.mkdir(parents=True, exist_ok=True)
    report_path = args.report_dir / f"{out.name}.md"
    report_path.write_text(report.render(merged, plot_dir=args.report_dir / out.name, plot_link=f"{out.name}/"),
                           encoding="utf-8")
    print(f"merged {len(args.dirs)} shards: {len(merged)} of {len(matrix)} cells"
          + (f" ({missing} cells have no row in any shard)" if missing else "") + f" -> {out}; report {report_path}")
    return EXIT_OK


def _load_rows(run_dirs) -> tuple[list, list]:
    from . import results
    rows, warnings = [], []
    for d in run_dirs:
        path = d / results.RESULTS_FILE
        if not path.is_file():
            raise UsageError(f"{d}: no {results.RESULTS_FILE} here; pass a run directory made by `lorabench run`")
        r, w = results.read_rows(d)
        rows += list(results.final_rows(r).values())
        warnings += w
    if not rows:
        raise UsageError(f"{', '.join(map(str, run_dirs))}: no result rows")
    return rows, warnings


def cmd_report(args: argparse.Namespace) -> int:
    from . import report

    if args.pytest_benchmark is not None:
        if args.run_dirs:
            raise UsageError("give run directories or --pytest-benchmark FILE.json, not both")
        try:
            data = json.loads(args.pytest_benchmark.read_text(encoding="utf-8"))
            benchmarks = data["benchmarks"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--pytest-benchmark {args.pytest_benchmark}: not a pytest-benchmark JSON ({e})") from None
        if not isinstance(benchmarks, list):
            raise UsageError(f"--pytest-benchmark {args.pytest_benchmark}: 'benchmarks' is not a list")
        out = args.output or args.report_dir / f"{args.pytest_benchmark.stem}.md"
        render = lambda: report.pytest_benchmark_report(data)   # noqa: E731
    else:
        if not args.run_dirs:
            raise UsageError("give a run directory (RUN_DIR) or --pytest-benchmark FILE.json")
        rows, warnings = _load_rows(args.run_dirs)
        for w in warnings:
            print(f"lorabench: warning: {w}", file=sys.stderr)
        name = rows[0]["run_id"] if len(args.run_dirs) == 1 else args.run_dirs[0].name + "-combined"
        out = args.output or args.report_dir / f"{name}.md"
        render = lambda: report.render(rows, warnings, plot_dir=out.parent / out.stem,   # noqa: E731
                                       plot_link=f"{out.stem}/")
    if out.is_dir():   # checked before anything (plots included) is written
        raise UsageError(f"--output {out} is a directory; give a file name")
    _writable_dir(out.parent, "--report-dir")
    text = render()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(out)
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from . import report
    from .compare import compare

    for flag, value in (("--time-threshold", args.time_threshold), ("--memory-threshold", args.memory_threshold),
                        ("--quality-threshold", args.quality_threshold)):
        if not value >= 0:
            raise UsageError(f"{flag} must be >= 0, got {value:g}")
    base, bw = _load_rows([args.base])
    new, nw = _load_rows([args.new])
    for w in bw + nw:
        print(f"lorabench: warning: {w}", file=sys.stderr)
    result = compare(base, new, {"time": args.time_threshold, "memory": args.memory_threshold,
                                 "quality": args.quality_threshold})
    text = report.comparison_report(result, args.base.name, args.new.name)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    return EXIT_FAILED_CELLS if (args.fail_on_regression and result.regressions) else EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from . import runner
    from .cells import PRESETS, Cell
    from .methods import METHODS
    from .models import MODELS

    print("models:")
    for name, builder in MODELS.items():
        total = runner.inspect(Cell(model=name, method="full")).total
        print(f"  {name:14s} {total:>15,} parameters  {(builder.__doc__ or '').strip().splitlines()[0]}")
    print("  hf:<dir|id>    any transformers model for sequence classification or causal LM")
    print("methods:")
    for name, fn in METHODS.items():
        print(f"  {name}")
    print("presets:")
    for name, matrices in PRESETS.items():
        n = sum(len(mx.cells()) for mx in matrices)
        models = sorted({m for mx in matrices for m in mx.models})
        print(f"  {name:14s} {n:3d} cells  models: {', '.join(models)}")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "report": cmd_report, "list": cmd_list, "merge": cmd_merge, "compare": cmd_compare}


def main(argv: Sequence[str] | None = None) -> int:
    from .runner import quiet_library_warnings
    quiet_library_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"lorabench {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

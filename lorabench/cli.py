"""The command line: `lorabench run | report | list`.

    lorabench --help

Every input is validated before any work starts; a bad one prints one line naming the problem
and the accepted values, exits with code 2, and writes nothing.
"""
from __future__ import annotations

import argparse
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
    m.add_argument("--preset", type=_csv, default=["quick"],
                   help=f"comma-separated presets to expand (default: quick; choices: {', '.join(PRESETS)})")
    m.add_argument("--models", type=_csv, help="models to run (replaces the preset's; see `lorabench list`)")
    m.add_argument("--methods", type=_csv, help="methods to run: full, lora, lora-reparam")
    m.add_argument("--ranks", type=_ranks, help="LoRA ranks, e.g. 1,8,64")
    m.add_argument("--repeat", type=int, default=1, metavar="N", help="run each cell N times (spread across runs)")
    s = run.add_argument_group("cell settings (override the preset)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when torch sees a GPU (a ROCm build counts as cuda), else cpu")
    s.add_argument("--epochs", type=int, help="timed epochs per cell")
    s.add_argument("--warmup-epochs", type=int, help="untimed epochs before the timed ones")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--samples", type=int, help="training samples per epoch")
    s.add_argument("--eval-samples", type=int, help="samples in the eval pass after each epoch")
    s.add_argument("--seq-len", type=int, help="tokens per sample (text models)")
    s.add_argument("--lr", type=float, help="Adam learning rate")
    s.add_argument("--alpha", type=float, help="LoRA alpha (default: equal to the rank, scale 1)")
    s.add_argument("--dtype", choices=DTYPES)
    s.add_argument("--weights", choices=WEIGHTS, help="random (from the configuration, default) or pretrained")
    s.add_argument("--seed", type=int)
    o = run.add_argument_group("output and control")
    o.add_argument("--out", type=Path, default=Path("results"), help="results directory (default: results)")
    o.add_argument("--report-dir", type=Path, default=Path("report"), help="report directory (default: report)")
    o.add_argument("--dry-run", action="store_true", help="build every cell, print counts and the plan, train nothing")
    o.add_argument("--cell-timeout", type=float, metavar="S", help="seconds after which a cell is killed (row: timeout)")
    o.add_argument("--strict", action="store_true", help="exit 1 when any cell did not finish ok")
    o.add_argument("--start-method", choices=["forkserver", "spawn"], default="forkserver",
                   help="how each cell's fresh process starts (forkserver: forked from a clean server that "
                        "preloaded torch/transformers/peft; spawn: a new interpreter per cell)")
    o.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bars (auto: only when stderr is a terminal)")

    rep = sub.add_parser("report", help="render the markdown report of a run directory",
                         description="Render RUN_DIR/results.jsonl into markdown (from the results file alone).")
    rep.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    rep.add_argument("--report-dir", type=Path, default=Path("report"), help="where <run-id>.md goes (default: report)")
    rep.add_argument("-o", "--output", type=Path, help="write the report to this file instead")

    sub.add_parser("list", help="list models, methods and presets", description="List the registries.")
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


def _overrides(args: argparse.Namespace, device: str) -> dict[str, Any]:
    flags = {"epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "batch_size": args.batch_size,
             "samples": args.samples, "eval_samples": args.eval_samples, "seq_len": args.seq_len, "lr": args.lr,
             "alpha": args.alpha, "dtype": args.dtype, "weights": args.weights, "seed": args.seed}
    return {"device": device, **{k: v for k, v in flags.items() if v is not None}}


def cmd_run(args: argparse.Namespace) -> int:
    from . import report, results, runner
    from .cells import CellError, plan
    from .methods import MethodError
    from .models import ModelError

    device = resolve_device(args.device)
    try:
        cells = plan(args.preset, args.models, args.methods, args.ranks, _overrides(args, device), args.repeat)
    except CellError as e:
        raise UsageError(str(e)) from None
    if args.cell_timeout is not None and not args.cell_timeout > 0:
        raise UsageError(f"--cell-timeout must be > 0 seconds, got {args.cell_timeout:g}")
    _writable_dir(args.out, "--out")
    _writable_dir(args.report_dir, "--report-dir")
    if not args.dry_run:
        runner.start_workers(args.start_method)   # its imports overlap with the model builds below
    counts = {}
    for cell in cells:   # builds on the meta device: refuses unbuildable cells before anything is written
        shape = (cell.model, cell.method, cell.rank, cell.targets, cell.modules_to_save)
        if shape not in counts:
            try:
                counts[shape] = runner.inspect(cell)
            except (ModelError, MethodError) as e:
                raise UsageError(str(e)) from None
    params = [counts[(c.model, c.method, c.rank, c.targets, c.modules_to_save)] for c in cells]
    if args.dry_run:
        print(report.plan_table(cells, params))
        print(f"\n{len(cells)} cells on {device}; dry run: nothing trained, nothing written.")
        return EXIT_OK

    run_id = results.new_run_id()
    run_dir = args.out / run_id
    run_dir.mkdir(parents=True)
    results.write_json(run_dir / "plan.json", {"run_id": run_id, "argv": sys.argv[1:], "cells": [c.to_dict() for c in cells]})
    progress = {"on": True, "off": False}.get(args.progress, sys.stderr.isatty())
    print(f"lorabench: {len(cells)} cells on {device} -> {run_dir}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        rows = runner.run_matrix(cells, run_dir, run_id, progress=progress, timeout_s=args.cell_timeout,
                                 start_method=args.start_method)
    except KeyboardInterrupt:
        print(f"\nlorabench: interrupted; finished cells are in {run_dir / results.RESULTS_FILE}", file=sys.stderr)
        return EXIT_INTERRUPTED
    rows, warnings = results.read_rows(run_dir)   # the report comes from the results file alone
    args.report_dir.mkdir(parents=True, exist_ok=True)
    report_path = args.report_dir / f"{run_id}.md"
    report_path.write_text(report.render(rows, warnings), encoding="utf-8")
    print(report.summary(rows))
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows)} cells in {time.perf_counter() - t0:.1f} s ({failed} not ok). "
          f"Results: {run_dir / results.RESULTS_FILE}  Report: {report_path}")
    return EXIT_FAILED_CELLS if (args.strict and failed) else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from . import report, results

    path = args.run_dir / results.RESULTS_FILE
    if not path.is_file():
        raise UsageError(f"{args.run_dir}: no {results.RESULTS_FILE} here; pass a run directory made by `lorabench run`")
    rows, warnings = results.read_rows(args.run_dir)
    if not rows:
        raise UsageError(f"{path}: no result rows to report")
    for w in warnings:
        print(f"lorabench: warning: {w}", file=sys.stderr)
    out = args.output
    if out is None:
        _writable_dir(args.report_dir, "--report-dir")
        out = args.report_dir / f"{rows[0]['run_id']}.md"
    elif out.is_dir():
        raise UsageError(f"--output {out} is a directory; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.render(rows, warnings), encoding="utf-8")
    print(out)
    return EXIT_OK


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


COMMANDS = {"run": cmd_run, "report": cmd_report, "list": cmd_list}


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

"""The commands: `run`, `report`, `compare`, `check`, `proof`, `list`, `merge`, `history`, each a
function of its parsed arguments returning an exit code.

    lorabench run --dry-run            # cmd_run: plan the matrix, print it, train nothing

Each validates what it was given before any work starts (a bad value raises UsageError or an
InputError, which `cli.main` prints as one line with exit code 2); the work itself is done by
`plan`, `runner`, `rundir` and `report`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .parser import EXIT_FAILED_CELLS, EXIT_INTERRUPTED, EXIT_OK, MATRIX_FLAGS, UsageError, given


def _options(args: argparse.Namespace, device: str):
    """Validated run options, shared by new and resumed runs."""
    from .results.rundir import writable_dir
    from .run.worker import RunOptions

    writable_dir(args.report_dir, "--report-dir")
    return RunOptions(
        **given(args, RunOptions), profile=args.profile, memory_snapshot=args.memory_snapshot
    ).on(device)


def cmd_run(args: argparse.Namespace) -> int:
    from .plan import admission, presets
    from .plan.cells import Cell
    from .render import dryrun
    from .results.rundir import RunDir, writable_dir
    from .run import worker
    from .workload import data

    if args.resume is not None:
        return _resume(args)
    if args.retry_failed:
        raise UsageError("--retry-failed goes with --resume RUN_DIR")
    target = _target(args)
    cells = presets.request(
        config=args.config,
        presets=args.preset,
        models=args.models,
        methods=args.methods,
        ranks=args.ranks,
        repeat=args.repeat,
        settings={**given(args, Cell), **({"device": "cuda"} if target else {})},
        planning=args.dry_run
        and (args.fit_memory is not None or target is not None),  # a GPU you do not have
    )
    device = cells[0].device if cells else "cpu"
    options = _options(args, device)
    writable_dir(args.out, "--out")
    for path in sorted({c.data for c in cells if not data.has_tasks(c.data)} if args.download else ()):
        data.download_cifar10(path)
    fit_memory = args.fit_memory if args.fit_memory is not None or not target else target.memory_bytes
    if not args.dry_run:
        # the fork server's imports (torch, peft: ~4 s on 2 cores) overlap the plan's survey; the
        # plan waits for them to end before it measures the rates (beside them, a bert-tiny step
        # of 12 ms was predicted at 140 ms)
        worker.start_workers(options.start_method, cells)
    the_plan = admission.Plan.of(
        cells,
        args.shard,
        args.force,
        options.start_method,
        fit_memory,
        args.target if target else None,
        quiet=lambda: worker.workers_ready(options.start_method),
    )
    cells = the_plan.cells
    if the_plan.fit_note:
        print(f"lorabench: {the_plan.fit_note}", file=sys.stderr)
    if args.dry_run:
        print(
            dryrun.plan_table(cells, the_plan.surveys, the_plan.skipped)
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
        said = dryrun.plan_time(the_plan)
        print(
            ("\n" + said if said else "")
            + f"\n{len(cells)} cells on {device}{where}; dry run: nothing trained, nothing written."
        )
        return EXIT_OK
    run = RunDir.create(args.out)
    with run.lock():
        run.write_plan(the_plan.to_json(run.run_id, sys.argv[1:]))
        return _execute(args, run, the_plan, options)


def _target(args: argparse.Namespace, needs_dry_run: bool = True):
    """The accelerator --target names (with --dry-run, for `run`), or None."""
    from .plan import accelerators
    from .plan.cells import DEVICES

    if args.target is None:
        return None
    if needs_dry_run and not args.dry_run:
        raise UsageError("--target plans for an accelerator you do not have: it goes with --dry-run")
    if args.device is not None and args.device in DEVICES and not DEVICES[args.device].on:
        raise UsageError(f"--target {args.target} is a GPU: drop --device {args.device}")
    try:
        return accelerators.find(args.target)
    except KeyError:
        raise UsageError(
            f"--target {args.target!r}: unknown accelerator; choose from {', '.join(accelerators.ACCELERATORS)}"
        ) from None


def _resume(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .measure import environment
    from .plan import admission
    from .plan.cells import SETTINGS
    from .plan.flags import cli_flags
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


def _progress(args: argparse.Namespace) -> bool:
    """Whether --progress shows the bar: on, off, or (auto) where stderr is a terminal."""
    return {"on": True, "off": False}.get(args.progress, sys.stderr.isatty())


def _goal(args: argparse.Namespace):
    """The quality target the user set (--target-accuracy, --target-loss), else the default one."""
    from .results.quality import Goal

    return Goal(args.target_accuracy, args.target_loss)


def _report(args: argparse.Namespace, run) -> tuple[list, Path]:
    """The run directory's rows and the report written from them (from the results file alone)."""
    from .render import report

    rows, warnings = run.rows()
    return rows, report.write(
        rows, args.report_dir / f"{run.run_id}.md", warnings, args.headline_by, [run.path], _goal(args)
    )


def _execute(args: argparse.Namespace, run, the_plan, options) -> int:
    """Run the plan's cells into `run` (skipped ones get their row at once), then report the run directory."""
    from .render import report
    from .run import runner

    cells, skipped = the_plan.cells, the_plan.skipped
    progress = _progress(args)
    n = sum(c.key() not in skipped for c in cells)
    print(f"lorabench: {n} cells on {cells[0].device if cells else 'cpu'} -> {run}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        runner.run_cells(
            run, cells, the_plan.known(), skipped, options, progress, the_plan.gemms(), the_plan.steps()
        )
    except KeyboardInterrupt:
        print(
            f"\nlorabench: interrupted; every finished cell is in {run.results_path}.\n"
            f"Resume with: lorabench run --resume {run}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    rows, report_path = _report(args, run)
    print(report.summary(rows, args.headline_by, _goal(args)))
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
        write = lambda: report.write(rows, out, warnings, args.headline_by, args.run_dirs, _goal(args))
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


def cmd_plan(args: argparse.Namespace) -> int:
    """Search the candidates of each model, print the choice, the front and its command; --verify runs them."""
    from .errors import InputError
    from .measure import environment
    from .plan import presets, search
    from .render import plans
    from .results.rundir import RunDir

    target = _target(args, needs_dry_run=False)
    if not 0 <= args.margin < 1:
        raise UsageError(f"--margin {args.margin}: a fraction of the budget, from 0 to below 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: the effective batch is at least 1")
    effective = args.batch_size
    settings = {
        "batch_size": effective,
        "grad_accum": 1,
        "samples": args.samples or 3 * effective,
        "eval_samples": effective,
        "epochs": 1,
        "warmup_epochs": 1,
        "eval_every": 0,
        "device": environment.resolve_device(
            ("cuda" if target else args.device) or "auto", target is not None
        ),
        **({"seq_len": args.seq_len} if args.seq_len else {}),
    }
    # the user's models, methods and ranks alone, not the quick preset's settings (its trained base
    # would be made first, minutes for a medium model): a candidate's speed and memory do not depend
    # on its weights' values
    bases = presets.Matrix(tuple(args.models), tuple(args.methods), tuple(args.ranks), settings).cells()
    axes = {name: tuple(getattr(args, name)) for name in search.OPEN}
    cells = search.candidates(bases, axes, tuple(args.micro_batches) if args.micro_batches else None)
    device = cells[0].device
    if args.fit_memory is not None:
        budget, what = args.fit_memory, "--fit-memory"
    elif target is not None:
        budget, what = target.memory_bytes, f"{target.name}'s memory"
    else:
        budget, what = environment.free_memory_bytes(device)
        if budget is None:
            raise UsageError(f"no budget: {what}; give --fit-memory SIZE or --target NAME")
    options = _options(args, device)
    searches = search.search(
        cells, budget, what, args.margin, args.target if target else None, options.start_method
    )
    quality = _quality(args.quality) if args.quality else None
    for s in searches:
        print(plans.search(s, quality, args.all) + "\n")
    short = [s for s in searches if s.choice is None]
    if short:
        raise InputError(plans.none_fits(short[0]))
    if not args.verify:
        return EXIT_OK
    chosen = {
        "choice": lambda s: [s.choice],
        "front": lambda s: [c for c in s.front() if c.fits(s.budget_bytes, s.margin)],
        "fits": lambda s: s.fitting,
    }[args.verify]
    verify = [c for s in searches for c in chosen(s)]
    run = RunDir.create(args.out)
    with run.lock():
        rows = _run_candidates(args, run, verify, searches[0].plan, options)
    print(plans.verification([(c, rows.get(c.cell.key())) for c in verify], budget))
    print(f"Results: {run.results_path}")
    return EXIT_OK


def _run_candidates(args: argparse.Namespace, run, verify: list, plan, options) -> dict:
    """Run the candidates to verify into `run` and return their rows by cell key."""
    from .plan.admission import Plan
    from .run import runner, worker

    wanted = {c.cell.key() for c in verify}
    kept = [(c, s) for c, s in zip(plan.cells, plan.surveys) if c.key() in wanted]
    sub = Plan([c for c, _ in kept], [c for c, _ in kept], [s for _, s in kept], {}, rates=plan.rates)
    worker.start_workers(options.start_method, sub.cells)
    progress = _progress(args)
    print(
        f"lorabench: verifying {len(sub.cells)} candidates on {sub.cells[0].device} -> {run}", file=sys.stderr
    )
    runner.run_cells(run, sub.cells, sub.known(), {}, options, progress, sub.gemms(), sub.steps())
    rows, _ = _report(args, run)
    return {r.cell.key(): r for r in rows}


def _quality(path) -> dict[str, float]:
    """The mean final evaluation accuracy (else loss) of a run's rows, by what they trained."""
    from .render.plans import trained_key
    from .results.metrics import is_number
    from .results.rundir import RunDir

    if not (path / RunDir.RESULTS).is_file():
        raise UsageError(
            f"--quality {path}: no {RunDir.RESULTS} here; pass a run directory `lorabench run` made"
        )
    rows, _ = RunDir(path).rows()
    found: dict[str, list[float]] = {}
    for r in rows:
        for key in ("final_eval_accuracy", "final_eval_loss"):
            if is_number(r.metrics.get(key)):
                found.setdefault(trained_key(r.cell), []).append(r.metrics[key])
                break
    return {k: sum(v) / len(v) for k, v in found.items()}

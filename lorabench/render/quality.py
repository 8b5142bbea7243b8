"""Quality in the report: each method across seeds with its interval, its time to a target and what
it forgot, quality over training time, and quality against memory and time to target (the Pareto
front), every figure from `results.quality`.

    lorabench run --preset quality        # 3 seeds: the table has intervals, the pictures error bars
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..results import quality
from ..results.metrics import framework_peak, is_number
from .plots import plot_name, pyplot
from .tables import Variant, column_name, markdown

MiB = 2**20


def _full(variants: list[Variant]) -> Variant | None:
    return next((v for v in variants if v.ok and v.cell.is_baseline), None)


def _interval(i, fmt: str = "{:.4f}", scale: float = 1.0) -> str:
    """`mean (lo-hi)`, or the value alone for one seed; blank where nothing was measured."""
    if i is None:
        return ""
    mean = fmt.format(i.mean * scale)
    return f"{mean} ({fmt.format(i.lo * scale)} to {fmt.format(i.hi * scale)})" if i.spread else mean


def target(variants: list[Variant], goal: quality.Goal) -> quality.Target | None:
    """The group's target: the one the user set, else TARGET_FRACTION of full fine-tuning's best
    accuracy (None: no full fine-tuning in the group)."""
    full = _full(variants)
    return goal.target(full.rows if full else None)


def worth_showing(variants: list[Variant]) -> bool:
    """Quality is compared where the weights mean something (a trained or published base), or where
    seeds give it a spread."""
    ok = [v for v in variants if v.ok]
    return bool(ok) and (ok[0].cell.pretrained or any(len(quality.per_seed(v.rows)) > 1 for v in ok))


def quality_table(variants: list[Variant], goal: quality.Goal = quality.Goal()) -> str:
    """Per variant: seeds, final eval accuracy (mean and 95 % CI over seeds), as a share of full
    fine-tuning's, time to the target and how many seeds reached it, source-task forgetting."""
    ok = [v for v in variants if v.ok]
    full = _full(variants)
    aim = target(variants, goal)
    rows = []
    for v in sorted(ok, key=lambda v: not v.cell.is_baseline):
        acc = quality.over_seeds(v.rows, "final_eval_accuracy")
        share = quality.relative(v.rows, full.rows) if full else None
        ttt = quality.time_to_target(v.rows, aim) if aim is not None else None
        forgot = quality.over_seeds(v.rows, "forgetting_pt")
        rows.append(
            {
                "method": column_name(v),
                "seeds": str(len(quality.per_seed(v.rows))),
                "accuracy (95% CI)": _interval(acc),
                "of full's (%)": _interval(share, "{:.1f}", 100),
                "time to target (s)": _interval(ttt.seconds, "{:.2f}")
                if ttt and ttt.seconds
                else "not reached",
                "reached": f"{ttt.reached}/{ttt.seeds}" if ttt else "",
                "forgetting (pt)": _interval(forgot, "{:+.1f}"),
            }
        )
    df = pd.DataFrame(rows)
    if not any(df["forgetting (pt)"]):
        df = df.drop(columns=["forgetting (pt)"])
    return markdown(df, [c for c in df.columns if c != "method"])


def notes(variants: list[Variant], goal: quality.Goal = quality.Goal()) -> str:
    """How the table's figures were made, under it."""
    aim = target(variants, goal)
    n = max((len(quality.per_seed(v.rows)) for v in variants if v.ok), default=1)
    spread = (
        f"Intervals: 95 % by Student's t over {n} seeds (mean +- t x s / sqrt(n)). "
        if n > 1
        else "One seed: no interval (run --seed 0,1,2 for one). "
    )
    said = (
        f"The target is {aim.said}; time to target is the training time (evaluations left out) to the first evaluation "
        + ("at or above" if aim.on_accuracy else "at or below")
        + f" it, the {'mean of the seeds that reached it' if n > 1 else 'one seed'}"
        + (" after dropping the fastest and the slowest" if n >= quality.TRIM_FROM else "")
        + ". Forgetting: source-task accuracy before adaptation less after it (a trained base)."
        if aim is not None
        else "no full fine-tuning here: no target (set one: --target-accuracy or --target-loss)."
    )
    return spread + said


def curve_picture(
    variants: list[Variant], plot_dir, plot_link: str, goal: quality.Goal = quality.Goal()
) -> list[str]:
    """Eval accuracy against training seconds, a line per seed of every variant (one colour per
    variant), an accuracy target dashed; none where no row has a curve."""
    ok = [v for v in variants if v.ok and any(r.curve for r in v.rows)]
    if not ok:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, v in enumerate(sorted(ok, key=lambda v: not v.cell.is_baseline)):
        colour = f"C{i % 10}"
        for k, r in enumerate(quality.per_seed(v.rows)):
            pts = [(p["train_s"], p["eval_accuracy"]) for p in r.curve if is_number(p.get("eval_accuracy"))]
            ax.plot(*zip(*pts), color=colour, alpha=0.8, label=column_name(v) if k == 0 else None)
    aim = target(variants, goal)
    if aim is not None and aim.on_accuracy:
        ax.axhline(aim.value, linestyle="--", color="black", label=f"target {aim.value:.3f}")
    ax.set_xlabel("training time (s, evaluations left out)")
    ax.set_ylabel("eval accuracy (fraction)")
    ax.set_xlim(0, None)
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    cell = ok[0].cell
    fig.suptitle(f"{cell.model}: quality over training time")
    fig.tight_layout()
    name = plot_name(cell, "quality-curves")
    Path(plot_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(plot_dir) / name, dpi=110)
    plt.close(fig)
    return [f"![{cell.model}: eval accuracy over training time]({plot_link}{name})", ""]


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto front of (cost, quality) points: those no other point beats on both (less cost,
    no less quality), by increasing cost."""
    out, best = [], float("-inf")
    for cost, q in sorted(points, key=lambda p: (p[0], -p[1])):
        if q > best:
            out.append((cost, q))
            best = q
    return out


def pareto_picture(
    variants: list[Variant], plot_dir, plot_link: str, goal: quality.Goal = quality.Goal()
) -> list[str]:
    """Final accuracy (mean, 95 % CI as error bars) against peak memory (framework level) and
    against time to target, a point per variant, the front drawn."""
    ok = [v for v in variants if v.ok]
    aim = target(variants, goal)
    panels = [("peak memory (MiB, framework level)", lambda v: _scaled(framework_peak(v.metrics), MiB))]
    if aim is not None:
        panels.append(("time to target (s)", lambda v: _mean(quality.time_to_target(v.rows, aim).seconds)))
    drawn = []
    for label, cost in panels:
        pts = []
        for i, v in enumerate(ok):  # a variant's colour is its own in every panel
            acc = quality.over_seeds(v.rows, "final_eval_accuracy")
            c = cost(v)
            if acc is not None and c is not None:
                pts.append((c, acc, column_name(v), f"C{i % 10}"))
        drawn.append((label, pts))
    if not any(len(p) >= 2 for _, p in drawn):
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, len(drawn), figsize=(6 * len(drawn), 4), squeeze=False)
    for ax, (label, pts) in zip(axes[0], drawn):
        for c, acc, name, colour in pts:
            ax.errorbar(
                c,
                acc.mean,
                yerr=[[acc.mean - acc.lo], [acc.hi - acc.mean]],
                fmt="o",
                color=colour,
                label=name,
            )
        edge = front([(c, acc.mean) for c, acc, _, _ in pts])
        if len(edge) > 1:
            ax.step(
                [p[0] for p in edge],
                [p[1] for p in edge],
                where="post",
                color="black",
                alpha=0.5,
                label="front",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("final eval accuracy (fraction)")
        ax.set_xlim(0, None)
        ax.set_ylim(0, 1.05)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    cell = ok[0].cell
    fig.suptitle(f"{cell.model}: quality against memory and time to target")
    fig.tight_layout()
    name = plot_name(cell, "pareto")
    Path(plot_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(plot_dir) / name, dpi=110)
    plt.close(fig)
    return [f"![{cell.model}: quality against memory and time to target]({plot_link}{name})", ""]


def _scaled(value, unit: float) -> float | None:
    return value / unit if is_number(value) else None


def _mean(interval) -> float | None:
    return interval.mean if interval is not None else None


def claims(pick: Variant, variants: list[Variant], goal: quality.Goal = quality.Goal()) -> list[str]:
    """The headline's quality claims of `pick` against full fine-tuning: its share of full's
    accuracy (with its interval, and whether the difference is resolved or within the spread),
    its time to target against full's, and what each forgot of the source task."""
    full = _full(variants)
    if full is None:
        return []
    out = []
    share = quality.relative(pick.rows, full.rows)
    if share is not None:
        mine = quality.over_seeds(pick.rows, "final_eval_accuracy")
        theirs = quality.over_seeds(full.rows, "final_eval_accuracy")
        text = f"reaches {share.mean:.0%} of full fine-tuning's accuracy"
        if share.spread:
            text += f" (95% CI {share.lo:.0%} to {share.hi:.0%}"
            resolved = mine is not None and theirs is not None and not mine.overlaps(theirs)
            text += ", resolved)" if resolved else ", within the seeds' spread)"
        else:
            text += " (one seed: no spread measured)"
        out.append(text)
    aim = target(variants, goal)
    if aim is not None:
        mine, theirs = (quality.time_to_target(x.rows, aim) for x in (pick, full))
        if mine.seconds and theirs.seconds and theirs.seconds.mean > 0:
            out.append(f"{mine.seconds.mean / theirs.seconds.mean:.2g}x full's time to target")
        elif mine.seconds and not theirs.seconds:
            out.append("reaches the target, which full fine-tuning does not")
        elif not mine.seconds:
            what = "" if aim.on_accuracy else " loss"
            out.append(
                f"does not reach the target{what} ({aim.value:.3f}; best {mine.best:.3f})"
                if mine.best is not None
                else ""
            )
    forgot, theirs = (quality.over_seeds(x.rows, "forgetting_pt") for x in (pick, full))
    if forgot is not None and theirs is not None:
        out.append(
            f"forgets {forgot.mean:.1f} points of the source task against full fine-tuning's {theirs.mean:.1f}"
        )
    return [c for c in out if c]

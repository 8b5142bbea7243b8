"""Reports and compare on the committed reference run: rendered, folded and compared without training."""

import dataclasses
import re
from pathlib import Path

import pytest

from lorabench.plan.axes import AXES
from lorabench.render import headlines, report, tables
from lorabench.results.compare import compare
from lorabench.results.metrics import METRICS
from lorabench.results.rows import Row, Status
from lorabench.results.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "20261123-211355-558bee"


@pytest.fixture(scope="module")
def rows():
    rows, warnings = RunDir(ROOT / "results" / RUN_ID).rows()
    assert warnings == []
    return rows


def repeats(rows, n, slower=1.0):
    """`rows` as n repeats of each cell, each repeat's times scaled a little apart (and by `slower`)."""
    out = []
    for k in range(n):
        scale = slower * (1 + 0.01 * k)
        for r in rows:
            m = {
                **r.metrics,
                "epoch_s": r.metrics["epoch_s"] * scale,
                "step_s_p50": r.metrics["step_s_p50"] * scale,
                "samples_per_s": r.metrics["samples_per_s"] / scale,
            }
            out.append(r.replace(cell=dataclasses.replace(r.cell, repeat=k), metrics=m))
    return out


def test_the_committed_report_is_what_the_current_code_renders(rows, tmp_path):
    text = report.render(rows, plot_dir=tmp_path, plot_link=f"{RUN_ID}/")
    assert text == (ROOT / "report" / f"{RUN_ID}.md").read_text()
    # every picture is linked relative to the report, exists beside it (committed too) and is a real PNG
    links = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", text, flags=re.M)
    assert len(links) == 4 and sorted(links) == sorted(f"{RUN_ID}/{p.name}" for p in tmp_path.iterdir())
    for link in links:
        for png in (tmp_path / link.split("/", 1)[1], ROOT / "report" / link):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png
    assert sum(link.endswith("-memory.png") for link in links) == 2  # one memory breakdown per model


def test_the_report_opens_with_a_headline_per_model_whose_figures_are_in_its_table(rows):
    text = report.render(rows)
    lines = text.splitlines()
    assert lines[2].startswith(
        "- bert-tiny on cpu (random weights): lora r=2 (the least memory of 2 LoRA variants) "
        "trains 0.0525% of the parameters, and needs 74.95% less weight+gradient+optimizer "
        "memory and 24.62% less time per epoch than full fine-tuning; quality is not "
        "comparable on random weights."
    )
    assert lines[3].startswith("- cifar-mlp on cpu (random weights): ")
    for cell, variants in tables.groups(rows):
        table = tables.comparison_table(variants)
        for by in ("memory", "time"):
            line = headlines.headline(variants, by)
            figures = re.findall(r"\d[\d,.]*%", line)
            assert len(figures) == 3 and all(f in table for f in figures), (line, figures)
            assert f"**{headlines.headline(variants)}**" in text


def test_the_headline_says_more_when_lora_is_slower_and_reports_quality_on_pretrained_weights(rows):
    full, lora = [r for r in rows if r.cell.model == "cifar-mlp"][:2]
    slow = lora.replace(metrics={**lora.metrics, "epoch_s": full.metrics["epoch_s"] * 1.2})
    pre = [r.replace(cell=dataclasses.replace(r.cell, weights="pretrained")) for r in (full, slow)]
    line = headlines.headline([tables.fold_repeats([r]) for r in pre])
    assert "and 20.00% more time per epoch" in line
    # quality against full fine-tuning's: its share, and that one seed measures no spread
    assert "reaches 40% of full fine-tuning's accuracy (one seed: no spread measured)" in line


def test_memory_and_time_axes_start_at_zero_with_units(rows, tmp_path):
    from lorabench.render import plots

    ok = [tables.fold_repeats([r]) for r in rows if r.cell.model == "bert-tiny"]
    axes = plots.rank_sweep_plot("bert-tiny", ok, tmp_path / "s.png", tables.memory_key(ok))
    assert [a[0] for a in axes] == ["peak host RSS (MiB)", "epoch time (s)", "final eval accuracy (fraction)"]
    assert all(a[1][0] == 0 for a in axes) and all(a[3] == "linear" for a in axes)  # ranks 2 and 8: no decade
    wide = [
        v
        if v.cell.is_baseline
        else dataclasses.replace(v, rows=[v.rows[0].replace(cell=dataclasses.replace(v.cell, rank=128))])
        for v in ok[:2]
    ] + ok[2:]  # ranks 8 and 128
    axes = plots.rank_sweep_plot("bert-tiny", wide, tmp_path / "w.png", tables.memory_key(ok))
    assert axes[0][2] == "LoRA rank (log scale)" and axes[0][3] == "log"


def test_the_memory_breakdown_adds_up_to_the_measured_peak(rows):
    from lorabench.render import plots

    m = next(r for r in rows if r.cell.model == "cifar-mlp" and r.cell.is_baseline).metrics
    parts = plots.breakdown(m, "host_peak_rss_bytes", "host_rss_baseline_bytes")
    layers = sum(parts[key] for _, _, key, _ in plots.LAYERS)
    assert parts["frozen"] == 0 and parts["trainable_weights_bytes"] == 4 * 20_998_154
    assert layers + parts["base"] + parts["rest"] == m["host_peak_rss_bytes"]
    assert parts["predicted_trainable"] == m["predicted_grads_bytes"]


def test_the_summary_answers_per_model_in_lines_a_terminal_holds(rows):
    """The terminal leads with the answers (trainable share, memory and time saved, quality, the
    prediction's error) per model, in lines of at most 120 columns; the full table is the report's."""
    text = report.summary(rows)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert text.count("| method ") == 2 and "| Comparison" not in text
    header = next(line for line in text.splitlines() if line.startswith("| method "))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method",
        "trainable",
        "peak MiB",
        "saved",
        "epoch s",
        "saved",
        "accuracy",
        "predicted/measured",
    ]
    assert "cifar-mlp on cpu (random weights): lora r=2" in text.replace("\n", " ")


def test_no_metric_label_passes_sixty_characters_and_each_has_a_definition():
    long = [m.key for m in METRICS if len(m.label) > 60]
    assert not long, f"labels over 60 characters (a name and a unit; the rest is the definition): {long}"
    assert all(m.definition.endswith((".", ")", "*")) for m in METRICS), [
        m.key for m in METRICS if not m.definition
    ]


def test_repeats_fold_into_medians_with_their_spread_and_a_plot(rows, tmp_path):
    text = report.render(repeats(rows, 3), plot_dir=tmp_path, plot_link="p/")
    assert "### Rank sweep" in text and "(x3)" in text and "Spread of epoch time across repeats" in text
    links = [line for line in text.splitlines() if line.startswith("![cifar-mlp")]
    assert len(links) == 2 and all((tmp_path / link[link.index("](p/") + 4 : -1]).exists() for link in links)
    for line in text.splitlines():  # GFM tables: every row closes its last cell
        if line.startswith("|"):
            assert line.endswith("|")


def test_a_repeat_that_could_not_measure_a_figure_leaves_it_unavailable(rows):
    folded = tables.fold_repeats(
        [
            rows[0],
            rows[0].replace(
                cell=dataclasses.replace(rows[0].cell, repeat=1),
                metrics={**rows[0].metrics, "epoch_s": None},
                unavailable={"epoch_s": "sampler died"},
            ),
        ]
    )
    assert folded.metrics["epoch_s"] is None and folded.unavailable["epoch_s"] == "sampler died"


def test_an_identical_run_shows_no_change(rows):
    cmp = compare(rows, rows)
    assert cmp.changes and not cmp.regressions and cmp.only_in_base == cmp.only_in_new == []
    assert all(c.change == 0 for c in cmp.changes)
    assert {c.figure for c in cmp.changes} >= {"epoch_s", "host_peak_rss_bytes", "final_eval_accuracy"}


def test_a_planted_slower_cell_is_flagged_and_fails_the_gate(rows, cli, in_tmp):
    slow = [
        r
        if r.label != "lora r=8"
        else r.replace(
            metrics={
                **r.metrics,
                "epoch_s": r.metrics["epoch_s"] * 3,
                "step_s_p50": r.metrics["step_s_p50"] * 3,
                "samples_per_s": r.metrics["samples_per_s"] / 3,
            }
        )
        for r in rows
    ]
    flagged = compare(rows, slow).regressions
    assert flagged and all(c.label == "lora r=8" for c in flagged)
    assert {c.figure for c in flagged} == {
        "epoch_s",
        "step_s_p50",
    }  # samples/s is step time again: not gated twice
    for name, these in (("base", rows), ("slow", slow)):
        run = RunDir.create(in_tmp, name)
        run.rewrite(these)
    assert cli("compare", "base", "slow", "--fail-on-regression")[0] == 1
    code, out, err = cli("compare", "base", "slow")  # without the gate: reported only
    assert code == 0 and out.count("REGRESSION") == 4  # 2 figures x 2 models


def test_a_repeat_missing_a_figure_keeps_it_out_of_compare(rows):
    """A median of the other repeats would stand in for the missing one: the figure is not compared."""
    full = next(r for r in rows if r.cell.is_baseline)
    two = [
        full.replace(cell=dataclasses.replace(full.cell, repeat=i), metrics={"epoch_s": v, "step_s_p50": 0.1})
        for i, v in enumerate([1.0, None])
    ]
    assert {c.figure for c in compare(two, two).changes} == {"step_s_p50"}


def test_a_changed_gpu_or_torch_is_refused_unless_allowed(rows, cli, in_tmp):
    moved = [
        r.replace(environment={**r.environment, "torch": "9.9.9", "gpu_name": "NVIDIA H200"}) for r in rows
    ]
    for name, these in (("base", rows), ("moved", moved)):
        RunDir.create(in_tmp, name).rewrite(these)
    code, out, err = cli("compare", "base", "moved")
    assert code == 2 and err.count("\n") == 1 and "GPU model: unknown -> NVIDIA H200" in err
    assert "torch version: 2." in err and "-> 9.9.9" in err and "--allow-environment-change" in err
    code, out, err = cli("compare", "base", "moved", "--allow-environment-change")
    assert code == 0 and out.splitlines()[2].startswith("**The environment changed**")
    assert compare(rows, rows).environment_changes == []


def test_changed_parameter_counts_are_called_out(rows):
    new = [
        r.replace(metrics={**r.metrics, "params_trainable": r.metrics["params_trainable"] + 1}) for r in rows
    ]
    exact = [c for c in compare(rows, new).changes if c.figure == "params_trainable"]
    assert len(exact) == len(rows) and all(c.regression and c.kind == "exact" for c in exact)


def test_spread_widens_the_limit_but_not_past_a_real_change(rows):
    full = next(r for r in rows if r.cell.is_baseline)

    def runs(values):
        return [
            full.replace(cell=dataclasses.replace(full.cell, repeat=i), metrics={"epoch_s": v})
            for i, v in enumerate(values)
        ]

    (c,) = compare(runs([1.0, 1.3, 0.8]), runs([1.25, 0.95, 1.2])).changes
    assert c.threshold > 10 and not c.regression  # 2 x combined spread exceeds the 10 % default
    assert compare(runs([1.0, 1.01, 0.99]), runs([1.2, 1.21, 1.19])).changes[0].regression


def test_failed_and_skipped_cells_are_listed_with_their_reasons(rows):
    failed = Row.failure(
        rows[1].cell, Status.OOM, "MemoryError", "can't allocate memory", {"params_total": 3}
    )
    text = report.render([rows[0], failed])
    assert "## Cells that did not finish" in text and "| oom" in text and "can't allocate memory" in text


def test_a_gpu_run_draws_the_allocators_breakdown_with_the_drivers_line(rows, tmp_path):
    """On a GPU the bars stack up to the allocator's peak and the driver's view is a line: drawn
    from rows shaped like a GPU run's (allocator and NVML figures added to the CPU reference)."""
    gib = 2**30
    gpu = [
        r.replace(
            metrics={
                **r.metrics,
                "torch_allocated_baseline_bytes": r.metrics["weights_bytes"] + 6 * 2**20,
                "torch_peak_allocated_bytes": r.metrics["state_bytes"] + gib // 8,
                "nvml_process_peak_bytes": r.metrics["state_bytes"] + gib // 2,
            }
        )
        for r in rows
    ]
    text = report.render(gpu, plot_dir=tmp_path, plot_link="p/")
    assert sum("-memory.png" in line for line in text.splitlines() if line.startswith("![")) == 2
    from lorabench.render import plots

    m = gpu[0].metrics
    parts = plots.breakdown(m, "torch_peak_allocated_bytes", "torch_allocated_baseline_bytes")
    assert parts["base"] == 6 * 2**20
    assert (
        sum(parts[k] for _, _, k, _ in plots.LAYERS) + parts["base"] + parts["rest"]
        == m["torch_peak_allocated_bytes"]
    )


@pytest.mark.parametrize(
    "field, values",
    [("quantize", ("none", "nf4")), ("compile", ("off", "on")), ("precision", ("fp32", "bf16-mixed"))],
)
def test_a_matrix_along_any_axis_renders_a_titled_section_per_value_and_a_long_table_column(
    rows, field, values
):
    """Every axis a matrix can vary (axes.AXES) names its sections and its long-table column: a
    --quantize none,nf4 or --compile off,on matrix once rendered two sections with one title."""
    lora = [r for r in rows if r.cell.method == "lora"]
    varied = [
        r.replace(cell=dataclasses.replace(r.cell, **{field: v, "seq_len": s}))
        for v in values
        for s in (64, 128)
        for r in lora
    ]  # three axes: the long table shows too
    text = report.render(varied)
    titles = [line for line in text.splitlines() if line.startswith("## bert-tiny")]
    assert len(titles) == len(set(titles)) == 4, titles
    word = AXES[field].title
    assert all(f"{word} {v}" in "".join(titles) for v in values), titles
    long = text[text.index("## Every cell") :]
    header = long.splitlines()[2]
    assert f"| {word} " in header and "| seq len " in header, header


def test_with_savers_on_both_sides_the_headline_names_them_and_sets_lora_against_the_leanest_full(rows):
    """The `fair` preset: full fine-tuning and LoRA each with and without the memory savers; each
    table's headline names full's savers, and one more line per model compares the leanest of each."""
    from lorabench.plan.presets import SAVERS

    cifar = [r for r in rows if r.cell.model == "cifar-mlp"]
    lean = [
        r.replace(
            cell=dataclasses.replace(r.cell, **SAVERS),
            metrics={
                **r.metrics,
                "state_bytes": r.metrics["state_bytes"] * (0.4 if r.cell.is_baseline else 0.9),
            },
        )
        for r in cifar
    ]
    text = report.render(cifar + lean)
    top = text[: text.index("result rows:")]
    assert "than full fine-tuning (ckpt bf16-mixed adamw-8bit)" in top
    fair = [line for line in top.splitlines() if "savers on both sides" in line]
    assert len(fair) == 1 and "(full ckpt bf16-mixed adamw-8bit)" in fair[0], fair
    assert "lora r=2 ckpt bf16-mixed adamw-8bit needs" in fair[0]
    assert len([line for line in text.splitlines() if line.startswith("## cifar-mlp (")]) == 2
    assert "savers on both sides" not in report.render(cifar)  # full one way only: no such line


def seeded(rows, accuracy: dict[str, list[float]]):
    """The reference run's cifar-mlp rows as three seeds on a trained base: each variant's final
    accuracy per seed as given, a curve climbing to it, and what the source task kept."""
    out = []
    for r in rows:
        if r.cell.model != "cifar-mlp" or r.label not in accuracy:
            continue
        for seed, acc in enumerate(accuracy[r.label]):
            curve = [
                {"step": 4 * k, "train_s": 0.1 * k, "eval_loss": 1.0, "eval_accuracy": acc * k / 4}
                for k in (1, 2, 3, 4)
            ]
            metrics = {**r.metrics, "final_eval_accuracy": acc, "source_accuracy_before": 0.98}
            metrics["source_accuracy_after"] = 0.90 if r.cell.is_baseline else 0.97
            metrics["forgetting_pt"] = (0.98 - metrics["source_accuracy_after"]) * 100
            cell = dataclasses.replace(r.cell, seed=seed, weights="trained")
            out.append(r.replace(cell=cell, metrics=metrics, curve=curve))
    return out


def test_seeds_give_the_quality_table_its_intervals_and_the_headline_its_verdict(rows, tmp_path):
    three = seeded(
        rows, {"full": [0.90, 0.92, 0.91], "lora r=2": [0.60, 0.62, 0.61], "lora r=8": [0.89, 0.93, 0.90]}
    )
    text = report.render(three, plot_dir=tmp_path, plot_link="p/")
    section = text[text.index("### Quality") : text.index("### Quality per epoch")]
    full = next(line for line in section.splitlines() if line.startswith("| full "))
    assert [c.strip() for c in full.strip("|").split("|")][:3] == ["full", "3", "0.9100 (0.8852 to 0.9348)"]
    assert "Intervals: 95 % by Student's t over 3 seeds" in section
    assert "forgetting (pt)" in section and "+8.0" in section  # full forgot 8 points, LoRA 1
    pictures = re.findall(r"!\[[^\]]*\]\(p/([^)]+)\)", section)
    assert len(pictures) == 2 and all((tmp_path / name).exists() for name in pictures)
    line = headlines.headline([v for c, vs in tables.groups(three) for v in vs if c.model == "cifar-mlp"])
    assert "reaches 67% of full fine-tuning's accuracy (95% CI" in line and ", resolved)" in line
    assert "forgets 1.0 points of the source task against full fine-tuning's 8.0" in line
    close = seeded(rows, {"full": [0.90, 0.92, 0.91], "lora r=2": [0.88, 0.93, 0.90]})
    line = headlines.headline([v for c, vs in tables.groups(close) for v in vs if c.model == "cifar-mlp"])
    assert "within the seeds' spread)" in line


def test_a_target_the_user_sets_is_what_time_to_target_and_the_headline_measure_to(rows, tmp_path):
    """--target-accuracy / --target-loss: the table's time to target, its note and the headline
    measure to the given target instead of 95 % of full fine-tuning's best."""
    from lorabench.results.quality import Goal

    three = seeded(rows, {"full": [0.90, 0.92, 0.91], "lora r=2": [0.60, 0.62, 0.61]})

    def lora_r2(text: str) -> list[str]:
        section = text[text.index("### Quality") : text.index("### Quality per epoch")]
        line = next(line for line in section.splitlines() if line.startswith("| lora r=2 "))
        return [c.strip() for c in line.strip("|").split("|")]

    default = report.render(three)
    assert lora_r2(default)[4:6] == ["not reached", "0/3"]  # 95 % of full's best: 0.8645
    given = report.render(three, goal=Goal(accuracy=0.5))
    reached, seeds = lora_r2(given)[4:6]  # its curves pass 0.5 at their last point, 0.4 s
    assert reached.startswith("0.40 ") and seeds == "3/3"
    assert "The target is eval accuracy 0.5, as given; " in given
    by_loss = report.render(three, goal=Goal(loss=0.5))  # the seeded curves' loss stays at 1.0
    assert lora_r2(by_loss)[4:6] == ["not reached", "0/3"] and "eval loss 0.5, as given" in by_loss
    group = [v for c, vs in tables.groups(three) for v in vs if c.model == "cifar-mlp"]
    assert "does not reach the target" in headlines.headline(group)
    assert "x full's time to target" in headlines.headline(group, goal=Goal(accuracy=0.5))

"""Reports and compare on the committed reference run: rendered, folded and compared without training."""
import dataclasses
from pathlib import Path

import pytest

from lorabench import report, tables
from lorabench.compare import compare
from lorabench.rows import Row, Status
from lorabench.rundir import RunDir

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
            m = {**r.metrics, "epoch_s": r.metrics["epoch_s"] * scale, "step_s_p50": r.metrics["step_s_p50"] * scale,
                 "samples_per_s": r.metrics["samples_per_s"] / scale}
            out.append(r.replace(cell=dataclasses.replace(r.cell, repeat=k), metrics=m))
    return out


def test_the_committed_report_is_what_the_current_code_renders(rows, tmp_path):
    text = report.render(rows, plot_dir=tmp_path, plot_link=f"{RUN_ID}/")
    assert text == (ROOT / "report" / f"{RUN_ID}.md").read_text()
    for png in tmp_path.iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_summary_has_a_comparison_per_model_in_the_metrics_order(rows):
    text = report.summary(rows)
    assert text.count("| Comparison") == 2
    first = text[text.index("| Comparison"):].split("\n\n")[0].splitlines()
    labels = [line.split("|")[1].strip() for line in first[2:]]   # after the header and its rule
    order = [m.label.strip() for m in report.METRICS if m.shown]
    assert labels == [x for x in order if x in labels] and "trainable parameters" == labels[0]
    assert "unavailable" not in text   # the CPU's missing allocator figures have no row at all


def test_repeats_fold_into_medians_with_their_spread_and_a_plot(rows, tmp_path):
    text = report.render(repeats(rows, 3), plot_dir=tmp_path, plot_link="p/")
    assert "### Rank sweep" in text and "(x3)" in text and "Spread of epoch time across repeats" in text
    (link,) = [line for line in text.splitlines() if line.startswith("![cifar-mlp")]
    assert (tmp_path / link[link.index("](p/") + 4:-1]).exists()
    for line in text.splitlines():   # GFM tables: every row closes its last cell
        if line.startswith("|"):
            assert line.endswith("|")


def test_a_repeat_that_could_not_measure_a_figure_leaves_it_unavailable(rows):
    folded = tables.fold([rows[0], rows[0].replace(
        cell=dataclasses.replace(rows[0].cell, repeat=1), metrics={**rows[0].metrics, "epoch_s": None},
        unavailable={"epoch_s": "sampler died"})])
    assert folded.metrics["epoch_s"] is None and folded.unavailable["epoch_s"] == "sampler died"


def test_an_identical_run_shows_no_change(rows):
    cmp = compare(rows, rows)
    assert cmp.changes and not cmp.regressions and cmp.only_in_base == cmp.only_in_new == []
    assert all(c.change == 0 for c in cmp.changes)
    assert {c.figure for c in cmp.changes} >= {"epoch_s", "host_peak_rss_bytes", "final_eval_accuracy"}


def test_a_planted_slower_cell_is_flagged_and_fails_the_gate(rows, cli, in_tmp):
    slow = [r if r.label != "lora r=8" else r.replace(metrics={
        **r.metrics, "epoch_s": r.metrics["epoch_s"] * 3, "step_s_p50": r.metrics["step_s_p50"] * 3,
        "samples_per_s": r.metrics["samples_per_s"] / 3}) for r in rows]
    flagged = compare(rows, slow).regressions
    assert flagged and all(c.label == "lora r=8" for c in flagged)
    assert {c.figure for c in flagged} == {"epoch_s", "step_s_p50"}   # samples/s is step time again: not gated twice
    for name, these in (("base", rows), ("slow", slow)):
        run = RunDir.create(in_tmp, name)
        run.rewrite(these)
    assert cli("compare", "base", "slow", "--fail-on-regression")[0] == 1
    code, out, err = cli("compare", "base", "slow")   # without the gate: reported only
    assert code == 0 and out.count("REGRESSION") == 4   # 2 figures x 2 models


def test_a_repeat_missing_a_figure_keeps_it_out_of_compare(rows):
    """A median of the other repeats would stand in for the missing one: the figure is not compared."""
    full = next(r for r in rows if r.cell.is_baseline)
    two = [full.replace(cell=dataclasses.replace(full.cell, repeat=i), metrics={"epoch_s": v, "step_s_p50": 0.1})
           for i, v in enumerate([1.0, None])]
    assert {c.figure for c in compare(two, two).changes} == {"step_s_p50"}


def test_a_changed_gpu_or_torch_is_refused_unless_allowed(rows, cli, in_tmp):
    moved = [r.replace(environment={**r.environment, "torch": "9.9.9", "gpu_name": "NVIDIA H200"}) for r in rows]
    for name, these in (("base", rows), ("moved", moved)):
        RunDir.create(in_tmp, name).rewrite(these)
    code, out, err = cli("compare", "base", "moved")
    assert code == 2 and err.count("\n") == 1 and "GPU model: unknown -> NVIDIA H200" in err
    assert "torch version: 2." in err and "-> 9.9.9" in err and "--allow-environment-change" in err
    code, out, err = cli("compare", "base", "moved", "--allow-environment-change")
    assert code == 0 and out.splitlines()[2].startswith("**The environment changed**")
    assert compare(rows, rows).environment_changes == []


def test_changed_parameter_counts_are_called_out(rows):
    new = [r.replace(metrics={**r.metrics, "params_trainable": r.metrics["params_trainable"] + 1}) for r in rows]
    exact = [c for c in compare(rows, new).changes if c.figure == "params_trainable"]
    assert len(exact) == len(rows) and all(c.regression and c.kind == "exact" for c in exact)


def test_spread_widens_the_limit_but_not_past_a_real_change(rows):
    full = next(r for r in rows if r.cell.is_baseline)

    def runs(values):
        return [full.replace(cell=dataclasses.replace(full.cell, repeat=i), metrics={"epoch_s": v})
                for i, v in enumerate(values)]
    (c,) = compare(runs([1.0, 1.3, 0.8]), runs([1.25, 0.95, 1.2])).changes
    assert c.threshold > 10 and not c.regression        # 2 x combined spread exceeds the 10 % default
    assert compare(runs([1.0, 1.01, 0.99]), runs([1.2, 1.21, 1.19])).changes[0].regression


def test_failed_and_skipped_cells_are_listed_with_their_reasons(rows):
    failed = Row.failure(rows[1].cell, Status.OOM, "MemoryError", "can't allocate memory", {"params_total": 3})
    text = report.render([rows[0], failed])
    assert "## Cells that did not finish" in text and "| oom" in text and "can't allocate memory" in text

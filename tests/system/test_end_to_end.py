"""A real matrix on the CPU through the real command line, then the report read back."""
import json

import pytest

from conftest import TINY, run_subprocess
from lorabench import report, results
from lorabench.cells import Cell

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("run")
    proc = run_subprocess("run", "--models", "cifar-mlp,bert-tiny", "--methods", "full,lora,lora-reparam",
                          "--ranks", "2", *TINY, cwd=cwd, show_warnings=True)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (cwd / "results").iterdir()
    return cwd, run_dir, proc


def test_every_cell_has_one_ok_row_with_its_metrics(tiny_run):
    cwd, run_dir, proc = tiny_run
    rows, warnings = results.read_rows(run_dir)
    assert warnings == []
    assert [(r["cell"]["model"], r["label"]) for r in rows] == [
        ("cifar-mlp", "full"), ("cifar-mlp", "lora r=2"), ("cifar-mlp", "lora-reparam r=2"),
        ("bert-tiny", "full"), ("bert-tiny", "lora r=2"), ("bert-tiny", "lora-reparam r=2")]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        m = r["metrics"]
        assert r["cell_key"] == Cell.from_dict(r["cell"]).key()
        assert m["epoch_s"] > 0 and m["step_s_p90"] >= m["step_s_p50"] > 0
        assert m["samples_per_s"] == pytest.approx(16 / m["step_s_p50"])
        assert m["host_peak_rss_bytes"] > m["host_rss_baseline_bytes"] > 0
        assert m["torch_peak_allocated_bytes"].startswith("unavailable:")
        assert [e["timed"] for e in m["epochs"]] == [False, True]
        assert m["optimizer"] == "adam(fused)"
        assert m["activations_saved_bytes"] > 0 and m["activations_saved_tensors"] > 0
        assert r["environment"]["torch"] and r["environment"]["device"] == "cpu"
    for r in rows:
        if r["cell"]["method"] != "full":
            m = r["metrics"]
            assert m["check_merged_vs_adapter_max_abs_diff"] < 1e-3, r["label"]
            assert m["check_adapter_off_vs_base_max_abs_diff"] < 1e-5, r["label"]
            assert m["adapter_file_bytes"] > 0 and m["model_file_bytes"] > 0
            assert m["predicted_total_bytes"] > m["predicted_weights_bytes"] > 0
    mlp_lora = rows[1]["metrics"]
    assert mlp_lora["params_trainable"] == 2 * (3072 + 4096 + 4096 + 2048 + 2048 + 10)
    assert json.loads((run_dir / "environment.json").read_text())["device"] == "cpu"
    assert len(json.loads((run_dir / "plan.json").read_text())["cells"]) == 6


def test_run_prints_the_comparison_and_writes_the_report(tiny_run):
    cwd, run_dir, proc = tiny_run
    assert "| Comparison" in proc.stdout and "Delta lora r=2" in proc.stdout
    # nothing but our own one-line progress reaches stderr: no library or resource-tracker warning
    assert "Warning" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr
    report_file = cwd / "report" / f"{run_dir.name}.md"
    text = report_file.read_text()
    assert text == report.render(results.read_rows(run_dir)[0])   # generated from the results file alone
    for needle in ("## cifar-mlp", "## bert-tiny", "| trainable parameters", "| epoch time (s, median of timed epochs)",
                   "### Quality per epoch", "1 (warm-up)", "## Environment", "weights: random",
                   "| activations saved for backward (MiB, saved-tensor hooks)"):
        assert needle in text
    # quality on random weights is flagged as such; the same rows with pretrained weights are not
    assert text.count("LoRA here adapts a frozen *random* network") == 2      # one per model
    rows = results.read_rows(run_dir)[0]
    for r in rows:
        r["cell"]["weights"] = "pretrained"
    assert "frozen *random* network" not in report.render(rows)


def test_report_command_regenerates_the_same_markdown(tiny_run, tmp_path):
    cwd, run_dir, proc = tiny_run
    out = run_subprocess("report", str(run_dir), "-o", str(tmp_path / "r.md"), cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r.md").read_text() == (cwd / "report" / f"{run_dir.name}.md").read_text()

"""Cells of several processes for real: two ranks on gloo, as a user runs them on the CPU."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import rows_in, run_subprocess
from test_durability import calibrated, cell_processes, only_run_dir, rows_of, start, wait_for

pytestmark = pytest.mark.slow

SMALL = [
    "--samples",
    "128",
    "--eval-samples",
    "32",
    "--batch-size",
    "16",
    "--epochs",
    "1",
    "--warmup-epochs",
    "1",
    "--seq-len",
    "16",
    "--progress",
    "off",
]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both strategies, full and LoRA, on the MLP and BERT-Tiny, each cell in two processes."""
    cwd = tmp_path_factory.mktemp("two-ranks")
    out = run_subprocess(
        "run",
        "--models",
        "cifar-mlp,bert-tiny",
        "--methods",
        "full,lora",
        "--ranks",
        "8",
        "--nproc",
        "2",
        "--strategy",
        "ddp,fsdp2",
        *SMALL,
        "--strict",
        cwd=cwd,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    rows, _ = rows_of(only_run_dir(cwd))
    return {(r["cell"]["model"], r["label"]): r for r in rows}, out.stdout


def test_every_cell_is_ok_with_one_entry_per_rank(two_ranks):
    rows, stdout = two_ranks
    assert len(rows) == 8 and {r["status"] for r in rows.values()} == {"ok"}
    for r in rows.values():
        assert [e["process"] for e in r["per_process"]] == [0, 1]
        # forked from a cell process forked from the fork server (peft preloaded): neither ever queried CUDA
        assert (
            r["environment"]["cuda_bad_fork"] is False
            and [e["cuda_bad_fork"] for e in r["per_process"]] == [False] * 2
        )
        assert all(
            e["status"] == "ok" and e["host_peak_rss_bytes"] > 0 and e["step_s_p50"] > 0
            for e in r["per_process"]
        )
        m = r["metrics"]
        assert m["host_peak_rss_bytes"] == max(e["host_peak_rss_bytes"] for e in r["per_process"])
        assert m["host_peak_rss_sum_bytes"] == sum(e["host_peak_rss_bytes"] for e in r["per_process"])
        assert m["step_s_p50"] == max(e["step_s_p50"] for e in r["per_process"])  # the slowest rank's
        assert m["samples_per_step"] == 16 * 2 and m["steps_per_epoch"] == 128 // 32  # the global batch
        assert r["unavailable"]["mfu_pct"].startswith("the ranks share this CPU's cores")
    assert "full fsdp2 n=2" in stdout and "lora r=8 ddp n=2" in stdout


def test_the_ranks_agree_with_one_process_and_ddp_replicas_with_each_other(two_ranks):
    rows, _ = two_ranks
    for (model, label), r in rows.items():
        m = r["metrics"]
        # the first global batch: ranks' mean loss on their halves vs one process on all of it
        assert m["check_ranks_first_loss_abs_diff"] < 1e-5, (model, label)
        if "ddp" in label:
            assert m["check_ranks_params_max_abs_diff"] == 0.0, (model, label)  # identical after a step
        else:
            assert "check_ranks_params_max_abs_diff" not in m  # shards differ by design
        if label.startswith("lora"):  # the adapter checks stay exact, FSDP2 included
            assert m["check_adapter_off_vs_base_max_abs_diff"] == 0.0
            assert m["check_merged_vs_adapter_max_abs_diff"] < 1e-4
            assert m["params_trainable"] == {"cifar-mlp": 122_960, "bert-tiny": 8_450}[model]


def test_each_rank_holds_the_tensors_its_prediction_says(two_ranks):
    """FSDP2: weights, gradients and Adam state cut in two; DDP: a whole replica on each rank."""
    rows, _ = two_ranks
    for (model, label), r in rows.items():
        m = r["metrics"]
        for measured, predicted in (
            ("weights_bytes", "predicted_weights_bytes"),
            ("grads_bytes", "predicted_grads_bytes"),
            ("optimizer_state_bytes", "predicted_optimizer_bytes"),
        ):
            for entry in r["per_process"]:
                assert entry[measured] == pytest.approx(m[predicted], rel=0.01), (model, label, measured)
    mlp_full = rows[("cifar-mlp", "full fsdp2 n=2")]["per_process"]
    assert all(e["weights_bytes"] == pytest.approx(20_998_154 * 4 / 2, rel=0.001) for e in mlp_full)
    for (model, label), r in rows.items():  # an FSDP2 rank's live tensors are counted at its peak
        m = r["metrics"]
        if "fsdp2" in label:
            # the prediction is one process's simulated step, transformed (sharded parts, gathered
            # units added), not a simulated FSDP2 step: 0.90-1.40 of the measured on 2 CPU ranks
            assert m["host_tensors_peak_bytes"] > m["weights_bytes"], (model, label)
            assert m["host_rss_step_peak_bytes"] >= m["host_tensors_peak_bytes"], (model, label)
            assert 0.85 <= m["predicted_over_measured"] < 1.5, (model, label)


def test_the_report_has_the_scaling_section_when_processes_vary(tmp_path):
    out = run_subprocess(
        "run", "--models", "cifar-mlp", "--methods", "full", "--nproc", "1,2", *SMALL, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    report = next((tmp_path / "report").glob("*.md")).read_text()
    assert "### Scaling across processes" in report and "-scaling.png)" in report
    table = report.split("### Scaling across processes")[1].split("\n\n")[1]
    two = next(line for line in table.splitlines() if "| ddp " in line)
    assert two.rstrip(" |").endswith("%")  # scaling efficiency against the one-process cell


def rank_processes(pid):
    """The ranks: children of a cell's process."""
    out = []
    for cell in cell_processes(pid):
        try:
            out += cell.children()
        except psutil.Error:
            pass
    return out


def test_a_killed_rank_ends_its_cell_as_crashed_naming_it_and_the_next_cell_runs(tmp_path):
    proc = start(
        "run",
        "--models",
        "cifar-mlp",
        "--methods",
        "full,lora",
        "--ranks",
        "8",
        "--nproc",
        "2",
        "--samples",
        "4096",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--progress",
        "off",
        cwd=tmp_path,
    )
    wait_for(lambda: calibrated(tmp_path) and len(rank_processes(proc.pid)) == 2)
    time.sleep(3.0)  # the ranks are training
    rank_processes(proc.pid)[1].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    rows, _ = rows_of(only_run_dir(tmp_path))
    assert [r["status"] for r in rows] == ["crashed", "ok"]
    crashed = rows[0]
    assert crashed["error"]["type"] == "SIGKILL"
    assert crashed["error"]["message"] == "process 1 of 2: the process died from SIGKILL"
    assert [e["status"] for e in crashed["per_process"]][1] == "crashed"
    assert crashed["per_process"][0]["host_peak_rss_bytes"] > 0  # what the surviving rank measured is kept
    assert crashed["metrics"]["params_trainable"] == 20_998_154


def test_a_cell_spans_processes_started_by_torchrun_itself(tmp_path):
    """The path a cell across nodes takes: torchrun's own rendezvous, rank 0 appends the row."""
    cell = {
        "model": "cifar-mlp",
        "method": "lora",
        "rank": 8,
        "strategy": "fsdp2",
        "samples": 64,
        "eval_samples": 32,
        "batch_size": 16,
        "epochs": 1,
    }
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "lorabench.run.processes",
            "results/torchrun",
            json.dumps(cell),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = rows_in(tmp_path / "results")
    assert row["status"] == "ok" and row["label"] == "lora r=8 fsdp2 n=2" and len(row["per_process"]) == 2
    # whole, as rows `lorabench run` makes: FLOPs, tokens, the prediction per rank and the matmul ceiling
    m = row["metrics"]
    for key in (
        "flops_per_step",
        "hardware_flops_per_step",
        "tokens_per_step",
        "predicted_total_bytes",
        "predicted_comm_bytes",
        "device_matmul_flops",
    ):
        assert m[key] > 0, key
    assert row["unavailable"]["mfu_pct"].startswith("the ranks share this CPU's cores")
    assert run_subprocess("report", "results/torchrun", cwd=tmp_path).returncode == 0


def test_a_cell_past_its_timeout_takes_its_whole_group_with_it(tmp_path):
    proc = start(
        "run",
        "--models",
        "cifar-mlp",
        "--methods",
        "full",
        "--nproc",
        "2",
        "--samples",
        "8192",
        "--batch-size",
        "16",
        "--epochs",
        "3",
        "--progress",
        "off",
        "--cell-timeout",
        "8",
        cwd=tmp_path,
    )
    wait_for(lambda: len(rank_processes(proc.pid)) == 2)
    ranks = rank_processes(proc.pid)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    (row,), _ = rows_of(only_run_dir(tmp_path))
    assert row["status"] == "timeout"
    assert not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks)  # no orphan rank

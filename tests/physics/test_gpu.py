"""Checks that need a real GPU. Skipped here, with the reason; run them wherever one is attached
(`python -m pytest tests/physics/test_gpu.py`, or `lorabench proof`) and commit that run's results.
Where a GPU must be present (LORABENCH_REQUIRE_GPU=1, as the nightly sets on its GPU runners) they
fail instead of skipping when torch sees none."""

import pytest
import torch
from conftest import lorabench_rows

from lorabench.measure.environment import REQUIRE_GPU, gpu_required, no_gpu_reason
from lorabench.measure.trackers import TorchAllocator
from lorabench.plan.cells import Cell
from lorabench.run.experiment import execute

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() and not gpu_required(),
        reason="needs a CUDA or ROCm GPU; none is visible to torch",
    ),
]
MiB = 2**20


@pytest.fixture(autouse=True)
def _a_gpu_when_required():
    if not torch.cuda.is_available():
        pytest.fail(f"{REQUIRE_GPU} is set and {no_gpu_reason()}")


def test_allocator_peak_rises_by_an_allocated_tensor_within_10_percent():
    size = 256 * MiB
    device = torch.device("cuda", 0)
    with TorchAllocator(device) as t:
        x = torch.empty(size // 4, dtype=torch.float32, device=device)
        x.fill_(1)
        del x
    r = t.result()
    assert abs(r["torch_peak_above_baseline_bytes"] - size) < 0.1 * size, r
    assert r["torch_peak_reserved_bytes"] >= r["torch_peak_allocated_bytes"]


@pytest.fixture(scope="module")
def gpu_row():
    row = execute(
        Cell(
            model="cifar-mlp",
            method="full",
            device="cuda",
            samples=256,
            eval_samples=64,
            batch_size=32,
            epochs=2,
            warmup_epochs=1,
        )
    )
    assert row.ok, row.error
    return row


def test_a_gpu_cell_reports_framework_memory_and_event_timings(gpu_row):
    m = gpu_row.metrics
    assert m["torch_peak_allocated_bytes"] >= 4 * 4 * 20_998_154  # weights + grads + Adam
    assert m["torch_peak_reserved_bytes"] >= m["torch_peak_allocated_bytes"]
    assert m["step_s_p50"] > 0 and len([e for e in gpu_row.epochs if e["timed"]]) == 2
    assert m["torch_allocated_after_first_step_bytes"] > m["torch_allocated_baseline_bytes"]


def test_the_driver_sees_the_context_on_top_of_the_allocators_pool(gpu_row):
    lib = "amdsmi" if torch.version.hip else "nvml"
    device = "amdsmi_device_vram_used_peak_bytes" if torch.version.hip else "nvml_device_used_peak_bytes"
    # the device-level reading needs only the mapping of torch's device to the driver's: it must be there
    assert gpu_row.metrics.get(device, 0) >= gpu_row.metrics["torch_peak_reserved_bytes"], (
        gpu_row.unavailable.get(device)
    )
    key = f"{lib}_process_peak_bytes"
    if gpu_row.metrics.get(key) is None:  # the one reason allowed: a container that hides the host's PIDs
        assert gpu_row.unavailable[key].startswith(
            f"process not visible to {'amdsmi' if lib == 'amdsmi' else 'NVML'}"
        ), gpu_row.unavailable[key]
    else:
        assert gpu_row.metrics[key] >= gpu_row.metrics["torch_peak_reserved_bytes"]
    assert gpu_row.environment["cuda_bad_fork"] is False and gpu_row.environment["gpu_uuid"]


def test_pretraining_leaves_no_cached_blocks_in_the_lora_cells_peaks():
    """Seed 002 pretrains the MLP in full before adapting it: its gradients, Adam state and cached
    blocks must be gone before the trackers start. The bound comes from the cell's own prediction
    (reparametrised LoRA builds a full-size W + BA and its gradient: 0.55 of full fine-tuning's
    peak, not below half): the reserved peak within 10 % of it plus 64 MiB (cuBLAS's workspace, 32 MiB
    on Hopper, and the allocator's rounding), where pretraining's 12 bytes per parameter left behind
    (252 MiB) would not fit."""
    from lorabench.plan.survey import survey

    cell = Cell(
        model="cifar-mlp",
        method="lora-reparam",
        rank=1,
        device="cuda",
        samples=256,
        eval_samples=64,
        batch_size=32,
        epochs=1,
        warmup_epochs=1,
        pretrain_epochs=1,
    )
    predicted = survey(cell).prediction.peak_bytes
    lora = execute(cell)
    assert lora.ok, lora.error
    reserved = lora.metrics["torch_peak_reserved_bytes"]
    assert reserved <= 1.1 * predicted + 64 * MiB, (reserved / MiB, predicted / MiB)


def test_gpu_arch_is_a_compute_capability_or_a_gfx_target(gpu_row):
    arch = gpu_row.environment["gpu_arch"]
    assert arch.startswith("gfx" if torch.version.hip else "sm_"), arch


def test_lorabench_check_passes_on_this_gpu():
    from lorabench.check import run_checks

    failed = [c for c in run_checks("cuda") if not c.ok]
    assert not failed, failed


def test_lorabench_check_records_the_runtime_context_a_fit_check_adds(tmp_path, monkeypatch):
    from lorabench.gpucheck import allocator_vs_driver
    from lorabench.measure import calibration
    from lorabench.plan.admission import runtime_context

    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path))
    gpu_cell, cpu_cell = Cell(model="cifar-mlp", method="full", device="cuda"), Cell(model="cifar-mlp")
    assert runtime_context(gpu_cell)[0] == 0
    assert allocator_vs_driver(torch.device("cuda")).ok
    name, kind, context = calibration.context(calibration.CHECK)
    assert name == torch.cuda.get_device_name(0) and 50 * 2**20 < context < 4 * 2**30
    assert runtime_context(gpu_cell)[0] == context and runtime_context(cpu_cell)[0] == 0


@pytest.mark.parametrize("model", ["medium-gpt2", "medium-llama"])
def test_the_simulated_peak_is_within_ten_percent_of_the_allocators(model, tmp_path):
    """The simulated step runs the CPU's kernels; the allocator's peak on the GPU is what it predicts.
    Medium models (~1 GiB peaks): cuBLAS's workspace (tens of MiB, through the allocator) is then a
    few percent, not the half of a tiny model's peak."""
    _, rows = lorabench_rows(
        "run", "--device", "cuda", "--models", model, "--methods", "full,lora", "--ranks", "16", "--samples", "32",
        "--eval-samples", "8", "--batch-size", "4", "--seq-len", "256", "--epochs", "1", "--warmup-epochs", "0",
        "--progress", "off", cwd=tmp_path,
    )  # fmt: skip
    for row in rows:
        assert row["info"]["predicted_peak_by"] == "simulated step"
        assert 0.9 <= row["metrics"]["predicted_over_measured"] <= 1.1, (
            row["cell"]["method"],
            row["metrics"],
        )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for a cell of two processes")
def test_a_cell_of_two_gpus_reports_each_processs_allocator_and_driver_view(tmp_path):
    """nccl, one GPU per process, as a user runs it (a subprocess: the processes fork from one that
    has not touched CUDA)."""
    _, rows = lorabench_rows(
        "run",
        "--models",
        "bert-tiny",
        "--methods",
        "full",
        "--nproc",
        "2",
        "--strategy",
        "ddp,fsdp2",
        "--device",
        "cuda",
        "--samples",
        "256",
        "--epochs",
        "1",
        "--progress",
        "off",
        "--strict",
        cwd=tmp_path,
    )
    assert len(rows) == 2
    for r in rows:
        assert [e["process"] for e in r["per_process"]] == [0, 1]
        assert all(e["torch_peak_allocated_bytes"] > 0 for e in r["per_process"])
        assert r["metrics"]["torch_peak_allocated_sum_bytes"] == sum(
            e["torch_peak_allocated_bytes"] for e in r["per_process"]
        )
        assert r["metrics"]["check_ranks_first_loss_abs_diff"] < 1e-3


def test_memory_snapshot_writes_what_memory_viz_opens(tmp_path):
    import json
    import pickle

    _, rows = lorabench_rows(
        "run",
        "--models",
        "cifar-mlp",
        "--methods",
        "lora",
        "--ranks",
        "2",
        "--device",
        "cuda",
        "--samples",
        "256",
        "--epochs",
        "1",
        "--progress",
        "off",
        "--memory-snapshot",
        "--profile",
        cwd=tmp_path,
    )
    (run_dir,) = (tmp_path / "results").iterdir()
    row = rows[0]
    snapshot = pickle.loads((run_dir / row["info"]["memory_snapshot"]).read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"]
    events = json.loads((run_dir / row["info"]["profile_trace"]).read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)  # the GPU's own kernels are in the trace


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_cells_run_on_the_gpu_under_either_start_method(start_method, tmp_path):
    """The path every GPU run takes: cells forked from the fork server (peft preloaded) or spawned,
    the parent never touching CUDA, a cell of PEFT LoRA and one of full fine-tuning ok."""

    _, rows = lorabench_rows(
        "run",
        "--models",
        "bert-tiny",
        "--methods",
        "full,lora",
        "--ranks",
        "8",
        "--device",
        "cuda",
        "--samples",
        "256",
        "--epochs",
        "1",
        "--progress",
        "off",
        "--start-method",
        start_method,
        "--strict",
        cwd=tmp_path,
    )
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["environment"]["cuda_bad_fork"] is False for r in rows)

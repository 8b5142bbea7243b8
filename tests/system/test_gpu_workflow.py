"""The nightly GPU workflow fails on a runner whose torch sees no GPU: its steps run here, on a
machine without one, as the runner would run them (the job's environment, bash)."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job():
    return yaml.safe_load((ROOT / ".github" / "workflows" / "gpu-nightly.yml").read_text())["jobs"]["gpu"]


def step(job, name: str) -> dict:
    return next(s for s in job["steps"] if s.get("name") == name)


def run_step(job, name: str) -> subprocess.CompletedProcess:
    """The step's `run` script in bash -e, with the job's and the step's environment (no GPU here)."""
    s = step(job, name)
    env = {**os.environ, **{k: str(v) for k, v in {**job.get("env", {}), **s.get("env", {})}.items()}}
    env.pop("GH_TOKEN", None)
    return subprocess.run(
        ["bash", "-e", "-c", s["run"]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_job_requires_a_gpu_and_installs_the_torch_its_driver_runs(job):
    assert job["env"]["LORABENCH_REQUIRE_GPU"] == "1"
    install = step(job, "Install")
    assert "inputs.cuda_torch_index" in install["env"]["TORCH_INDEX"]
    assert "inputs.rocm_torch_index" in install["env"]["TORCH_INDEX"]
    assert '--index-url "$TORCH_INDEX" torch torchvision' in install["run"]
    on = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu-nightly.yml").read_text())[True]
    assert set(on["workflow_dispatch"]["inputs"]) == {"cuda_torch_index", "rocm_torch_index"}


def test_the_check_step_fails_where_torch_sees_no_gpu(job):
    assert step(job, "Check the measurement stack")["run"].strip() == "lorabench check --device cuda"
    done = run_step(job, "Check the measurement stack")
    assert done.returncode == 2 and "torch sees no GPU here" in done.stderr, done.stderr


def test_the_gpu_tests_step_fails_instead_of_skipping(job):
    done = run_step(job, "GPU tests")
    assert done.returncode != 0, done.stdout[-2000:]
    assert "LORABENCH_REQUIRE_GPU is set and torch sees no GPU here" in done.stdout
    assert "passed" not in done.stdout.splitlines()[-1]


def test_without_the_requirement_the_gpu_tests_skip_with_their_reason():
    env = {k: v for k, v in os.environ.items() if k != "LORABENCH_REQUIRE_GPU"}
    done = subprocess.run(
        ["python", "-m", "pytest", "tests/physics/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "needs a CUDA or ROCm GPU; none is visible to torch" in done.stdout

"""Where a GPU must be present (LORABENCH_REQUIRE_GPU=1, the nightly's GPU runners), the benchmarks
stop at once when torch sees none, instead of timing the CPU under a GPU job's name."""

import pytest
import torch

from lorabench.measure.environment import REQUIRE_GPU, gpu_required, no_gpu_reason


def pytest_sessionstart(session):
    if gpu_required() and not torch.cuda.is_available():
        pytest.exit(f"{REQUIRE_GPU} is set and {no_gpu_reason()}", returncode=1)

"""Which failures are out-of-memory rows: torch's own, and those of the libraries that allocate for
themselves, in the words and wrappers torch gives them (messages as torch 2.14's checks write them)."""

import errno

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InductorError

from lorabench.run.oom import is_oom

CUBLAS = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
HIPBLAS = "HIP error: HIPBLAS_STATUS_ALLOC_FAILED when calling `hipblasCreate(handle)`"
ROCBLAS = "rocblas_status_memory_error when calling `rocblas_sgemm`"
NCCL = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, unhandled cuda error (run "
    "with NCCL_DEBUG=INFO for details), NCCL version 2.27.3\nncclUnhandledCudaError: Call to CUDA "
    "function failed.\nLast error:\nCuda failure 'out of memory'"
)
NCCL_HOST = "NCCL error: ncclSystemError: System call (e.g. socket, malloc) failed\nLast error:\nCannot allocate memory"
RUNTIME = "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"
CPU = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes."


@pytest.mark.parametrize(
    "e",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        MemoryError(),
        RuntimeError(CUBLAS),
        RuntimeError(HIPBLAS),
        RuntimeError(ROCBLAS),
        RuntimeError(RUNTIME),
        RuntimeError(CPU),
        dist.DistBackendError(NCCL),
        dist.DistBackendError(NCCL_HOST),
        OSError(errno.ENOMEM, "Cannot allocate memory"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:30],
)
def test_a_failed_allocation_is_oom_in_any_librarys_words(e):
    assert is_oom(e)


def test_what_the_compiler_wraps_is_read():
    inner = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_oom(BackendCompilerFailed(lambda: None, inner, None))
    assert is_oom(InductorError(RuntimeError(CUBLAS), None))


def test_the_cause_and_the_context_are_followed():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as first:
            raise RuntimeError("the step failed") from first
    except RuntimeError as e:
        assert is_oom(e)
    try:
        try:
            raise RuntimeError(CUBLAS)
        except RuntimeError:
            raise ValueError("while handling it, something else")  # __context__ only
    except ValueError as e:
        assert is_oom(e)


@pytest.mark.parametrize(
    "e",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        ValueError("out of memory"),  # not a library's failure: a ValueError is our own input check
        OSError(errno.ENOENT, "No such file or directory"),
    ],
)
def test_other_failures_stay_errors(e):
    assert not is_oom(e)


def test_a_cycle_in_the_chain_ends():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not is_oom(a)

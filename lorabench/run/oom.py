"""Whether an exception means the cell ran out of memory: its row is then `oom`, not `error`.

    lorabench run --models bert-base --methods full --batch-size 512 --device cuda   # an oom row

torch raises `torch.OutOfMemoryError` for its own allocators only. A library that allocates
for itself fails in its own words, wrapped in a plain RuntimeError: cuBLAS and hipBLAS
(`CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)`: torch's
TORCH_CUDABLAS_CHECK), rocBLAS (`rocblas_status_memory_error`), the CUDA or HIP runtime outside
the caching allocator (`CUDA error: out of memory`), NCCL through torch.distributed's
DistBackendError (`Cuda failure 'out of memory'`, or the host's `Cannot allocate memory`), the
CPU allocator (`DefaultCPUAllocator: can't allocate memory`). torch.compile wraps whatever its
compiled code raised (BackendCompilerFailed, InductorError: `inner_exception`), and a handler
that raises anew keeps the first one as `__cause__` or `__context__`: the whole chain is read.
"""

from __future__ import annotations

import errno

import torch

# Lower-cased fragments of the messages above; each names a failed allocation and nothing else.
MESSAGES = (
    "out of memory",  # torch's CUDA/HIP OOM text, the runtimes' own, NCCL's "Cuda failure 'out of memory'"
    "_status_alloc_failed",  # cuBLAS, hipBLAS, cuDNN, cuSPARSE, cuSOLVER status names
    "rocblas_status_memory_error",
    "miopenstatusallocfailed",  # MIOpen (ROCm's cuDNN)
    "hiperroroutofmemory",
    "cudaerrormemoryallocation",
    "can't allocate memory",  # torch's CPU allocator
    "cannot allocate memory",  # strerror(ENOMEM): NCCL's system errors, a failed mmap
)


def _chain(e: BaseException):
    """`e` and every exception it carries: __cause__, __context__, a compiler's inner_exception."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__, getattr(x, "inner_exception", None)]


def _one(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(e, OSError) and e.errno == errno.ENOMEM:
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(m in text for m in MESSAGES)


def is_oom(e: BaseException) -> bool:
    """True when `e`, or any exception in its chain, is a failed allocation."""
    return any(_one(x) for x in _chain(e))

"""Fork safety on a GPU host: no process that runs a cell or a rank is forked after CUDA was queried.

    python -m pytest tests/system/test_processes.py     # the invariants, checked on the CPU

torch marks a process as a "bad fork" when its parent had asked the CUDA runtime anything (even
`torch.cuda.is_available()` without NVML, or `device_count()`): every CUDA call in it then raises
"Cannot re-initialize CUDA in forked subprocess". Cells fork from the fork server and ranks fork
from their cell's process, so neither may have queried CUDA. The one library that does so on
import is bitsandbytes (its import asks `torch.cuda.is_available()` and, on a GPU, every device's
capability, which initialises CUDA), and peft imports it whenever it can. The parent, the fork
server and every cell process `keep_out` bitsandbytes (peft treats it as optional), so the fork
server can preload peft and the parent can build PEFT models on the meta device without touching
CUDA; a cell that quantises `allow`s it, in its own process, which forks nothing.
"""

from __future__ import annotations

import importlib
import sys

import torch

# Libraries whose import queries CUDA. Kept out of the processes that fork cells or ranks (the
# parent of a run, the fork server, a cell's agent process); `allow` lets a process import one.
QUERIES_CUDA_ON_IMPORT = ("bitsandbytes",)


class BadFork(RuntimeError):
    """This process was forked from one that had queried CUDA: no CUDA call can work in it."""


_kept_out: set[str] = set()


def keep_out() -> None:
    """From now on in this process (and in what it forks), `import bitsandbytes` raises ImportError
    unless `allow` lifts it: a None entry in sys.modules is how Python spells "not importable", and
    peft treats bitsandbytes as optional. A library already imported stays."""
    for name in QUERIES_CUDA_ON_IMPORT:
        if name not in sys.modules:
            sys.modules[name] = None
            _kept_out.add(name)


def allow(name: str):
    """Import `name` though `keep_out` kept it out: in a process that uses it (a cell that quantises,
    the probe of whether it can). peft's cached answers to "is bitsandbytes importable?" are
    cleared, so it builds its k-bit layers from here on. ImportError where it is not installed."""
    if name in _kept_out and sys.modules.get(name, "") is None:
        del sys.modules[name]
        _kept_out.discard(name)
        if "peft" in sys.modules:
            from peft import import_utils

            for check in ("is_bnb_available", "is_bnb_4bit_available"):
                getattr(getattr(import_utils, check, None), "cache_clear", lambda: None)()
    return importlib.import_module(name)


def no_cuda_extensions() -> None:
    """peft's BOFT compiles and loads a CUDA extension when it makes its first layer, which
    initialises CUDA (peft's own comment, its issue 1877). In a process that must not touch CUDA
    (the parent, building a cell's model on the meta device to survey it), tell BOFT there is none:
    its layers then take the path they take wherever the extension cannot be built."""
    from peft.tuners.boft import layer  # peft's module global, read by layer.get_fbd_cuda()

    if layer._FBD_CUDA is None:
        layer._FBD_CUDA = False


def let_in() -> None:
    """Undo `keep_out`: for a process that runs the CLI in-process, then imports what it kept out
    (the test suite)."""
    for name in list(_kept_out):
        if sys.modules.get(name, "") is None:
            del sys.modules[name]
        _kept_out.discard(name)


def in_bad_fork() -> bool:
    """Whether torch marked this process a bad fork (readable on a CPU build as on a GPU one)."""
    return bool(torch._C._cuda_isInBadFork())


def require_clean(device: torch.device) -> None:
    """Raise BadFork, one line naming the cause, before a CUDA cell or rank makes its first CUDA call."""
    if device.type == "cuda" and in_bad_fork():
        raise BadFork(
            "this process was forked from one that had already queried CUDA, so torch refuses every "
            "CUDA call in it; run with --start-method spawn, and report it: lorabench's fork server and "
            "cell processes must not touch CUDA"
        )

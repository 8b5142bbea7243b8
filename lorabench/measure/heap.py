"""Host RSS as a training step needs it: the C library's freed heap handed back around every operator.

    lorabench run --models medium-llama --methods full,lora --device cpu   # host_rss_step_peak_bytes

glibc keeps what a process frees for reuse: a freed chunk stays resident until the top of its
heap is free above the trim threshold, and a large chunk carved from that kept heap is not
mmapped, so it is not returned either when it is freed. A training process's RSS therefore stays
near its highest point long after its tensors are gone: on the medium zoo models it sat 10-60 %
above the live tensors' peak. `ReturnedHeap`, a dispatch mode, calls `malloc_trim(0)` before and
after every operator (glibc >= 2.8 hands back the free pages of every arena, not only the heap's top), and
reads the kernel's high-water mark of this process's RSS over the block (VmHWM, reset at entry
through /proc/self/clear_refs, Linux >= 4.0). Its rise over the block is what the step needed
above what it started with: its tensors, and what torch and its libraries allocate beside them,
as the kernel counts it, without the C library's retention.

Linux with glibc only; elsewhere `rise_bytes` is `Unavailable` and says why. It costs a system call
per operator: run it after the timed region. Resetting VmHWM also resets what getrusage reports
as ru_maxrss from then on: read `host_maxrss_bytes` before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import first_line
from .trackers import SelfRss, Unavailable

CLEAR_REFS = "/proc/self/clear_refs"
STATUS = "/proc/self/status"
RESET_HIGH_WATER = "5"  # clear_refs: "reset the peak resident set size" (Documentation/filesystems/proc.rst)


def _malloc_trim():
    """glibc's malloc_trim, or the reason there is none."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else Unavailable("no C library found")
    except (OSError, AttributeError) as e:
        return Unavailable(f"the C library has no malloc_trim (not glibc): {first_line(e)}")


def hand_back() -> None:
    """Hand the free pages of the C library's heap back to the kernel now (nothing where it cannot)."""
    trim = _malloc_trim()
    if not isinstance(trim, Unavailable):
        trim(0)


def _high_water_bytes() -> int:
    with open(STATUS) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"{STATUS} has no VmHWM")


class ReturnedHeap(TorchDispatchMode):
    """The rise of this process's RSS over the block, freed heap handed back around every operator:
    `rise_bytes` once the block has exited (an `Unavailable` where it cannot be measured)."""

    def __init__(self):
        super().__init__()
        self._trim = _malloc_trim()
        self._rss: SelfRss | None = None
        self.start_bytes = 0
        self.rise_bytes: int | Unavailable = Unavailable("the block has not run")

    def __enter__(self):
        mode = super().__enter__()
        self._rss = SelfRss()
        torch.empty(0)  # torch's first Python dispatch imports ~900 modules (~150 MiB): not the step's
        if not isinstance(self._trim, Unavailable):
            gc.collect()  # garbage freed inside the block would lower its rise
            self._trim(0)
            try:
                with open(CLEAR_REFS, "w") as f:
                    f.write(RESET_HIGH_WATER)
                self.start_bytes = self._rss()
            except OSError as e:
                self._trim = Unavailable(
                    f"cannot reset the RSS high-water mark ({CLEAR_REFS}): {first_line(e)}"
                )
        return mode

    def __exit__(self, *exc):
        try:
            if isinstance(self._trim, Unavailable):
                self.rise_bytes = self._trim
            else:
                self.rise_bytes = _high_water_bytes() - self.start_bytes
        finally:
            self._rss.close()
            super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        trim = not isinstance(self._trim, Unavailable)
        if trim:
            # what Python freed since the last operator (a `del`, autograd dropping a saved tensor) is
            # handed back before this one allocates: else glibc may give it fresh pages beside them
            self._trim(0)
        out = func(*args, **(kwargs or {}))
        if trim:
            self._trim(0)  # what the operator freed leaves RSS now, as an allocator that returns it would
        return out

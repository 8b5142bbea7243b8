"""`lorabench check`'s checks can fail: each one against a measurement made wrong on purpose."""

import subprocess
import sys

import torch

from lorabench import hostcheck
from lorabench.measure import flops
from lorabench.measure.trackers import HostMemory


def test_the_host_rss_check_sets_a_new_mark_and_fails_a_sampler_that_misses_the_buffer(monkeypatch):
    before = hostcheck.resource.getrusage(hostcheck.resource.RUSAGE_SELF).ru_maxrss * 1024
    ok = hostcheck.host_rss()
    assert ok.ok, ok
    size = int(ok.name.split(": ")[1].split(" MiB")[0].replace(",", "")) * hostcheck.MiB
    assert size >= 512 * hostcheck.MiB
    # the buffer raised the kernel's high-water mark: the getrusage comparison was made, not skipped
    assert hostcheck.resource.getrusage(hostcheck.resource.RUSAGE_SELF).ru_maxrss * 1024 > before
    monkeypatch.setattr(
        HostMemory, "_sample", lambda self: None
    )  # a sampler that never reads after its start
    assert not hostcheck.host_rss().ok


NO_OP_TRIM = """
from lorabench import hostcheck
from lorabench.measure import heap
heap._malloc_trim = lambda: lambda pad: 0  # a C library whose trim hands nothing back
found = hostcheck.returned_heap()
print(found.measured, found.ok)
"""


def test_the_returned_heap_check_fails_where_the_freed_heap_is_not_handed_back(monkeypatch):
    from lorabench.measure import heap

    ok = hostcheck.returned_heap()
    assert ok.ok, ok
    # glibc carves the 64 MiB from the heap it kept: RSS rises by less than they hold. Which free
    # block glibc picks depends on every earlier free (in this process, a block an earlier trim had
    # handed back could be picked, which RSS counts again): a fresh process has the heap the check
    # meets in the CLI. There, one in three fresh processes maps one of the two 32 MiB tensors afresh
    # (+33.7 MiB rather than +1.9: whether glibc's mmap threshold has risen to 32 MiB yet), so the
    # rise is held against the check's own bound, not a tighter one.
    out = subprocess.run([sys.executable, "-c", NO_OP_TRIM], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[0].strip("+")) < 0.9 * 64 and out.stdout.split()[-1] == "False", (
        out.stdout
    )
    monkeypatch.setattr(heap, "_malloc_trim", lambda: heap.Unavailable("the C library has no malloc_trim"))
    missing = hostcheck.returned_heap()
    assert not missing.ok and missing.measured.startswith("the C library has no malloc_trim (")


def test_the_matmul_ceiling_check_fails_a_ceiling_too_high_as_well_as_too_low(monkeypatch):
    assert hostcheck.matmul_ceiling(torch.device("cpu")).ok
    for wrong in (1.0, 1e18):  # 1 FLOP/s: every step beats it; 1 EFLOP/s: a clock read before the work ended
        monkeypatch.setattr(flops, "measure_matmul_flops", lambda *a, rate=wrong, **k: {"matmul_flops": rate})
        assert not hostcheck.matmul_ceiling(torch.device("cpu")).ok, wrong

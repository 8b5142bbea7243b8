"""Physics: with the freed heap handed back after every operator, host RSS rises over a block by
what its tensors held at once, and no more; where it cannot be measured, it says why."""

import pytest
import torch

from lorabench.measure import heap
from lorabench.measure.trackers import SelfRss, Unavailable

MiB = 2**20


def test_the_rise_is_what_the_operators_held_at_once_not_an_earlier_high_water_mark():
    before = torch.ones(128 * MiB // 4)  # a high-water mark above the block's: the reset must forget it
    del before
    returned = heap.ReturnedHeap()
    with returned:
        x = torch.ones(32 * MiB // 4)
        y = x * 2  # 64 MiB held at once
        del x
        z = y + 1  # and again
        del y, z
    assert returned.rise_bytes == pytest.approx(64 * MiB, rel=0.10)


def small_chunks_freed_below_a_live_one() -> tuple[int, int]:
    """(RSS rise while 96 MiB of 64 KiB tensors live, RSS rise after they are freed), each a glibc
    heap chunk below the mmap threshold, with one kept above them so the heap's top is not free."""
    rss = SelfRss()
    start = rss()
    chunks = [torch.ones(64 * 1024 // 4) for _ in range(96 * 16)]
    keep = torch.ones(64 * 1024 // 4)
    held = rss() - start
    del chunks
    torch.zeros(1)  # one more operator: inside ReturnedHeap, the trim after it
    after = rss() - start
    rss.close()
    del keep
    return held, after


def test_the_c_library_keeps_freed_heap_and_the_mode_hands_it_back():
    held, kept = small_chunks_freed_below_a_live_one()
    assert held > 90 * MiB and kept > 0.9 * held  # glibc keeps it: why the timed region's RSS sits high
    with heap.ReturnedHeap():
        held, kept = small_chunks_freed_below_a_live_one()
    assert held > 90 * MiB and kept < 8 * MiB


def test_without_malloc_trim_or_the_high_water_reset_the_rise_is_unavailable_with_why(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", lambda: Unavailable("the C library has no malloc_trim"))
    with heap.ReturnedHeap() as returned:
        torch.ones(1024)
    assert returned.rise_bytes == Unavailable("the C library has no malloc_trim")
    monkeypatch.undo()
    monkeypatch.setattr(heap, "CLEAR_REFS", "/nonexistent/clear_refs")
    with heap.ReturnedHeap() as returned:
        torch.ones(1024)
    assert isinstance(returned.rise_bytes, Unavailable)
    assert "cannot reset the RSS high-water mark (/nonexistent/clear_refs)" in returned.rise_bytes.reason

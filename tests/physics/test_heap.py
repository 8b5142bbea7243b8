"""Physics: with the freed heap handed back after every operator, host RSS rises over a block by
what its tensors held at once, and no more; where it cannot be measured, it says why."""

import pytest
import torch

from lorabench.hostcheck import freed_below_a_live_one
from lorabench.measure import heap
from lorabench.measure.trackers import Unavailable

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


def test_what_python_frees_between_operators_is_handed_back_before_the_next_one_allocates():
    # a free block on the heap that x, y and z are carved from: without a trim before `y + 1`, x's
    # freed pages stay resident while z faults in pages of its own, and the rise reads 96 MiB
    freed = freed_below_a_live_one(160)
    returned = heap.ReturnedHeap()
    with returned:
        x = torch.ones(32 * MiB // 4)
        y = x * 2
        del x  # freed by Python, not inside an operator
        z = y + 1
        del y, z
    del freed
    assert returned.rise_bytes == pytest.approx(64 * MiB, rel=0.10)


def test_the_c_library_keeps_freed_heap_and_the_mode_hands_it_back():
    freed = freed_below_a_live_one(96)
    # glibc keeps it: why the timed region's RSS sits high
    assert freed.written_bytes > 80 * MiB and freed.kept_bytes > 0.9 * freed.written_bytes, freed
    with heap.ReturnedHeap():
        freed = freed_below_a_live_one(96)
    assert freed.written_bytes > 80 * MiB and freed.kept_bytes < 8 * MiB, freed


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

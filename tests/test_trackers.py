"""Physics: the trackers must see memory we allocate on purpose."""
import torch

from lorabench.trackers import HostMemory, TorchAllocator, is_unavailable

MiB = 2 ** 20


def test_host_peak_rises_by_an_allocated_tensor_within_10_percent():
    size = 256 * MiB
    with HostMemory(interval_s=0.005) as t:
        x = torch.ones(size // 4, dtype=torch.float32)   # ones() touches every page: resident
        x.add_(1)
        del x
    r = t.result()
    assert abs(r["host_peak_above_baseline_bytes"] - size) < 0.1 * size, r
    # The kernel's high-water mark covers this process alone (the sampled peak adds children).
    assert r["host_maxrss_bytes"] >= size


def test_host_tracker_keeps_its_reading_when_the_block_raises():
    t = HostMemory(interval_s=0.005)
    try:
        with t:
            x = torch.ones(64 * MiB // 4)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert t.result()["host_peak_above_baseline_bytes"] > 0.9 * 64 * MiB
    assert not t._thread.is_alive()   # the sampler stopped in finally
    del x


def test_torch_allocator_on_cpu_is_unavailable_not_zero():
    with TorchAllocator(torch.device("cpu")) as t:
        pass
    r = t.result()
    assert all(is_unavailable(v) for v in r.values())
    assert r["torch_peak_allocated_bytes"].startswith("unavailable: torch keeps no allocator statistics")

"""Physics: the trackers must see memory we allocate on purpose."""

import time

import torch

from lorabench.measure.trackers import HostMemory, SavedTensors, TorchAllocator, Unavailable, is_unavailable

MiB = 2**20


def test_host_peak_rises_by_an_allocated_tensor_within_10_percent():
    size = 256 * MiB
    with HostMemory(interval_s=0.005) as t:
        x = torch.ones(size // 4, dtype=torch.float32)  # ones() touches every page: resident
        x.add_(1)
        deadline = (
            time.monotonic() + 10
        )  # hold it until the sampler's thread has run (a busy machine delays it)
        while t.peak - t.baseline < 0.9 * size and time.monotonic() < deadline:
            time.sleep(0.005)
        del x
    r = t.result()
    assert abs(r["host_peak_above_baseline_bytes"] - size) < 0.1 * size, r
    assert r["host_maxrss_bytes"] >= size  # the kernel's high-water mark of this process


def test_host_tracker_keeps_its_reading_when_the_block_raises():
    t = HostMemory(interval_s=0.005)
    try:
        with t:
            x = torch.ones(64 * MiB // 4)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert t.result()["host_peak_above_baseline_bytes"] > 0.9 * 64 * MiB
    assert not t._thread.is_alive()  # the sampler stopped in finally
    del x


def test_torch_allocator_on_cpu_is_unavailable_not_zero():
    with TorchAllocator(torch.device("cpu")) as t:
        pass
    r = t.result()
    assert all(is_unavailable(v) for v in r.values())
    assert r["torch_peak_allocated_bytes"].reason.startswith("torch keeps no allocator statistics")


def test_saved_tensors_counts_what_autograd_keeps_once_and_leaves_out_parameters():
    w = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(8, 32, requires_grad=True)
    with SavedTensors(exclude={w.untyped_storage().data_ptr()}) as t:
        h = torch.relu(x @ w.t())  # mm saves x and w; relu saves its output
        y = (h * h).sum()  # mul saves h twice: one storage
    r = t.result()
    assert r == {"activations_saved_bytes": x.nbytes + h.nbytes, "activations_saved_tensors": 2}
    y.backward()  # the graph still works: the hooks hand tensors back untouched
    assert torch.allclose(x.grad, (2 * h * (h > 0)) @ w.detach())


def test_saved_tensors_count_the_whole_storage_a_saved_view_keeps_alive():
    base = torch.randn(100, 10, requires_grad=True)
    with SavedTensors() as t:
        big = base * 2
        (big[:10] ** 2).sum()  # pow saves a 10-row view of big's storage
    assert t.result()["activations_saved_bytes"] >= big.nbytes


def test_host_memory_is_the_cells_own_process_not_what_it_starts():
    """A process the cell starts inside the window (torch.compile's worker pool, say) holds its own
    memory, not the cell's: 256 MiB in a child must not show in the cell's peak."""
    import subprocess
    import sys

    with HostMemory(interval_s=0.005) as t:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; x = bytearray(256 * 2 ** 20); time.sleep(1.5)"]
        )
        child.wait()
    assert t.result()["host_peak_above_baseline_bytes"] < 32 * MiB


def test_a_tracker_whose_start_raised_reports_why_not_a_second_error():
    t = TorchAllocator(torch.device("cuda"))

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    t.start = broken
    try:
        with t:
            pass
    except RuntimeError:
        pass
    assert not t.started
    assert t.unavailable_result("did not start") == {
        k: Unavailable("did not start") for k in TorchAllocator.KEYS
    }
    # stopped without its peaks read (the device failed under it): a reason, never a TypeError on None
    assert all(is_unavailable(v) for v in t.result().values())


def test_a_cell_whose_tracker_fails_to_start_keeps_that_error_in_its_row(monkeypatch):
    from lorabench.plan.cells import Cell
    from lorabench.run import experiment

    class Broken(TorchAllocator):
        def start(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(experiment, "TorchAllocator", Broken)
    row = experiment.execute(
        Cell(
            model="cifar-mlp",
            method="full",
            samples=16,
            eval_samples=8,
            batch_size=8,
            epochs=1,
            warmup_epochs=0,
        )
    )
    assert (row.error["type"], row.error["message"]) == (
        "RuntimeError",
        "CUDA error: an illegal memory access was encountered",
    )
    assert row.unavailable["torch_peak_allocated_bytes"] == "Broken did not start"
    assert row.metrics["host_peak_rss_bytes"] > 0  # the tracker that did start keeps its reading

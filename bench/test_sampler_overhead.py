"""A sampler must not disturb what it measures: training steps with every memory sampler of a cell on vs off.

    pytest bench/test_sampler_overhead.py -s

The samplers are those a cell runs: host RSS every 10 ms (a pread of /proc from a Python thread,
which takes the GIL from the training loop now and then), and on a GPU the driver's view too
(NVML or amdsmi: a device query and the process list every 10 ms). Measured paired: each round
times a block of steps without samplers, with them, and without again, in alternating order;
the overhead is the median of with / (mean of the two without), so the machine's drift cancels.
The two blocks without samplers, one against the other, give the noise floor, printed beside the
figure. Rounds go on until the median's standard error is under RESOLVE of both, so a 1 %
overhead can be told apart from noise, or MAX_ROUNDS have run. On a shared VM they may not get
there (one 2-core machine here: a block's time moves 5-8 % between two unsampled blocks), so the
samplers' cost is also measured directly, where noise does not reach it: the CPU time their
threads spend per second of steps (time.thread_time, read in the sampler's own thread), an upper
bound on what they take from the training thread through the GIL. Target: both under 2 % (the
paired figure only where it was resolved: otherwise it is printed, with its standard error).
"""

import statistics
import time

import pytest
import torch

from lorabench.measure.drivers import driver_trackers
from lorabench.measure.environment import gpu_required
from lorabench.plan.cells import Cell
from lorabench.workload import models, optimizers
from lorabench.workload.methods import METHODS

GATE = 0.02  # the samplers may cost at most 2 % of a step
RESOLVE = 0.005  # standard error of each median: resolves 1 %
BLOCK_S = 0.25  # seconds of steps per timed block
MIN_ROUNDS, MAX_ROUNDS = 12, 40
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() and not gpu_required(), reason="needs a GPU for the driver sampler"
        ),
    ),
]


def se_of_median(xs: list[float]) -> float:
    return 1.2533 * statistics.stdev(xs) / len(xs) ** 0.5


def samplers(device: torch.device) -> list:
    """The samplers a cell runs on `device`, at the cell's default 10 ms, each keeping the CPU time
    its thread spends sampling (`busy_s`)."""
    from lorabench.measure.trackers import HostMemory

    drivers, _, _, missing = driver_trackers(device, 0.01)
    if device.type == "cuda" and not drivers:
        pytest.fail(f"no driver sampler on this GPU: {missing}")
    out = [HostMemory(0.01), *drivers]
    for s in out:
        s.busy_s = 0.0
        s._safe_sample = timed(s, s._safe_sample)
    return out


def timed(sampler, sample):
    def run():
        t0 = (
            time.thread_time()
        )  # this thread's CPU time: the sampler's own work, not the wait between samples
        try:
            sample()
        finally:
            sampler.busy_s += time.thread_time() - t0

    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["cifar-mlp", "bert-tiny"])
def test_sampling_costs_under_2_percent(model, device, benchmark):
    dev = torch.device(device)
    torch.manual_seed(0)
    bundle = models.build(model)
    module = METHODS["full"].apply(bundle, Cell(model=model, method="full").adapter).module.to(dev)
    ds = bundle.synthetic(32, 64, eval_samples=8).to(dev, torch.float32)
    optimizer = optimizers.make("adam", [p for p in module.parameters() if p.requires_grad], 1e-4)[0]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    def step():
        loss = bundle.task.loss(module, ds.train)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    busy = []  # the samplers' CPU time per second of sampled steps, one entry per sampled block

    def block(n: int, sampled: bool) -> float:
        running = samplers(dev) if sampled else []
        for s in running:
            s.start()
        try:
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            sync()
            took = time.perf_counter() - t0
        finally:
            for s in running:
                s.stop()
        if sampled:
            busy.append(sum(s.busy_s for s in running) / took)
        return took

    for _ in range(3):  # warm-up: kernels chosen, Adam's state allocated
        step()
    n = max(3, round(BLOCK_S / (block(5, False) / 5)))
    ratios, noise = [], []
    for r in range(MAX_ROUNDS):
        order = (False, True, False) if r % 2 == 0 else (False, False, True)  # the sampled block moves
        times = [block(n, sampled) for sampled in order]
        on = times[order.index(True)]
        off = [t for t, sampled in zip(times, order) if not sampled]
        ratios.append(on / statistics.mean(off))
        noise.append(off[0] / off[1])
        if r + 1 >= MIN_ROUNDS and max(se_of_median(ratios), se_of_median(noise)) <= RESOLVE:
            break
    overhead = statistics.median(ratios) - 1
    floor = statistics.median(abs(x - 1) for x in noise)
    resolved = max(se_of_median(ratios), se_of_median(noise)) <= RESOLVE
    direct = statistics.median(busy)
    benchmark.extra_info.update(
        model=model,
        device=device,
        samplers=[type(s).__name__ for s in samplers(dev)],
        steps_per_block=n,
        rounds=len(ratios),
        overhead_pct=100 * overhead,
        overhead_se_pct=100 * se_of_median(ratios),
        noise_floor_pct=100 * floor,
        resolved=resolved,
        sampler_cpu_pct=100 * direct,
    )
    # the pytest-benchmark figure: a block of steps with the samplers running
    benchmark.pedantic(lambda: block(n, True), rounds=5, warmup_rounds=1)
    print(
        f"{model} on {device}: paired {100 * overhead:+.2f} % (se {100 * se_of_median(ratios):.2f} %, "
        f"{'resolved' if resolved else 'NOT resolved to 1 %'}) over {len(ratios)} rounds of {n} steps; noise floor "
        f"(off vs off) {100 * floor:.2f} %; the samplers' own CPU time {100 * direct:.3f} % of the steps' wall time"
    )
    assert direct < GATE
    if resolved:
        assert overhead < GATE

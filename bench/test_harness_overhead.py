"""The harness must measure the model, not itself: its training epoch against a hand-written loop.

    pytest bench/test_harness_overhead.py --benchmark-columns=min,median,max

Both loops train the same model on the same resident tensors: the same per-epoch permutation,
cross-entropy, fused Adam, zero_grad(set_to_none=True). The hand loop slices a shuffled copy of
the set; the harness gathers each batch by index (no copy of the data set to count as
activations). The harness adds that gather, its per-step clock, dict-of-tensors batches and the
task dispatch (1.01 on 2 CPU cores after the change to gathering, 2026-11-23); the target is within 3 % of the
hand loop's epoch time (median of timed epochs from interleaved blocks, so drift in the machine
hits both alike). Both follow the same protocol: a fresh Adam, one warm-up epoch, timed epochs.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from lorabench.measure.stats import Summary
from lorabench.plan.cells import Cell
from lorabench.run.train import fit
from lorabench.workload import models
from lorabench.workload.methods import METHODS

CPU = torch.device("cpu")
BATCH, SAMPLES, SEQ = 32, 256, 64
TARGET = 1.03  # harness epoch / hand epoch


def setup_case(model: str):
    torch.manual_seed(0)
    bundle = models.build(model)
    module = METHODS["full"].apply(bundle, Cell(model=model, method="full").adapter).module
    ds = bundle.synthetic(SAMPLES, SEQ, eval_samples=BATCH)
    return module, bundle.task, ds


def hand_epoch(model, ds, optimizer, generator) -> float:
    """The careful hand-written loop, timed exactly as the harness times an epoch."""
    n = ds.train["labels"].shape[0]
    perm = torch.randperm(n, generator=generator)
    t0 = time.perf_counter()
    tensors = {k: v[perm] for k, v in ds.train.items()}
    labels = tensors["labels"]
    for i in range(n // BATCH):
        sl = slice(i * BATCH, (i + 1) * BATCH)
        if "x" in tensors:  # the image MLP
            logits = model(tensors["x"][sl])
        else:
            logits = model(
                input_ids=tensors["input_ids"][sl], attention_mask=tensors["attention_mask"][sl]
            ).logits
        F.cross_entropy(logits, labels[sl]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def harness_run(model, task, ds, epochs: int) -> list[float]:
    """The harness's own protocol: a fresh optimizer, one warm-up epoch, then `epochs` timed epochs."""
    return fit(model, task, ds, epochs=epochs, warmup_epochs=1, batch_size=BATCH, device=CPU).timed_epoch_s


def hand_run(model, task, ds, epochs: int) -> list[float]:
    """The same protocol by hand (the harness's eval pass between epochs is left out)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)
    hand_epoch(model, ds, opt, g)
    return [hand_epoch(model, ds, opt, g) for _ in range(epochs)]


@pytest.mark.parametrize("model", ["cifar-mlp", "bert-tiny"])
@pytest.mark.parametrize("loop", ["harness", "hand"])
def test_epoch(benchmark, model, loop):
    module, task, ds = setup_case(model)
    benchmark.group = f"epoch {model} full, batch {BATCH}, {SAMPLES} samples"
    benchmark.extra_info.update(
        model=model,
        loop=loop,
        batch_size=BATCH,
        samples=SAMPLES,
        params_trainable=sum(p.numel() for p in module.parameters()),
    )
    run = harness_run if loop == "harness" else hand_run
    # One round = warm-up epoch + 1 timed epoch; the benchmark reports the whole round.
    benchmark.pedantic(run, args=(module, task, ds, 1), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("model", ["cifar-mlp", "bert-tiny"])
def test_harness_within_3_percent_of_hand_loop(model):
    """Interleaved blocks of 3 timed epochs each, the order alternating. The gate compares
    the fastest timed epoch of each side: on a shared 2-core machine the median of either swings by
    +-3 % from one run to the next, while noise only ever adds time, so the minimum is the steadier
    estimate of what the loop itself costs. Medians are printed beside it."""
    module, task, ds = setup_case(model)
    harness, hand = [], []
    for block in range(6):  # alternate which loop goes first, so neither always inherits the other's state
        runs = [(harness, harness_run), (hand, hand_run)]
        for out, run in runs if block % 2 == 0 else runs[::-1]:
            out += run(module, task, ds, 3)
    ratio = min(harness) / min(hand)
    print(
        f"{model}: fastest epoch harness {min(harness) * 1e3:.1f} ms, hand {min(hand) * 1e3:.1f} ms, ratio {ratio:.3f}; "
        f"medians {Summary.of(harness).median * 1e3:.1f} / {Summary.of(hand).median * 1e3:.1f} ms"
    )
    assert ratio < TARGET, f"harness epoch is {100 * (ratio - 1):.1f}% slower than the hand loop"

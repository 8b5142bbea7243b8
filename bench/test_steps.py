"""One pytest-benchmark per (model, method): a single training step at a small size.

    pytest bench/test_steps.py --benchmark-json=steps.json
    pytest-benchmark compare steps.json            # pytest-benchmark's own reader
    lorabench report --pytest-benchmark steps.json # the same results as lorabench markdown

Each benchmark builds the cell exactly as a run does (model, method, resident data, fused Adam),
runs explicit warm-up rounds, then times one optimizer step per round with the device
synchronised inside the timed function. `extra_info` carries the cell, the parameter counts and
the peak memory (allocator peak on a GPU; on the CPU the sampled RSS peak of the benchmark
process during this benchmark, interpreter and libraries included).
"""

from __future__ import annotations

import pytest
import torch

from lorabench.measure.trackers import HostMemory
from lorabench.plan.cells import Cell
from lorabench.workload import models, optimizers
from lorabench.workload.methods import METHODS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [
    (m, meth, r)
    for m in ("cifar-mlp", "bert-tiny")
    for meth, r in (("full", None), ("lora", 8), ("lora-reparam", 8))
]


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("model, method, rank", CASES, ids=[f"{m}-{meth}" for m, meth, _ in CASES])
def test_training_step(benchmark, model, method, rank):
    cell = Cell(model=model, method=method, rank=rank, batch_size=32, seq_len=64, device=DEVICE.type)
    torch.manual_seed(0)
    bundle = models.build(model)
    adapted = METHODS[method].apply(bundle, cell.adapter)
    module = adapted.module.to(DEVICE).train()
    ds = bundle.synthetic(cell.batch_size, cell.seq_len).to(DEVICE, torch.float32)
    batch = ds.train
    optimizer, impl = optimizers.make("adam", [p for p in module.parameters() if p.requires_grad], cell.lr)

    def step():
        loss, _ = bundle.task.loss(module, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()  # inside the timed function: the step is over when the device says so

    benchmark.group = f"training step: {model}, batch {cell.batch_size}"
    host = HostMemory(0.01)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    with host:
        benchmark.pedantic(step, rounds=10, warmup_rounds=3, iterations=1)
    peak = (
        torch.cuda.max_memory_allocated(DEVICE)
        if DEVICE.type == "cuda"
        else host.result()["host_peak_rss_bytes"]
    )
    p = adapted.params
    benchmark.extra_info.update(
        cell=cell.to_dict(),
        label=cell.label,
        params_trainable=p.trainable,
        params_total=p.total,
        params_trainable_adapter=p.adapter,
        optimizer=impl,
        device=DEVICE.type,
        peak_memory_bytes=peak,
        peak_memory_kind="torch_max_memory_allocated"
        if DEVICE.type == "cuda"
        else "host RSS peak during this benchmark",
    )

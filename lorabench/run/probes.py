"""The training steps a cell takes outside its timed loop: one probe step before it, for the
one-off bookkeeping (what autograd saves, the gradients' and the optimizer state's bytes), and two
steps after it whose second gives the CPU's framework-level and host-RSS peaks of a step. The
protocol (`experiment`) calls them; the timed loop (`train.fit`) is left bare.
"""

from __future__ import annotations

import torch
from torch import nn

from ..measure import heap, simulation
from ..measure.trackers import SavedTensors, Unavailable
from ..plan.cells import Cell
from ..workload import distributed, optimizers
from ..workload.data import Dataset
from ..workload.precision import Precision
from ..workload.tasks import Task
from .train import micro_batch


def probe_step(
    model: nn.Module,
    task: Task,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    cell: Cell,
    device: torch.device,
    group: distributed.Group | None = None,
    count: bool = True,
    amp: Precision = Precision(),
) -> dict[str, int]:
    """One optimizer step before the training loop, for the one-off bookkeeping: what autograd
    keeps for backward (saved-tensor hooks around the first forward), the gradients' and Adam
    state's bytes, and the allocator at those phase boundaries. It trains like a warm-up step, and
    it allocates Adam's state, so no timed step pays for that. A process takes its shard of the batch
    and counts the tensors it holds (an FSDP2 shard). With `count=False`, a bare step (what
    --profile traces)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    index, world = (group.index, group.world) if group else (0, 1)
    # parameters and the resident data set are not activations
    exclude = {
        distributed.local(t).untyped_storage().data_ptr() for t in (*model.parameters(), *data.train.values())
    }
    out: dict[str, int] = {}
    for m in range(cell.grad_accum):
        rows = micro_batch(m, index, world, cell.batch_size)
        batch = {k: v[rows] for k, v in data.train.items()}
        with distributed.grad_sync(model, m == cell.grad_accum - 1):
            if m == 0 and count:
                with SavedTensors(exclude) as saved, amp.autocast():
                    loss = task.loss(model, batch)[0]
                out.update(saved.result())
            else:
                with amp.autocast():
                    loss = task.loss(model, batch)[0]
            amp.backward(loss / cell.grad_accum)
    if not count:
        amp.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return out
    out["grads_bytes"] = sum(distributed.local(p.grad).nbytes for p in params if p.grad is not None)
    if device.type == "cuda":  # allocator at the phase boundary: weights + data + grads
        out["torch_allocated_after_first_backward_bytes"] = torch.cuda.memory_allocated(device)
    amp.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    out["optimizer_state_bytes"] = optimizers.state_bytes_held(optimizer, distributed.local)
    if device.type == "cuda":  # grads freed, optimizer state allocated
        out["torch_allocated_after_first_step_bytes"] = torch.cuda.memory_allocated(device)
    return out


def step_peaks(
    model: nn.Module, task: Task, data: Dataset, optimizer: torch.optim.Optimizer, cell: Cell, amp: Precision
) -> dict[str, int | Unavailable]:
    """The peaks of the second of two more training steps, after the timed region (both cost time
    per operator): `host_tensors_peak_bytes`, the bytes of the torch tensors live at its peak as the simulated step
    counts them (`simulation.LiveTensors` on real tensors), the CPU's framework-level peak; and
    `host_rss_step_peak_bytes`, the tensors it started with plus the rise of host RSS over it with the
    C library's freed heap handed back around every operator (`heap.ReturnedHeap`). Weights and the
    optimizer's state count; the data set does not."""
    batches = [
        {k: v[micro_batch(m, batch_size=cell.batch_size)] for k, v in data.train.items()}
        for m in range(min(cell.grad_accum, 2))
    ]
    model.train()
    for _ in range(2):  # the second is measured: the first pays the dispatch modes' one-time costs
        # (each operator's first trip through Python, ~3 MiB of RSS in a fresh process)
        live, returned = simulation.LiveTensors(), heap.ReturnedHeap()
        with returned:
            simulation.step(
                model, task, batches, optimizer, live, grad_accum=cell.grad_accum, autocast_dtype=amp.cast
            )
    rise = returned.rise_bytes
    return {
        "host_tensors_peak_bytes": live.peak,
        "host_rss_step_peak_bytes": rise if isinstance(rise, Unavailable) else live.start + rise,
    }

"""Cells of several processes: one torch.distributed process group per cell, launched as torchrun does.

    lorabench run --models cifar-mlp --methods full,lora --ranks 8 --nproc 2 --strategy fsdp2

The cell's own process is the agent: it hosts the group's TCPStore and forks one process per rank
with the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT,
TORCHELASTIC_USE_AGENT_STORE), so a rank joins with `init_process_group` over env:// exactly as
under torchrun (which is how a cell spans nodes: see the README). gloo on the CPU, nccl on CUDA
(RCCL on ROCm), one device per rank. Every rank runs the whole protocol of `experiment` on its
shard of each global batch and sends its figures back; the agent folds them into one row:
memory as "per device: max" (what must fit) and "all devices: sum" (what it costs), time as the
slowest rank's. A rank that dies or raises ends the cell, naming the rank; the others get a few
seconds to report what they measured, then are killed, so a cell never hangs on a dead peer.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import multiprocessing as mp
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .rows import is_number

PG_TIMEOUT_S = 120.0   # a collective waiting this long on a peer raises instead of hanging the cell
GRACE_S = 5.0          # after one rank fails, how long the others get to report what they measured
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}   # torch's "nccl" is RCCL on a ROCm build
STRATEGIES = {   # cells.STRATEGIES, described for `lorabench list`
    "ddp": "DistributedDataParallel: a whole replica per process, gradients all-reduced in buckets",
    "fsdp2": "FSDP2's fully_shard per transformer block (else per Linear), then the root: weights, gradients and "
             "Adam state cut N ways",
}


@dataclass(frozen=True)
class Group:
    """This process's place in the cell's process group, read from torchrun's environment."""

    rank: int
    world: int
    local_rank: int
    strategy: str

    @classmethod
    def from_env(cls, strategy: str) -> "Group":
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                   strategy)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def device(self, kind: str) -> torch.device:
        """This rank's device: its own GPU (by LOCAL_RANK among the visible ones), or the CPU."""
        if kind == "cuda":
            index = self.local_rank % max(torch.cuda.device_count(), 1)
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")

    def join(self, device: torch.device) -> None:
        """Join the process group; on the CPU, each rank gets its share of the cores (as torchrun's
        OMP_NUM_THREADS=1 intends: ranks must not oversubscribe them)."""
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", self.world))))
        dist.init_process_group(BACKENDS[device.type], timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
                                **({"device_id": device} if device.type == "cuda" else {}))


# ---- the model across ranks ------------------------------------------------------------------

def units(module: nn.Module) -> list[nn.Module]:
    """FSDP2's units: every transformer block (a child of an nn.ModuleList with parameters); in a
    model without blocks, every Linear, a LoRA-wrapped Linear with its adapters as one unit (frozen
    and trainable parameters in one shard group, which FSDP2 allows). The root takes the rest."""
    def outermost(pick: Callable[[str, nn.Module], bool]) -> list[nn.Module]:
        out, taken = [], []
        for name, m in module.named_modules():
            if not any(name.startswith(t + ".") for t in taken) and pick(name, m):
                out.append(m)
                taken.append(name)
        return out
    blocks = {id(c) for m in module.modules() if isinstance(m, nn.ModuleList) for c in m
              if any(True for _ in c.parameters())}
    found = outermost(lambda name, m: id(m) in blocks)
    return found or outermost(lambda name, m: isinstance(m, nn.Linear) or hasattr(m, "base_layer"))


def unit_params(module: nn.Module) -> tuple[int, int]:
    """(parameters of the largest unit, parameters left to the root): what FSDP2 gathers at once."""
    found = units(module)
    inside = {id(p) for u in found for p in u.parameters()}
    largest = max((sum(p.numel() for p in u.parameters()) for u in found), default=0)
    return largest, sum(p.numel() for p in module.parameters() if id(p) not in inside)


def wrap(model: nn.Module, group: Group, device: torch.device) -> nn.Module:
    """The model as this rank trains it: a DDP replica, or sharded by FSDP2's fully_shard per unit,
    then the root. FSDP2 changes the module in place (its parameters become DTensor shards)."""
    if group.strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (group.world,))
    for unit in units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model: nn.Module) -> None:
    """Put FSDP2's units back in shards. A forward without a backward (an eval pass) leaves the
    root's parameters gathered and registered in place of its shards: an optimizer built then, or
    a count of the tensors a rank holds, would see whole tensors. No-op for DDP and one process."""
    for m in model.modules():
        if hasattr(m, "reshard") and hasattr(m, "unshard"):
            m.reshard()


def held(model: nn.Module) -> list[Tensor]:
    """The parameter tensors this rank holds: FSDP2's local shards once resharded."""
    reshard(model)
    return [local(p) for p in model.parameters()]


def local(t: Tensor) -> Tensor:
    """The part of `t` this rank holds: an FSDP2 parameter, gradient or Adam moment is a DTensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def grad_sync(model: nn.Module, enabled: bool):
    """A context in which backward all-reduces (or reduce-scatters) gradients only when `enabled`:
    the micro-batches before the last of a step only accumulate."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):   # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):   # FSDP2
        @contextlib.contextmanager
        def off():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return off()
    return contextlib.nullcontext()


def mean(value: float, device: torch.device) -> float:
    """The mean over ranks of a number each rank holds."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def params_max_abs_diff(model: nn.Module, device: torch.device, chunk: int = 2 ** 18) -> float:
    """Largest |parameter - rank 0's parameter| over every parameter and rank: 0 when the replicas
    agree (DDP after a step). Broadcast `chunk` elements at a time (1 MiB of fp32), so the check
    adds next to nothing to the peaks it runs among."""
    worst = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        for i in range(0, flat.numel(), chunk):
            theirs = flat[i:i + chunk].clone()
            dist.broadcast(theirs, src=0)
            worst = torch.maximum(worst, (flat[i:i + chunk] - theirs).abs().max().double())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter whole, on the leader's CPU (others get {}): how checks see an FSDP2 model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- the agent: start the ranks, watch them, fold their figures ----------------------------------

@dataclass
class RankResult:
    """What one rank sent, or how it ended without sending it."""

    rank: int
    payload: dict[str, Any] | None = None   # experiment's measurement of this rank
    exitcode: int | None = None
    ended_at: float | None = None            # monotonic time its failure was seen

    @property
    def failed(self) -> bool:
        if self.payload is not None:
            return self.payload["status"] not in ("ok", "diverged")
        return self.exitcode is not None

    def death(self) -> str:
        """How a rank ended without a result."""
        if self.exitcode is not None and self.exitcode < 0:
            return signal.Signals(-self.exitcode).name
        return f"exit code {self.exitcode}"


def _die_with_parent() -> None:
    """A rank must not outlive its agent (a killed cell takes its whole group with it)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _rank_entry(target: Callable, env: dict[str, str], conn, args: tuple) -> None:
    _die_with_parent()
    os.environ.update(env)
    try:
        target(conn, *args)
    finally:
        conn.close()


def launch(world: int, target: Callable, args: tuple = (),
           on_message: Callable[[tuple], None] | None = None) -> list[RankResult]:
    """Run `target(conn, *args)` in `world` forked processes with torchrun's environment, hosting
    their store; a ("result", payload) message is the rank's result, any other goes to
    `on_message`. Returns every rank's result once all have ended; after the first failure the
    others get GRACE_S to report, then are killed."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)   # the agent's store
    common = {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
              "TORCHELASTIC_RUN_ID": uuid.uuid4().hex}
    ctx = mp.get_context("fork")   # the agent has imported torch but touched no device: the ranks start warm
    results = [RankResult(r) for r in range(world)]
    procs, conns = [], {}
    for r in range(world):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank_entry, name=f"lorabench-rank{r}",
                        args=(target, {**common, "RANK": str(r), "LOCAL_RANK": str(r)}, send, args))
        p.start()
        send.close()
        procs.append(p)
        conns[recv] = r
    deadline = None
    try:
        live = dict(conns)
        while live:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            ready = wait(list(live), timeout)
            if not ready:   # grace is over: the rest are stuck on a dead peer
                break
            for c in ready:
                r = live[c]
                try:
                    msg = c.recv()
                except EOFError:   # the rank is gone
                    del live[c]
                    procs[r].join()
                    if results[r].payload is None:
                        results[r].exitcode = procs[r].exitcode
                        results[r].ended_at = time.monotonic()
                    continue
                if msg[0] == "result":
                    results[r].payload = msg[1]
                    if results[r].failed:
                        results[r].ended_at = time.monotonic()
                elif on_message:
                    on_message(msg)
            if deadline is None and any(x.failed for x in results):
                deadline = time.monotonic() + GRACE_S
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        for c in conns:
            c.close()
        del store
    return results


def root_cause(results: list[RankResult]) -> RankResult | None:
    """The rank whose failure ended the cell. A peer's death makes the others raise moments later
    (gloo: "connection reset by peer"), so of the failures seen within a second of the first, one
    that died without a result (a signal, an exit) is the cause before one that raised."""
    failed = [x for x in results if x.failed]
    if not failed:
        return None
    first = min(x.ended_at or 0.0 for x in failed)
    together = [x for x in failed if (x.ended_at or 0.0) <= first + 1.0]
    return min(together, key=lambda x: (x.payload is not None, x.ended_at or 0.0, x.rank))


# Figures of a rank that the row gives as the max over ranks: what must fit on one device, and
# the slowest rank's time. `_sum` companions add the per-device peaks: what the cell costs.
MAX_OVER_RANKS = ("host_peak_rss_bytes", "host_peak_above_baseline_bytes", "host_rss_baseline_bytes",
                  "host_maxrss_bytes", "torch_peak_allocated_bytes", "torch_peak_reserved_bytes",
                  "torch_peak_above_baseline_bytes", "torch_allocated_baseline_bytes",
                  "torch_allocated_after_first_backward_bytes", "torch_allocated_after_first_step_bytes",
                  "nvml_process_peak_bytes", "amdsmi_process_peak_bytes", "weights_bytes", "trainable_weights_bytes",
                  "grads_bytes", "optimizer_state_bytes", "activations_saved_bytes", "activations_saved_tensors",
                  "epoch_s", "step_s_p50", "step_s_p90", "cell_wall_s")
SUMMED = {"host_peak_rss_bytes": "host_peak_rss_sum_bytes", "torch_peak_allocated_bytes": "torch_peak_allocated_sum_bytes",
          "nvml_process_peak_bytes": "nvml_process_peak_sum_bytes", "amdsmi_process_peak_bytes": "amdsmi_process_peak_sum_bytes"}
PER_RANK = ("host_peak_rss_bytes", "torch_peak_allocated_bytes", "nvml_process_peak_bytes", "amdsmi_process_peak_bytes",
            "weights_bytes", "grads_bytes", "optimizer_state_bytes", "step_s_p50", "epoch_s")


@dataclass
class Folded:
    measured: dict[str, Any] = field(default_factory=dict)
    per_rank: list[dict[str, Any]] = field(default_factory=list)


def fold(results: list[RankResult]) -> Folded:
    """One row's figures from every rank's: the leader's, with MAX_OVER_RANKS taken over the ranks
    that measured them, their sums, and one entry per rank."""
    reported = [x.payload["measured"] for x in results if x.payload is not None]
    out = Folded(dict(next((x.payload["measured"] for x in results if x.rank == 0 and x.payload), {})))
    for key in MAX_OVER_RANKS:
        values = [m[key] for m in reported if is_number(m.get(key))]
        if values:
            out.measured[key] = max(values)
    for key, total in SUMMED.items():
        values = [m.get(key) for m in reported]
        if reported and len(reported) == len(results) and all(is_number(v) for v in values):
            out.measured[total] = sum(values)
    for x in results:
        m = x.payload["measured"] if x.payload else {}
        entry = {"rank": x.rank, "status": x.payload["status"] if x.payload else "crashed"}
        entry.update({k: m[k] if is_number(m.get(k)) else None for k in PER_RANK})
        out.per_rank.append(entry)
    return out

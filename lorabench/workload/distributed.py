"""The model across the processes of a cell: their process group, DDP and FSDP2.

    lorabench run --models cifar-mlp --methods full,lora --ranks 8 --nproc 2 --strategy fsdp2

Each process joins its cell's process group from torchrun's environment (`Group`): gloo on the CPU,
nccl on CUDA (RCCL on ROCm), one device per process. Here: how a process wraps its model (a DDP replica,
or FSDP2's shards per transformer block), what it holds, and the checks across processes. Who starts
the processes is `run.processes`; who folds their figures into a row, `results.fold`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .settings import Choice

PG_TIMEOUT_S = 120.0  # a collective waiting this long on a peer raises instead of hanging the cell
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # torch's "nccl" is RCCL on a ROCm build


@dataclass(frozen=True, kw_only=True)
class Strategy(Choice):
    """One `--strategy` value: how the processes of a cell share the model."""

    shards: bool = False  # each process holds a shard of the weights and their state (else a replica)


def _several(name: str):
    return lambda cell: (
        f"--strategy {name} applies to cells of several processes; give --nproc 2 or more"
        if cell.nproc == 1
        else None
    )


STRATEGIES: dict[str, Strategy] = {
    "ddp": Strategy(
        description="DistributedDataParallel: a whole replica per process, gradients all-reduced in buckets",
        requires=_several("ddp"),
    ),
    "fsdp2": Strategy(
        description="FSDP2's fully_shard per transformer block (else per Linear), then the root: weights, "
        "gradients and Adam state cut N ways",
        shards=True,
        requires=_several("fsdp2"),
    ),
}
DEFAULT_STRATEGY = "ddp"  # a cell of several processes that names none


@dataclass(frozen=True)
class Group:
    """This process's place in the cell's process group, read from torchrun's environment."""

    index: int  # this process's place in the group: torchrun's RANK
    world: int
    local_index: int  # among the processes of its node: LOCAL_RANK
    strategy: str

    @classmethod
    def from_env(cls, strategy: str) -> "Group":
        return cls(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
            strategy,
        )

    @property
    def leader(self) -> bool:
        return self.index == 0

    @property
    def shards(self) -> bool:
        """Whether this group shards the model (FSDP2) rather than replicating it (DDP)."""
        return STRATEGIES[self.strategy].shards

    def device(self, kind: str) -> torch.device:
        """This process's device: its own GPU (by LOCAL_RANK among the visible ones), or the CPU."""
        if kind == "cuda":
            index = self.local_index % max(torch.cuda.device_count(), 1)
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")

    def join(self, device: torch.device) -> None:
        """Join the process group; on the CPU, each process gets its share of the cores (as torchrun's
        OMP_NUM_THREADS=1 intends: processes must not oversubscribe them)."""
        if device.type == "cpu":
            torch.set_num_threads(
                max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))
            )
        dist.init_process_group(
            BACKENDS[device.type],
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
            **({"device_id": device} if device.type == "cuda" else {}),
        )


# ---- the model across processes ------------------------------------------------------------------


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

    blocks = {
        id(c)
        for m in module.modules()
        if isinstance(m, nn.ModuleList)
        for c in m
        if any(True for _ in c.parameters())
    }
    found = outermost(lambda name, m: id(m) in blocks)
    return found or outermost(lambda name, m: isinstance(m, nn.Linear) or hasattr(m, "base_layer"))


def unit_params(module: nn.Module) -> tuple[int, int]:
    """(parameters of the largest unit, parameters left to the root): what FSDP2 gathers at once."""
    found = units(module)
    inside = {id(p) for u in found for p in u.parameters()}
    largest = max((sum(p.numel() for p in u.parameters()) for u in found), default=0)
    return largest, sum(p.numel() for p in module.parameters() if id(p) not in inside)


def wrap(model: nn.Module, group: Group, device: torch.device) -> nn.Module:
    """The model as this process trains it: a DDP replica, or sharded by FSDP2's fully_shard per unit,
    then the root. FSDP2 changes the module in place (its parameters become DTensor shards)."""
    if not group.shards:
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
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
    a count of the tensors a process holds, would see whole tensors. No-op for DDP and one process."""
    for m in model.modules():
        if hasattr(m, "reshard") and hasattr(m, "unshard"):
            m.reshard()


def held(model: nn.Module) -> list[Tensor]:
    """The parameter tensors this process holds: FSDP2's local shards once resharded."""
    reshard(model)
    return [local(p) for p in model.parameters()]


def local(t: Tensor) -> Tensor:
    """The part of `t` this process holds: an FSDP2 parameter, gradient or Adam moment is a DTensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def grad_sync(model: nn.Module, enabled: bool):
    """A context in which backward all-reduces (or reduce-scatters) gradients only when `enabled`:
    the micro-batches before the last of a step only accumulate."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

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
    """The mean over processes of a number each process holds."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def params_max_abs_diff(model: nn.Module, device: torch.device, chunk: int = 2**18) -> float:
    """Largest |parameter - process 0's parameter| over every parameter and process: 0 when the replicas
    agree (DDP after a step). Broadcast `chunk` elements at a time (1 MiB of fp32), so the check
    adds next to nothing to the peaks it runs among."""
    worst = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        for i in range(0, flat.numel(), chunk):
            theirs = flat[i : i + chunk].clone()
            dist.broadcast(theirs, src=0)
            worst = torch.maximum(worst, (flat[i : i + chunk] - theirs).abs().max().double())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter whole, on the leader's CPU (others get {}): how checks see an FSDP2 model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

"""A cell of several processes: its ranks started as torchrun starts its workers, their figures folded into one row.

    lorabench run --models cifar-mlp --methods full,lora --ranks 8 --nproc 2 --strategy fsdp2
    torchrun --nproc-per-node 2 -m lorabench.run.ranks RUN_DIR '{"model": "bert-tiny", "method": "full"}'

The cell's own process is the agent: it hosts the group's TCPStore and forks one process per rank
with the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT,
TORCHELASTIC_USE_AGENT_STORE), so a rank joins with `init_process_group` over env:// exactly as
under torchrun (which is how a cell spans nodes: `main`, and the README). The agent itself never
touches a device: a process forked from one that had queried CUDA could not use it
(`forksafe`). Every rank runs the protocol of `experiment` on its shard of each global batch and
sends its figures back; the agent folds them as each metric's `fold` says (metrics.METRICS). A rank
that dies or raises ends the cell, naming the rank; the others get a few seconds to report what
they measured, then are killed, so a cell never hangs on a dead peer.
"""

from __future__ import annotations

import ctypes
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

from ..measure import environment
from ..measure.traces import Traces
from ..plan.cells import Cell
from ..results.metrics import is_number
from ..results.rows import Row, Status
from ..workload.distributed import Group
from .experiment import measure
from .train import EpochRecord

GRACE_S = 5.0  # after one rank fails, how long the others get to report what they measured


@dataclass
class RankResult:
    """What one rank sent, or how it ended without sending it."""

    rank: int
    payload: dict[str, Any] | None = None  # experiment's measurement of this rank
    exitcode: int | None = None
    ended_at: float | None = None  # monotonic time its failure was seen

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
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _rank_entry(target: Callable, env: dict[str, str], conn, args: tuple) -> None:
    _die_with_parent()
    os.environ.update(env)
    try:
        target(conn, *args)
    finally:
        conn.close()


def launch(
    world: int, target: Callable, args: tuple = (), on_message: Callable[[tuple], None] | None = None
) -> list[RankResult]:
    """Run `target(conn, *args)` in `world` forked processes with torchrun's environment, hosting
    their store; a ("result", payload) message is the rank's result, any other goes to
    `on_message`. Returns every rank's result once all have ended; after the first failure the
    others get GRACE_S to report, then are killed."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the agent's store
    common = {
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RUN_ID": uuid.uuid4().hex,
    }
    ctx = mp.get_context("fork")  # the agent has imported torch but touched no device: the ranks start warm
    results = [RankResult(r) for r in range(world)]
    procs, conns = [], {}
    for r in range(world):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_rank_entry,
            name=f"lorabench-rank{r}",
            args=(target, {**common, "RANK": str(r), "LOCAL_RANK": str(r)}, send, args),
        )
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
            if not ready:  # grace is over: the rest are stuck on a dead peer
                break
            for c in ready:
                r = live[c]
                try:
                    msg = c.recv()
                except EOFError:  # the rank is gone
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


@dataclass
class Folded:
    measured: dict[str, Any] = field(default_factory=dict)
    per_rank: list[dict[str, Any]] = field(default_factory=list)


def fold(results: list[RankResult]) -> Folded:
    """One row's figures from every rank's, as each metric's `fold` says (metrics.METRICS): the
    leader's, the max over the ranks that measured it, or the sum over the devices they used; the
    `sum_of` companions where every rank reported; and one entry per rank (its `per_rank`
    figures, its device and whether it started clean of CUDA)."""
    from ..results.metrics import METRICS

    payloads = {x.rank: x.payload for x in results if x.payload is not None}
    measured = {r: p["measured"] for r, p in payloads.items()}
    out = Folded(dict(measured.get(0, {})))
    for metric in METRICS:
        values = {r: m.get(metric.key) for r, m in measured.items()}
        numbers = [v for v in values.values() if is_number(v)]
        if metric.fold == "max" and numbers:
            out.measured[metric.key] = max(numbers)
        elif metric.fold == "devices":
            out.measured[metric.key] = _over_devices(metric.key, results, values, payloads)
        if metric.sum_of:
            parts = [m.get(metric.sum_of) for m in measured.values()]
            if len(parts) == len(results) and all(is_number(v) for v in parts):
                out.measured[metric.key] = sum(parts)
    kept = [m.key for m in METRICS if m.per_rank]
    for x in results:
        m = measured.get(x.rank, {})
        facts = (x.payload or {}).get("env_facts", {})
        entry = {
            "rank": x.rank,
            "status": x.payload["status"] if x.payload else "crashed",
            "device": device_key(facts),
            "cuda_bad_fork": facts.get("cuda_bad_fork"),
        }
        entry.update({k: m[k] if is_number(m.get(k)) else None for k in kept})
        out.per_rank.append(entry)
    return out


def device_key(facts: dict[str, Any]) -> str | None:
    """Which physical device a rank used: its PCI address, else its UUID. On ROCm torch's UUID comes
    from HIP's unique id, which devices without one report alike (all zeros), so two GPUs could be
    counted as one; no two devices share a PCI address."""
    return facts.get("gpu_pci_bus_id") or facts.get("gpu_uuid")


def _over_devices(key: str, results: list[RankResult], values: dict[int, Any], payloads: dict[int, dict]):
    """The sum over the cell's devices of a device's own counter (energy), each device once however
    many ranks read it; unavailable, with the first rank's reason, unless every rank read it."""
    from ..measure.trackers import Unavailable, unavailable

    for x in results:
        v = values.get(x.rank)
        if not is_number(v):
            why = (
                v.reason
                if isinstance(v, Unavailable)
                else ("it ended without a result" if x.rank not in payloads else "it did not measure it")
            )
            return unavailable(f"rank {x.rank} of {len(results)}: {why}")
    per_device: dict[Any, float] = {}
    for r, v in values.items():
        device = device_key(payloads[r].get("env_facts", {})) or ("rank", r)  # unknown: a device of its own
        per_device[device] = max(
            per_device.get(device, v), v
        )  # two readings of one counter: the same interval
    return sum(per_device.values())


def rank_main(
    conn, cell_dict: dict[str, Any], sample_interval_s: float, traces: Traces | None = None
) -> None:
    """One rank of a cell of several processes, launched by `launch`."""
    cell = Cell.from_dict(cell_dict)
    group = Group.from_env(cell.strategy)
    on_epoch = (lambda rec, total: conn.send(("epoch", vars(rec), total))) if group.leader else None
    try:
        conn.send(("result", measure(cell, group, on_epoch, sample_interval_s, traces)))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def execute_group(
    cell: Cell,
    on_epoch: Callable[[EpochRecord, int], None] | None = None,
    sample_interval_s: float = 0.01,
    known: dict[str, Any] | None = None,
    traces: Traces | None = None,
) -> Row:
    """Run a cell of `cell.nproc` processes from this one (the agent) and return its row: launch the
    ranks, fold their figures; a rank that failed ends the cell with its status, named, beside
    what the others measured. `known`: as `experiment.execute`'s."""
    started = time.perf_counter()
    forward = (lambda msg: on_epoch(EpochRecord(**msg[1]), msg[2])) if on_epoch else None
    results = launch(cell.nproc, rank_main, (cell.to_dict(), sample_interval_s, traces), on_message=forward)
    return group_row(cell, results, known or {}, started)


def group_row(cell: Cell, results: list[RankResult], known: dict[str, Any], started: float) -> Row:
    """The cell's row from its ranks' results: folded figures, and the status of the rank that ended it."""
    folded = fold(results)
    leader = next((x.payload for x in results if x.payload), None) or {
        "epochs": [],
        "pretrain": [],
        "env_facts": {},
        "status": "crashed",
        "error": None,
    }
    status, error = Status(leader["status"]), leader["error"]
    cause = root_cause(results)
    where = f"rank {cause.rank} of {cell.nproc}" if cause else ""
    if cause is not None and cause.payload is not None:
        status, error = Status(cause.payload["status"]), dict(cause.payload["error"] or {})
        error["message"] = f"{where}: {error.get('message', '')}"
    elif cause is not None:
        status = Status.CRASHED
        error = {
            "type": cause.death(),
            "message": f"{where}: the process died from {cause.death()}",
            "traceback": [],
        }
    measured = {**known, **folded.measured, "cell_wall_s": time.perf_counter() - started}
    # the ranks' view of the machine; this agent never touches a GPU (its ranks fork from it)
    env = leader["env_facts"] or environment.capture(cell.device, gpu=False)
    return Row.make(
        cell,
        status,
        measured,
        epochs=leader["epochs"],
        pretrain_epochs=leader["pretrain"],
        environment=env,
        error=error,
        per_rank=folded.per_rank,
    )


def main(argv: list[str] | None = None) -> int:
    """One rank of one cell, started by torchrun itself (a cell across nodes): every rank measures,
    rank 0 gathers the others' figures and appends the cell's row to RUN_DIR/results.jsonl.

        torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
            -m lorabench.run.ranks RUN_DIR '{"model": "bert-base", "method": "full", "strategy": "fsdp2"}'
    """
    import argparse
    import json
    from pathlib import Path

    from ..results.rundir import RunDir

    parser = argparse.ArgumentParser(
        prog="python -m lorabench.run.ranks", description=main.__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="where rank 0 appends the row (created if missing)")
    parser.add_argument("cell", help="the cell as JSON (Cell's fields); nproc is WORLD_SIZE")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    fields = json.loads(args.cell)
    fields["nproc"] = int(os.environ["WORLD_SIZE"])
    cell = Cell.from_dict(fields)
    group = Group.from_env(cell.strategy)
    payload = measure(cell, group)
    gathered = [None] * group.world if group.leader else None
    torch.distributed.gather_object(payload, gathered, dst=0)
    torch.distributed.destroy_process_group()
    if group.leader:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        run = RunDir(args.run_dir)
        results = [RankResult(r, p) for r, p in enumerate(gathered)]
        run.append(group_row(cell, results, known_before(cell), started).replace(run_id=run.run_id))
        print(f"rank 0: the row of {cell.model} {cell.label} is in {run.results_path}")
    return 0


def known_before(cell: Cell) -> dict[str, Any]:
    """What `lorabench run` knows of a cell before it runs, made here for a cell torchrun started:
    its survey (FLOPs, tokens, the prediction per rank) and the matmul rate of this (the leader's)
    device, measured after training so that no timed step shares the device with it."""
    from ..measure.flops import measure_matmul_flops
    from ..measure.trackers import unavailable
    from ..plan.survey import survey
    from ..workload.precision import TORCH

    s = survey(cell)
    known: dict[str, Any] = s.prediction.to_metrics()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cell.on_gpu else torch.device("cpu")
    )
    try:
        known["device_matmul_flops"] = measure_matmul_flops(
            device, TORCH[cell.compute_dtype], sorted(s.gemms)
        )["matmul_flops"]
    except Exception as e:  # noqa: BLE001 (the row says why MFU is missing)
        known["device_matmul_flops"] = unavailable(
            f"the matmul rate could not be measured: {type(e).__name__}: {e}"
        )
    return known


if __name__ == "__main__":
    raise SystemExit(main())

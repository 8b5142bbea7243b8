"""A cell of several processes: started as torchrun starts its workers, their results folded into one row.

    lorabench run --models cifar-mlp --methods full,lora --ranks 8 --nproc 2 --strategy fsdp2
    torchrun --nproc-per-node 2 -m lorabench.run.processes RUN_DIR '{"model": "bert-tiny", "method": "full"}'

The cell's own process is the agent: it hosts the group's TCPStore and forks one process per member
with the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT,
TORCHELASTIC_USE_AGENT_STORE), so each joins with `init_process_group` over env:// exactly as
under torchrun (which is how a cell spans nodes: `main`, and the README). The agent itself never
touches a device: a process forked from one that had queried CUDA could not use it
(`forksafe`). Every process runs the protocol of `experiment` on its shard of each global batch and
sends what it measured back; `results.fold` makes the row. A process that dies or raises ends the
cell, named; the others get a few seconds to report what they measured, then are killed, so a cell
never hangs on a dead peer.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import time
import uuid
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..measure.traces import Traces
from ..plan.cells import Cell
from ..results.fold import ProcessResult, row_of
from ..results.rows import Row
from ..workload.distributed import Group
from .experiment import protocol
from .train import EpochRecord

GRACE_S = 5.0  # after one process fails, how long the others get to report what they measured


def die_with_parent() -> None:
    """This process is killed when its parent ends (the thread that started it: a cell's agent, the
    fork server): a process must not outlive its agent (a killed cell takes its whole group with it)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _entry(target: Callable, env: dict[str, str], conn, args: tuple) -> None:
    die_with_parent()
    os.environ.update(env)
    try:
        target(conn, *args)
    finally:
        conn.close()


def launch(
    world: int, target: Callable, args: tuple = (), on_message: Callable[[tuple], None] | None = None
) -> list[ProcessResult]:
    """Run `target(conn, *args)` in `world` forked processes with torchrun's environment, hosting
    their store; a ("result", Measured) message is the process's result, any other goes to
    `on_message`. Returns every process's result once all have ended; after the first failure the
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
    ctx = mp.get_context("fork")  # the agent imported torch but touched no device: its processes start warm
    results = [ProcessResult(i) for i in range(world)]
    procs, conns = [], {}
    for r in range(world):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_entry,
            name=f"lorabench-process{r}",
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
                except EOFError:  # the process is gone
                    del live[c]
                    procs[r].join()
                    if results[r].measured is None:
                        results[r].exitcode = procs[r].exitcode
                        results[r].ended_at = time.monotonic()
                    continue
                if msg[0] == "result":
                    results[r].measured = msg[1]
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


def process_main(
    conn, cell_dict: dict[str, Any], sample_interval_s: float, traces: Traces | None = None
) -> None:
    """One process of a cell of several, launched by `launch`."""
    cell = Cell.from_dict(cell_dict)
    group = Group.from_env(cell.strategy)
    on_epoch = (lambda rec, total: conn.send(("epoch", vars(rec), total))) if group.leader else None
    try:
        conn.send(("result", protocol(cell, group, on_epoch, sample_interval_s, traces)))
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
    """Run a cell of `cell.nproc` processes from this one (the agent) and return its row: launch them,
    fold their figures (`results.fold`). `known`: as `experiment.execute`'s."""
    started = time.perf_counter()
    forward = (lambda msg: on_epoch(EpochRecord(**msg[1]), msg[2])) if on_epoch else None
    results = launch(
        cell.nproc, process_main, (cell.to_dict(), sample_interval_s, traces), on_message=forward
    )
    return row_of(cell, results, known or {}, started)


def main(argv: list[str] | None = None) -> int:
    """One process of one cell, started by torchrun itself (a cell across nodes): every process
    measures, the leader (RANK 0) gathers the others' results and appends the cell's row to
    RUN_DIR/results.jsonl.

        torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
            -m lorabench.run.processes RUN_DIR '{"model": "bert-base", "method": "full", "strategy": "fsdp2"}'
    """
    import argparse
    import json
    from pathlib import Path

    from ..results.rundir import RunDir

    parser = argparse.ArgumentParser(
        prog="python -m lorabench.run.processes", description=main.__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="where the leader appends the row (created if missing)")
    parser.add_argument("cell", help="the cell as JSON (Cell's fields); nproc is WORLD_SIZE")
    args = parser.parse_args(argv)
    import gc

    gc.freeze()  # the imports out of the collector's walks, as `worker.cell_main` does
    started = time.perf_counter()
    fields = json.loads(args.cell)
    fields["nproc"] = int(os.environ["WORLD_SIZE"])
    cell = Cell.from_dict(fields)
    group = Group.from_env(cell.strategy)
    measured = protocol(cell, group)
    gathered = [None] * group.world if group.leader else None
    torch.distributed.gather_object(measured, gathered, dst=0)
    torch.distributed.destroy_process_group()
    if group.leader:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        run = RunDir(args.run_dir)
        results = [ProcessResult(i, m) for i, m in enumerate(gathered)]
        run.append(row_of(cell, results, known_before(cell), started).replace(run_id=run.run_id))
        print(f"process 0: the row of {cell.model} {cell.label} is in {run.results_path}")
    return 0


def known_before(cell: Cell) -> dict[str, Any]:
    """What `lorabench run` knows of a cell before it runs, made here for a cell torchrun started:
    its survey (FLOPs, tokens, the prediction per process) and the matmul rate of this (the leader's)
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

"""A function run in a fresh process, and its answer or why none came.

    lorabench run --device cuda --precision fp32,bf16-mixed     # the device is asked in a child, never here

The parent of a run must never initialise CUDA: a context it opened would sit on GPU 0 for the
whole run (in every cell's device figures), and under EXCLUSIVE_PROCESS compute mode no cell could
open one. Whatever asks the device something (the matmul-rate calibration, whether a precision or
a quantisation runs on it) runs here, in a child started the way cells are (forkserver or spawn:
never a fork of the parent), which exits when it has answered.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
from typing import Any, Callable

import psutil

from .errors import first_line

EXIT_GRACE_S = 10.0  # how long a child that has answered may take to exit before it is killed


class ChildFailed(RuntimeError):
    """The child raised, died or did not answer in time; the message says which."""


def _entry(fn: Callable, args: tuple, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        conn.send((True, fn(*args)))
    except Exception as e:  # noqa: BLE001 (the parent gets the reason, in one line)
        conn.send((False, f"{type(e).__name__}: {first_line(e)}"))
    finally:
        conn.close()


def answer() -> bool:
    """A child that only answers: to learn that children start."""
    return True


def call(fn: Callable, args: tuple = (), *, start_method: str, timeout_s: float, name: str) -> Any:
    """`fn(*args)` (a module-level function, its result picklable) in a fresh process; ChildFailed
    with the reason when it raises, dies or takes longer than `timeout_s`."""
    ctx = mp.get_context(start_method)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_entry, args=(fn, args, send), name=name)
    proc.start()
    send.close()  # the child holds the only writer: EOF means it is gone
    try:
        if not recv.poll(timeout_s):
            raise ChildFailed(f"{name} gave no answer within {timeout_s:g} s")
        try:
            ok, value = recv.recv()
        except EOFError:
            proc.join(EXIT_GRACE_S)
            code = proc.exitcode
            how = (
                f"died from {signal.Signals(-code).name}"
                if code is not None and code < 0
                else f"exited ({code})"
            )
            raise ChildFailed(f"{name} {how} without an answer") from None
    finally:
        end_process(proc, EXIT_GRACE_S)  # kill only a hung one
        recv.close()
    if not ok:
        raise ChildFailed(f"{name} failed: {value}")
    return value


def end_process(proc, grace_s: float = 0.0) -> None:
    """Give a child `grace_s` to exit on its own (its exit handlers run), then kill it and what it
    started (the ranks of a cell of several processes); always reap it."""
    proc.join(grace_s)
    if proc.is_alive():
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        proc.kill()
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
    proc.join()

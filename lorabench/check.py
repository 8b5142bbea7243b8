"""`lorabench check`: prove the measurement stack on this machine, against figures known in advance.

    lorabench check                 # on a new machine, before trusting any figure it prints

Each check measures something whose answer is known (a buffer of a known size, a sleep of a
known length, a model whose FLOPs and saved activations have a closed form) with the very
trackers, clocks and counters a cell uses, and says whether the reading agrees. On the CPU: the
host-memory sampler against the kernel's own high-water mark, host RSS with the freed heap handed
back against a known allocation, the clock against a sleep,
FlopCounterMode and the saved-tensor hooks against closed forms, the matmul ceiling against
a timed training step (model FLOPs utilisation can only be trusted if it cannot pass 100 %), and
the step-time model's prediction against a timed step (on a GPU, its rates are recorded for later
dry runs). On a
GPU, in addition: the allocator against the driver's view of a known allocation, CUDA events
against the synchronised wall clock, the memory sampler's cost on a step, every visible device's
UUID / PCI mapping to the driver, and the energy counter advancing.
"""

from __future__ import annotations

from typing import Callable

import torch

from .gpucheck import (
    allocator_vs_driver,
    amdsmi_binding,
    device_mapping,
    energy_counter,
    energy_update,
    events_vs_wall,
    sampler_overhead,
)
from .hostcheck import (
    Check,
    clock,
    flops_closed_form,
    host_rss,
    matmul_ceiling,
    returned_heap,
    saved_tensors,
    step_time,
)


def run_checks(device: str, progress: Callable[[str], None] = lambda name: None) -> list[Check]:
    """Every check for `device` ("cpu" or "cuda"); a check that raises fails with its error."""
    dev = torch.device(device)
    todo: list[tuple[str, Callable[[], Check]]] = [
        ("host RSS sampler", host_rss),
        ("host RSS, heap handed back", returned_heap),
        ("clock", clock),
        ("FLOPs", flops_closed_form),
        ("saved activations", saved_tensors),
    ]
    if dev.type == "cuda":  # the driver check first: no CUDA context of this process exists before it
        todo += [("allocator vs driver", lambda: allocator_vs_driver(dev))]
    todo += [("matmul ceiling", lambda: matmul_ceiling(dev)), ("step time", lambda: step_time(dev))]
    if dev.type == "cuda":
        todo += [
            ("CUDA events", lambda: events_vs_wall(dev)),
            ("sampler cost", lambda: sampler_overhead(dev)),
            ("device mapping", device_mapping),
            ("energy update period", lambda: energy_update(dev)),
            ("energy counter", lambda: energy_counter(dev)),
        ]
        if torch.version.hip:
            todo += [("amdsmi binding", amdsmi_binding)]
    out = []
    for name, fn in todo:
        progress(name)
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 (a check that cannot run is a failed check, said why)
            out.append(
                Check(
                    name,
                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                    "to run",
                    False,
                )
            )
    return out

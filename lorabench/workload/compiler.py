"""torch.compile in a cell: compiled before any measured step, its compilation accounted apart.

    lorabench run --models bert-tiny --methods lora --ranks 8 --compile off,on

The model is compiled (inductor) and run for one untimed step of its own before the probe step,
so compilation lands in `compile_s`, not in a warm-up or timed step. Graph breaks are counted,
and so are graphs compiled inside the timed epochs: a recompilation there (a new shape, eval
mode) is time the timed figures hold, and the row says how many.
"""

from __future__ import annotations

import time

import torch

from .settings import switch

COMPILE = switch(
    on="torch.compile (inductor), compiled by a step of its own before any measured one",
    off="eager: every operator dispatched from Python",
)


class Compiled:
    """What torch.compile did in a cell: the first step's time (compilation in it), graph breaks,
    and graphs compiled inside timed epochs (a recompilation the warm-up did not absorb)."""

    def __init__(self):
        from torch._dynamo.utils import counters

        self.counters, self.in_timed, self._at = counters, 0, 0
        self.breaks_before = sum(counters["graph_break"].values())

    def graphs(self) -> int:
        return self.counters["stats"]["unique_graphs"]

    def first_step(self, step, device: torch.device) -> float:
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def edge(self, edge: str) -> None:
        if edge == "begin":
            self._at = self.graphs()
        else:
            self.in_timed += self.graphs() - self._at

    def result(self) -> dict[str, float]:
        return {
            "compile_graph_breaks": sum(self.counters["graph_break"].values()) - self.breaks_before,
            "compile_graphs_in_timed_epochs": self.in_timed,
        }

"""One value of a cell setting, as a registry entry: what it means, what it asks of the rest of the
cell, and whether a device must be asked before it runs it.

    lorabench list                       # every setting's values, each described by its entry

Each setting owns its registry, beside the code that gives its values meaning: `precision.PRECISIONS`,
`quantization.QUANTIZATIONS`, `optimizers.OPTIMIZERS`, `distributed.STRATEGIES`,
`checkpointing.CHECKPOINTING`, `compiler.COMPILE`, `models.WEIGHTS` (and `methods.METHODS`, the
oldest of them). `plan.cells.Cell` validates itself by asking its values' entries (`conflict`), and
code elsewhere asks an entry what a value means (`quantization.QUANTIZATIONS[q].bits`) instead of
comparing the value's spelling: a new value is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def _none(cell: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Choice:
    """A value of a setting. `requires(cell)` says why it cannot go with the rest of the cell (None:
    it can); `probe` whether a device must first be asked if it runs it (a kernel, a library);
    `on` whether a switch is on."""

    description: str
    requires: Callable[[Any], str | None] = field(default=_none, compare=False, repr=False)
    probe: bool = False
    on: bool = False

    def conflict(self, cell: Any) -> str | None:
        return self.requires(cell)


def switch(on: str, off: str) -> dict[str, Choice]:
    """A setting that is off or on, each described."""
    return {"off": Choice(off), "on": Choice(on, on=True)}


def unknown(field_name: str, value: Any, registry: dict) -> str | None:
    """The refusal of a value its registry does not hold, naming what it holds; None when it does."""
    if value in registry:
        return None
    return f"unknown {field_name} {value!r}; choose from {', '.join(sorted(str(k) for k in registry))}"

"""What one process of a cell measured: the protocol's typed result, before it becomes a row.

    lorabench run --nproc 2 ...     # each process sends its Measured; results.fold makes the row

`run.experiment.protocol` returns one; a cell of one process makes its row from it directly
(`Row.make`), a cell of several folds its processes' (`fold`). Its figures are raw: numbers,
`Unavailable` with a reason, and the descriptive strings `metrics.INFO` names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .rows import Status


@dataclass
class Measured:
    status: Status
    figures: dict[str, Any] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)  # EpochRecord dicts, warm-up included
    pretrain: list[dict[str, Any]] = field(default_factory=list)  # the base's own epochs (seed 002)
    curve: list[dict[str, Any]] = field(default_factory=list)  # train.Point dicts: quality over time
    env_facts: dict[str, Any] = field(default_factory=dict)  # the machine as this process sees it
    error: dict[str, Any] | None = None  # {type, message, traceback}

    @property
    def failed(self) -> bool:
        """Whether it ended the cell: anything but a finished or a diverged training."""
        return self.status not in (Status.OK, Status.DIVERGED)

"""Result rows: one typed Row per cell, written as one JSON line.

    lorabench report results/<run-id>      # every row of a run, read back as Row objects

A Row is the cell, its status, its metrics, its environment, an error when it failed, and its
wall time. `metrics` holds numbers only: a figure that could not be measured is `null` there and
its reason sits in `unavailable`, so `pandas.json_normalize` of a results file gives numeric
columns. Descriptive strings (the data set, the optimizer) sit in `info`, per-epoch records in
`epochs`. Derived figures (state bytes, activations above state, throughput, MFU, the
checkpoint size) are computed once, by `derive`, when the row is made; nothing recomputes them.
Every figure is declared in `metrics.METRICS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from ..measure.trackers import Unavailable
from ..plan.cells import Cell
from .metrics import BY_KEY, INFO, METRICS, is_number

SCHEMA = 2  # 1: unavailable figures were strings inside `metrics` (still read, converted on read)


class Status(str, Enum):
    OK = "ok"
    OOM = "oom"
    ERROR = "error"
    TIMEOUT = "timeout"
    CRASHED = "crashed"
    SKIPPED = "skipped"
    DIVERGED = "diverged"


@dataclass(frozen=True)
class Row:
    cell: Cell
    status: Status
    metrics: dict[str, float | int | None] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # metric key -> why it is null
    info: dict[str, str] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)  # EpochRecord dicts, warm-up included
    pretrain_epochs: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)  # quality over training time (train.Point)
    environment: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # {type, message, traceback}
    run_id: str = ""
    wall_s: float = 0.0  # the parent's view: process start to row
    # A cell of several processes: one entry per process (its peaks, the tensors it holds, its step
    # time). Beside `metrics`, not in it, so metrics stay one number per key for json_normalize.
    per_process: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.cell.key()

    @property
    def label(self) -> str:
        return self.cell.label

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @classmethod
    def make(cls, cell: Cell, status: Status, measured: dict[str, Any] | None = None, **fields) -> "Row":
        """A row from raw measurements (numbers, Unavailable, INFO strings), derived figures added."""
        metrics, missing, info = split(measured or {})
        derive(cell, metrics, missing, info)
        for key in ("epochs", "pretrain_epochs", "curve"):  # a diverged epoch's NaN loss is null in JSON
            if key in fields:
                fields[key] = [
                    {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in e.items()}
                    for e in fields[key]
                ]
        return cls(cell, Status(status), metrics, missing, {**info, **fields.pop("info", {})}, **fields)

    @classmethod
    def failure(
        cls, cell: Cell, status: Status, kind: str, message: str, measured: dict[str, Any] | None = None
    ) -> "Row":
        return cls.make(cell, status, measured, error={"type": kind, "message": message, "traceback": []})

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "run_id": self.run_id,
            "cell_key": self.key,
            "cell": self.cell.to_dict(),
            "label": self.label,
            "status": self.status.value,
            "metrics": self.metrics,
            "unavailable": self.unavailable,
            "info": self.info,
            "epochs": self.epochs,
            "pretrain_epochs": self.pretrain_epochs,
            **({"curve": self.curve} if self.curve else {}),
            "environment": self.environment,
            "error": self.error,
            "wall_s": self.wall_s,
            **({"per_process": self.per_process} if self.per_process else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Row":
        """Read a row of any schema; schema 1 (unavailable figures as strings in `metrics`, lists and
        strings beside numbers) is converted here, and its derived figures computed."""
        cell = Cell.from_dict(d["cell"])
        common = dict(
            environment=d.get("environment") or {},
            error=d.get("error"),
            run_id=d.get("run_id", ""),
            wall_s=d.get("wall_s", 0.0),
            per_process=d.get("per_process") or _renamed(d.get("per_rank")) or [],
            curve=d.get("curve") or [],
        )
        if d.get("schema", 1) >= 2:  # a figure this version no longer declares is dropped
            metrics = {k: v for k, v in d.get("metrics", {}).items() if k in BY_KEY}
            return cls(
                cell,
                Status(d["status"]),
                metrics,
                d.get("unavailable", {}),
                d.get("info", {}),
                d.get("epochs", []),
                d.get("pretrain_epochs", []),
                **common,
            )
        old = dict(d.get("metrics") or {})
        epochs, pretrain = old.pop("epochs", []), old.pop("pretrain_epochs", [])
        old.pop("epoch_s_all", None)  # the timed epochs' times: in `epochs` already
        for key, value in list(old.items()):
            if isinstance(value, str) and value.startswith("unavailable: "):
                old[key] = Unavailable(value[len("unavailable: ") :])
            elif key not in BY_KEY and key not in INFO:
                del old[key]  # a figure this version no longer declares
        return cls.make(cell, Status(d["status"]), old, epochs=epochs, pretrain_epochs=pretrain, **common)

    def replace(self, **changes) -> "Row":
        return replace(self, **changes)


def _renamed(per_rank: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Rows written before `per_process` held `per_rank`, each entry's index under "rank"."""
    return [{("process" if k == "rank" else k): v for k, v in e.items()} for e in per_rank or []]


def split(measured: dict[str, Any]) -> tuple[dict[str, float | int | None], dict[str, str], dict[str, str]]:
    """(metrics, unavailable, info) from raw measurements; a key METRICS does not declare is refused."""
    metrics: dict[str, float | int | None] = {}
    missing: dict[str, str] = {}
    info: dict[str, str] = {}
    for key, value in measured.items():
        if key in INFO:
            info[key] = str(value)
        elif key not in BY_KEY:
            raise KeyError(f"metric {key!r} is not declared in lorabench.results.metrics.METRICS")
        elif isinstance(value, Unavailable):
            metrics[key], missing[key] = None, value.reason
        elif is_number(value):
            metrics[key] = value
        else:  # NaN, infinity, None: not a measurement; say so rather than write a non-JSON number
            metrics[key], missing[key] = None, f"not a finite number ({value!r})"
    return metrics, missing, info


def derive(cell: Cell, metrics: dict[str, Any], missing: dict[str, str], info: dict[str, str]) -> None:
    """Add every derived figure that its inputs allow, in place; where an input was unavailable,
    the derived figure is too, with that reason."""
    for metric in METRICS:
        if metric.derive is None:
            continue
        value = metric.derive(metrics, cell)
        if isinstance(value, Unavailable):  # computable, but not a figure to show: the reason says why
            metrics[metric.key], missing[metric.key] = None, value.reason
        elif value is not None and is_number(value):
            metrics[metric.key] = value
            missing.pop(metric.key, None)
        else:
            why = next((f"needs {k}: {missing[k]}" for k in metric.inputs if k in missing), None)
            if why:
                metrics[metric.key], missing[metric.key] = None, why
    if is_number(metrics.get("activations_bytes")):
        info["activations_source"] = (
            "torch allocator"
            if is_number(metrics.get("torch_peak_above_baseline_bytes"))
            else "host RSS (approximate)"
        )


def final_rows(rows: list[Row]) -> list[Row]:
    """The last row of each cell, in the order cells first appear."""
    return list({r.key: r for r in rows}.values())

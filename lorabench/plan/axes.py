"""What each Cell field means outside its cell: `AXES`, the one table the CLI's matrix axes, a
cell's label, the report's grouping, titles and long-table columns, and the survey's key read, and
its views by what their readers ask (`MATRIX_FIELDS`, `TABLE_FIELDS`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Axis:
    """What a Cell field means outside its cell: the one place the CLI's matrix axes, the cell's
    label, the report's grouping, titles and long-table columns, and the survey's key read it."""

    title: str | None = (
        None  # its word in a section title and its long-table column ("seq len"); None: unnamed
    )
    matrix: bool = False  # a list of values is one more axis of a matrix (--batch-size 16,32)
    adapter: bool = False  # the adapter's own setting: a matrix leaves it out of its baseline cells
    grouped: bool = True  # cells differing in it get separate sections (False: columns of one table)
    surveyed: bool = True  # it changes what the survey builds or predicts (False: cells share one survey)
    tag: Callable[[Any], str] | None = None  # its word in the cell's label, where the value is not `quiet`
    quiet: tuple = ()  # (its default,) where the field was added after rows were first written: left out of the
    # cell's dict (and key) at that value, so older run directories resume and compare against newer ones

    def is_quiet(self, value: Any) -> bool:
        return value in self.quiet


# Every Cell field, in the order labels, titles and long-table columns list them. A new axis is one
# entry here (and its field in Cell) plus the code that gives it meaning.
AXES: dict[str, Axis] = {
    # the method and its own settings: the columns of one comparison table
    "model": Axis(),
    "method": Axis(grouped=False),
    "rank": Axis("rank", grouped=False),
    "alpha": Axis("alpha", adapter=True, grouped=False, surveyed=False),
    "dropout": Axis(adapter=True, grouped=False, surveyed=False),
    "targets": Axis("targets", adapter=True, grouped=False),
    "modules_to_save": Axis(adapter=True, grouped=False),
    "lr": Axis("lr", grouped=False, surveyed=False),
    "pretrain_epochs": Axis(grouped=False, surveyed=False),
    "repeat": Axis(grouped=False, surveyed=False),
    # the workload and how it runs: a section per value
    "seq_len": Axis("seq len", matrix=True),
    "batch_size": Axis("batch", matrix=True),
    "grad_accum": Axis(),
    "grad_checkpointing": Axis("checkpointing", matrix=True, tag=lambda v: "ckpt", quiet=("off",)),
    "precision": Axis("precision", matrix=True, tag=str, quiet=("fp32",)),
    "quantize": Axis("quantize", matrix=True, tag=str, quiet=("none",)),
    "optimizer": Axis("optimizer", matrix=True, tag=str, quiet=("adam",)),
    "compile": Axis("compile", matrix=True, surveyed=False, tag=lambda v: "compiled", quiet=("off",)),
    "dtype": Axis(),  # precision names it
    "task": Axis(),
    "weights": Axis("weights", surveyed=False),
    "data": Axis("data", surveyed=False),
    "epochs": Axis(surveyed=False),
    "warmup_epochs": Axis(surveyed=False),
    "samples": Axis(surveyed=False),
    "eval_samples": Axis(surveyed=False),
    "seed": Axis("seed", matrix=True, grouped=False, surveyed=False),
    "eval_every": Axis(surveyed=False, quiet=(0,)),
    "device": Axis(surveyed=False),
    # the processes of a cell: the scaling table's columns
    "strategy": Axis("strategy", matrix=True, grouped=False, tag=str, quiet=(None,)),
    "nproc": Axis("processes", matrix=True, grouped=False, tag=lambda n: f"n={n}", quiet=(1,)),
}
# Views of AXES by what their readers ask.
MATRIX_FIELDS = tuple(f for f, a in AXES.items() if a.matrix)  # a list of values makes one cell per value
ADAPTER_FIELDS = tuple(f for f, a in AXES.items() if a.adapter)
TABLE_FIELDS = tuple(f for f, a in AXES.items() if not a.grouped)  # may differ between one table's columns
NAMED_FIELDS = tuple(
    f for f, a in AXES.items() if a.title
)  # named in titles and the long table where they vary
SURVEYED_FIELDS = tuple(f for f, a in AXES.items() if a.surveyed)

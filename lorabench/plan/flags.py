"""How a setting is spelled on the command line and in a config's [settings] table: its flag,
help, parser and choices, carried in the dataclass field's metadata.

    lorabench run --help            # the "cell settings" flags are generated from these

`Cell` and `run.worker.RunOptions` declare their fields with `setting(...)`; the parser reads them
back with `cli_flags`, so a new setting is one field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable


def csv_list(value: str) -> tuple[str, ...]:
    """A comma-separated command-line list."""
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise ValueError("expected a comma-separated list, got nothing")
    return items


def int_list(value: str) -> tuple[int, ...]:
    """A comma-separated list of whole numbers (an axis: one cell per value)."""
    try:
        return tuple(int(v) for v in csv_list(value))
    except ValueError:
        raise ValueError(f"expected whole numbers separated by commas, got {value!r}") from None


@dataclass(frozen=True)
class Flag:
    """How a cell field is spelled on the command line."""

    flag: str  # e.g. --batch-size
    help: str = ""
    parse: Callable[[str], Any] | None = None  # argparse type
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        """The attribute argparse stores it under."""
        return self.flag[2:].replace("-", "_")


def setting(default: Any, help: str = "", *flags: Flag, parse=None, choices=None, metavar=None):
    """A cell field that the command line and a TOML [settings] table may set. Without `flags`,
    the flag is the field's name with dashes; several flags are alternatives (one may be given)."""
    return field(
        default=default,
        metadata={"flags": flags, "help": help, "parse": parse, "choices": choices, "metavar": metavar},
    )


def cli_flags(f: dataclasses.Field) -> tuple[Flag, ...]:
    """The command-line flags of a cell field (none for the matrix axes)."""
    if "help" not in f.metadata:
        return ()
    md = f.metadata
    return md["flags"] or (
        Flag("--" + f.name.replace("_", "-"), md["help"], md["parse"], md["choices"], md["metavar"]),
    )

"""The --config TOML file: a matrix and its settings as data, validated before anything runs.

    lorabench run --config matrix.toml       # preset/models/methods/ranks/repeat and a [settings] table

Flags given on the command line override what the file says (see `presets.request`).
"""

from __future__ import annotations

import sys
from typing import Any

from .cells import CELL_FIELDS, CellError, choices

# Keys a --config TOML file may hold, with their types; [settings] takes any Cell field.
CONFIG_KEYS: dict[str, tuple[type, str]] = {
    "preset": (list, "a list of preset names"),
    "models": (list, "a list of model names"),
    "methods": (list, "a list of method names"),
    "ranks": (list, "a list of whole numbers"),
    "repeat": (int, "a whole number"),
    "settings": (dict, "a table of cell settings"),
}


def load_config(path: str) -> dict[str, Any]:
    """Read and validate a TOML config (tomllib: data only, nothing executed)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # requires-python is 3.10: tomllib's own backport, a dependency there only
        import tomli as tomllib

    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        raise CellError(f"--config {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CellError(f"--config {path}: not valid TOML ({e})") from None
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise CellError(
            f"--config {path}: unknown key(s) {', '.join(unknown)}; accepted: {choices(CONFIG_KEYS)}"
        )
    for key, (kind, what) in CONFIG_KEYS.items():
        if key in config and (isinstance(config[key], bool) or not isinstance(config[key], kind)):
            raise CellError(f"--config {path}: {key} must be {what}, got {config[key]!r}")
    if "ranks" in config and not all(isinstance(r, int) and not isinstance(r, bool) for r in config["ranks"]):
        raise CellError(f"--config {path}: ranks must be a list of whole numbers, got {config['ranks']!r}")
    bad = sorted(set(config.get("settings", {})) - set(CELL_FIELDS))
    if bad:
        raise CellError(
            f"--config {path}: unknown setting(s) {', '.join(bad)}; accepted: {choices(CELL_FIELDS)}"
        )
    for key in ("model", "method", "rank", "repeat"):
        if key in config.get("settings", {}):
            raise CellError(
                f"--config {path}: {key} is an axis of the matrix, not a setting; use models/methods/ranks/repeat"
            )
    return config

"""Files every layer writes the same way.

lorabench check --device cuda      # records the runtime context with write_json
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """The user's lorabench cache: $LORABENCH_CACHE, else $XDG_CACHE_HOME/lorabench, else
    ~/.cache/lorabench (what was measured of a device, trained bases). Deleting it loses nothing a
    run cannot remake."""
    root = os.environ.get("LORABENCH_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "lorabench"
    )
    return Path(root)


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)

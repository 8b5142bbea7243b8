"""lorabench: measure what LoRA buys against full fine-tuning, cell by cell.

lorabench run        # the quick preset on the best device present
"""

import os
import sys
from pathlib import Path


def _prefer_the_amdsmi_rocm_ships() -> None:
    """Put the amdsmi binding ROCm ships ($ROCM_PATH/share/amd_smi) ahead of one installed from the
    registry: the binding calls the host's libamd_smi.so, and one made for another ROCm release can
    fail on it, taking the whole AMD driver view with it. Here, before torch: a ROCm build of torch
    imports amdsmi as it is imported (torch/cuda/__init__.py), and the first binding found stays."""
    shipped = Path(os.environ.get("ROCM_PATH") or "/opt/rocm", "share", "amd_smi")
    if "amdsmi" not in sys.modules and (shipped / "amdsmi" / "__init__.py").is_file():
        if str(shipped) not in sys.path:
            sys.path.insert(0, str(shipped))


_prefer_the_amdsmi_rocm_ships()

"""The environment a figure was measured in, recorded with every result row.

    python -c "import json, lorabench.measure.environment as e; print(json.dumps(e.capture('cpu'), indent=1))"

Captured inside the cell's own process, on the device it used, so a row is self-describing.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil
import torch

from ..forksafe import in_bad_fork

VISIBLE_DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
# Set (to 1) where a GPU must be present, as on the nightly's GPU runners: the GPU tests then fail
# instead of skipping when torch sees none (a torch build the runner's driver cannot run, say).
REQUIRE_GPU = "LORABENCH_REQUIRE_GPU"


def gpu_required() -> bool:
    return os.environ.get(REQUIRE_GPU, "") not in ("", "0")


def no_gpu_reason() -> str:
    """Why torch sees no GPU here, as far as this process can tell without initialising CUDA: the
    torch build, and what the driver (NVML) sees, which names a build the driver cannot run."""
    build = (
        f"CUDA {torch.version.cuda}"
        if torch.version.cuda
        else (f"ROCm {torch.version.hip}" if torch.version.hip else "CPU-only")
    )
    why = f"torch sees no GPU here (torch {torch.__version__}, {build} build)"
    if torch.version.hip or not torch.version.cuda:
        return why
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count, driver = pynvml.nvmlDeviceGetCount(), pynvml.nvmlSystemGetDriverVersion()
            supports = pynvml.nvmlSystemGetCudaDriverVersion_v2()  # e.g. 12040: CUDA 12.4
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 (no driver here: nothing more to say)
        return why
    if count:
        why += (
            f"; the driver sees {count} GPU(s) (driver {driver}, CUDA {supports // 1000}.{supports % 1000 // 10}): "
            "install the torch build for that CUDA (https://pytorch.org/get-started/locally/)"
        )
    return why


def installed_version() -> str:
    """lorabench's own version as installed ("unknown" when run from a checkout without installing)."""
    from importlib import metadata

    try:
        return metadata.version("lorabench")
    except metadata.PackageNotFoundError:
        return "unknown"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def project_commit() -> str:
    """The git commit of the lorabench checkout, with '+dirty' when it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def capture(device: str, index: int = 0, gpu: bool = True) -> dict[str, Any]:
    """The machine as this process sees it; on a GPU, torch device `index`'s properties (`gpu=False`
    leaves them out: a process that must not initialise CUDA)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "cpu": cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(),
        "host_memory_bytes": psutil.virtual_memory().total,
        "lorabench_commit": project_commit(),
        "device": device,
        "visible_devices": {k: os.environ[k] for k in VISIBLE_DEVICE_VARS if k in os.environ},
        # forked after its parent queried CUDA: no CUDA call can work here (lorabench/forksafe.py)
        "cuda_bad_fork": in_bad_fork(),
    }
    if device == "cuda" and gpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(index)
        env.update(
            {
                "gpu_name": props.name,
                "gpu_count": torch.cuda.device_count(),
                "gpu_memory_bytes": props.total_memory,
                "cuda_runtime": torch.version.cuda,
                "hip_runtime": torch.version.hip,
                # gfx arch on ROCm, compute capability on CUDA (where torch fills gcnArchName with the
                # card's name, so that attribute is only read on a ROCm build)
                "gpu_arch": gpu_arch(props, bool(torch.version.hip)),
            }
        )
    return env


def gpu_arch(props, rocm: bool) -> str:
    """`gfx90a` on ROCm (the part before any `:xnack-` feature flags), `sm_90` on CUDA."""
    if rocm and getattr(props, "gcnArchName", None):
        return props.gcnArchName.split(":")[0]
    return f"sm_{props.major}{props.minor}"


def free_memory_bytes(device: str) -> tuple[int | None, str]:
    """(bytes free for a cell, what was read). On a GPU the driver's view (NVML, or amdsmi on a ROCm
    build) of every GPU the run's cells may use, the least of them: this process never creates a
    CUDA context of its own (that would sit in every cell's device memory)."""
    if device == "cpu":
        return psutil.virtual_memory().available, "host memory available"
    try:
        return _amdsmi_free() if torch.version.hip else _nvml_free()
    except Exception as e:  # no driver library, or it failed: no gate, and say so
        return None, f"free GPU memory unknown ({type(e).__name__}: {e})"


def _nvml_free() -> tuple[int, str]:
    import pynvml

    from .devices import nvml_visible

    pynvml.nvmlInit()
    try:
        handles, which = nvml_visible(pynvml)
        # v1's `free` already leaves out driver-reserved memory: v1 and v2 agree on it
        free = [int(pynvml.nvmlDeviceGetMemoryInfo(h).free) for h in handles]
        return min(free), f"GPU memory free (NVML, the least of {len(free)} GPU(s): {which})"
    finally:
        pynvml.nvmlShutdown()


def _amdsmi_free() -> tuple[int, str]:
    import amdsmi

    amdsmi.amdsmi_init()
    try:
        handles = amdsmi.amdsmi_get_processor_handles()
        usage = [amdsmi.amdsmi_get_gpu_vram_usage(h) for h in handles]  # MB
        free = [(int(u["vram_total"]) - int(u["vram_used"])) * 2**20 for u in usage]
        # HIP_VISIBLE_DEVICES numbers devices as HIP does: every GPU is read, the least kept (never more)
        return min(free), f"GPU memory free (amdsmi, the least of {len(free)} GPU(s): every GPU)"
    finally:
        amdsmi.amdsmi_shut_down()


def resolve_device(requested: str, planning: bool = False) -> str:
    """`auto` -> cuda when torch sees a GPU (a ROCm build counts: HIP answers as cuda), else cpu;
    InputError for cuda where torch sees none, unless `planning` a device this machine does not
    have (a dry run against --fit-memory: nothing runs on it)."""
    from ..errors import InputError

    has_gpu = torch.cuda.is_available()
    if requested == "cuda" and not has_gpu and not planning:
        raise InputError(f"--device cuda: {no_gpu_reason()}; use --device cpu or auto")
    return ("cuda" if has_gpu else "cpu") if requested == "auto" else requested

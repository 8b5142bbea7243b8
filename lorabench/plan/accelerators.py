"""Accelerators you may not have, from their data sheets: memory, peak dense matrix rate per dtype and
memory bandwidth, so a dry run can say whether a matrix fits and how long it takes on one.

    lorabench run --dry-run --preset seed-bert --target h100

A prediction from a data sheet is a peak's: no kernel reaches its sheet's rate, and the host's
time per operator is this machine's CPU (`rates`) plus a launch each. It is labelled "from the data
sheet, not calibrated" until `lorabench check --device cuda` on that accelerator has recorded its
measured rates (`calibration`), which then win.

The dense rates (no structured sparsity) are those torch's kernels run at for each dtype: fp32
products on NVIDIA run on the CUDA cores (torch's default keeps TF32 off for matmul), on AMD
Instinct on the matrix cores; bf16 and fp16 on the tensor / matrix cores with fp32 accumulation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..measure.operators import PHASES
from ..measure.rates import Rates

TB = 1e12
GB = 1e9
# The host's time to launch one kernel, beyond the dispatch this machine measures. Not a data-sheet
# figure: a CUDA or HIP launch costs a few microseconds of host time.
LAUNCH_S = 5e-6


@dataclass(frozen=True)
class Accelerator:
    name: str  # as the data sheet names it
    names: str  # a regular expression matching torch.cuda.get_device_name for it
    memory_bytes: int
    bandwidth_bytes_s: float
    flops: dict[str, float]  # peak dense FLOP/s, by dtype
    source: str  # the data sheet

    def rates(
        self,
        op_s: dict[str, float],
        tensor_s: float,
        optimizer_s: dict[str, tuple[float, float]] | None = None,
    ) -> Rates:
        """This accelerator's rates by its data sheet, with a host's time per operator and per
        trained tensor (`rates.host`: this machine's CPU, which would dispatch its operators) plus a
        launch each."""
        return Rates(
            device=self.name,
            source=f"from the data sheet ({self.source}), not calibrated",
            matmul_flops=dict(self.flops),
            bandwidth_bytes_s=self.bandwidth_bytes_s,
            in_place_bytes_s=self.bandwidth_bytes_s,
            random_per_s=self.bandwidth_bytes_s / 4,  # a draw is an fp32 written: bandwidth-bound
            first_touch_bytes_s=None,
            op_s={p: s + (LAUNCH_S if p in PHASES else 0.0) for p, s in op_s.items()},
            tensor_s=tensor_s,
            asynchronous=True,
            optimizer_s=dict(optimizer_s or {}),
        )

    def matches(self, device_name: str) -> bool:
        return re.search(self.names, device_name, re.IGNORECASE) is not None


def _rates(fp32: float, half: float) -> dict[str, float]:
    return {"float32": fp32 * TB, "bfloat16": half * TB, "float16": half * TB}


ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): FP32 67 TFLOPS, BF16/FP16 1,979 with sparsity
    # (989.4 dense), HBM3 80 GB at 3.35 TB/s.
    "h100": Accelerator(
        "NVIDIA H100 SXM 80GB",
        r"H100(?!.*PCIe)",
        80 * GB,
        3.35 * TB,
        _rates(67, 989.4),
        "NVIDIA H100 datasheet, SXM",
    ),
    # The same datasheet, PCIe: FP32 51 TFLOPS, BF16/FP16 756 dense, HBM2e 80 GB at 2 TB/s.
    "h100-pcie": Accelerator(
        "NVIDIA H100 PCIe 80GB",
        r"H100.*PCIe",
        80 * GB,
        2.0 * TB,
        _rates(51, 756),
        "NVIDIA H100 datasheet, PCIe",
    ),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): the H100's compute, HBM3e 141 GB at 4.8 TB/s.
    "h200": Accelerator(
        "NVIDIA H200 SXM 141GB", r"H200", 141 * GB, 4.8 * TB, _rates(67, 989.4), "NVIDIA H200 datasheet, SXM"
    ),
    # NVIDIA A100 Tensor Core GPU datasheet: FP32 19.5 TFLOPS, BF16/FP16 312 dense; 40 GB HBM2 at
    # 1,555 GB/s, 80 GB HBM2e at 2,039 GB/s (SXM).
    "a100-40gb": Accelerator(
        "NVIDIA A100 40GB",
        r"A100.*40GB",
        40 * GB,
        1555 * GB,
        _rates(19.5, 312),
        "NVIDIA A100 datasheet, SXM 40GB",
    ),
    "a100-80gb": Accelerator(
        "NVIDIA A100 80GB",
        r"A100.*80GB",
        80 * GB,
        2039 * GB,
        _rates(19.5, 312),
        "NVIDIA A100 datasheet, SXM 80GB",
    ),
    # NVIDIA L4 datasheet: FP32 30.3 TFLOPS, BF16/FP16 242 with sparsity (121 dense), 24 GB GDDR6 at 300 GB/s.
    "l4": Accelerator("NVIDIA L4", r"\bL4\b", 24 * GB, 300 * GB, _rates(30.3, 121), "NVIDIA L4 datasheet"),
    # NVIDIA L40S datasheet: FP32 91.6 TFLOPS, BF16/FP16 with FP32 accumulate 362.05 dense (733 with
    # sparsity), 48 GB GDDR6 at 864 GB/s.
    "l40s": Accelerator(
        "NVIDIA L40S", r"L40S", 48 * GB, 864 * GB, _rates(91.6, 362.05), "NVIDIA L40S datasheet"
    ),
    # NVIDIA Ada Lovelace GPU architecture whitepaper (GeForce RTX 4090): FP32 82.6 TFLOPS, FP16/BF16
    # tensor with FP32 accumulate 165.2 dense, 24 GB GDDR6X at 1,008 GB/s.
    "rtx4090": Accelerator(
        "NVIDIA GeForce RTX 4090",
        r"RTX 4090",
        24 * GB,
        1008 * GB,
        _rates(82.6, 165.2),
        "NVIDIA Ada Lovelace whitepaper",
    ),
    # AMD Instinct MI300X datasheet: FP32 matrix 163.4 TFLOPS, BF16/FP16 1,307.4 dense, 192 GB HBM3 at 5.3 TB/s.
    "mi300x": Accelerator(
        "AMD Instinct MI300X",
        r"MI300X",
        192 * GB,
        5.3 * TB,
        _rates(163.4, 1307.4),
        "AMD Instinct MI300X datasheet",
    ),
    # AMD Instinct MI250X datasheet: FP32 matrix 95.7 TFLOPS, BF16/FP16 383, 128 GB HBM2e at 3.2 TB/s,
    # over two graphics compute dies that torch sees as two devices: one device is half of each.
    "mi250x": Accelerator(
        "AMD Instinct MI250X (one GCD)",
        r"MI250",
        64 * GB,
        1.6 * TB,
        _rates(95.7 / 2, 383 / 2),
        "AMD Instinct MI250X datasheet, halved per GCD",
    ),
}


def find(name: str) -> Accelerator:
    """The accelerator `--target NAME` names (KeyError, listing them, where none is)."""
    key = name.lower().replace(" ", "").replace("_", "-")
    if key not in ACCELERATORS:
        raise KeyError(name)
    return ACCELERATORS[key]

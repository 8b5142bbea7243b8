"""Result rows: one typed Row per cell, and the one table of metrics every figure is declared in.

    lorabench list --metrics        # prints METRICS: key, unit, label, exact or noisy, compare's gate

A Row is the cell, its status, its metrics, its environment, an error when it failed, and its
wall time. `metrics` holds numbers only: a figure that could not be measured is `null` there and
its reason sits in `unavailable`, so `pandas.json_normalize` of a results file gives numeric
columns. Descriptive strings (the data set, the optimizer) sit in `info`, per-epoch records in
`epochs`. Derived figures (state bytes, activations above state, throughput, MFU, the
checkpoint size) are computed once, by `derive`, when the row is made; nothing recomputes them.

Adding a metric is one entry in METRICS: the report's comparison rows, compare's gates and
exact checks, and the README's table of figures all read it. A key not declared there is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable

from ..measure.trackers import Unavailable
from ..plan.cells import Cell

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
class Metric:
    key: str
    unit: str  # bytes, s, count, %, samples/s, J, FLOP, FLOP/s, tensors, output units
    label: str  # the row of the report (and the README's description)
    fmt: str = "num"  # how report.py formats it (a key of report.FORMATS)
    exact: bool = False  # deterministic for an identical cell: compare calls out any change
    gate: str | None = None  # compare gates on it: "time", "memory" or "quality"
    worse: int = +1  # +1: higher is worse; -1: lower is worse
    shown: bool = True  # a row of the comparison table
    derive: Callable[[dict[str, Any], Cell], float | Unavailable | None] | None = None  # from other metrics
    inputs: tuple[str, ...] = ()  # what `derive` reads (a reason for a missing input carries over)
    # A cell of several processes (`ranks.fold`): how the ranks' figures make the row's.
    # "leader": rank 0's; "max": the max over ranks (per device: what must fit; the slowest rank's
    # time); "devices": summed over the distinct devices the ranks used (a device's own counter).
    fold: str = "leader"
    sum_of: str | None = None  # this figure is the sum over ranks of that one ("all devices")
    per_rank: bool = False  # each rank's value is kept in the row's `per_rank`


def _all(m: dict[str, Any], *keys: str) -> bool:
    return all(is_number(m.get(k)) for k in keys)


def _activations(m, cell):
    """The peak above weights and data, less gradients and optimizer state: activations and the
    backward pass's temporaries. The allocator's peak on a GPU, sampled host RSS on the CPU."""
    peak = m.get("torch_peak_above_baseline_bytes")
    if not is_number(peak):
        peak = m.get("host_peak_above_baseline_bytes")
    if not (is_number(peak) and _all(m, "grads_bytes", "optimizer_state_bytes")):
        return None
    return max(peak - m["grads_bytes"] - m["optimizer_state_bytes"], 0)


def _utilisation(flops_key: str):
    """Counted FLOPs per step (`flops_key`) / median step time / the matmul ceiling measured on the
    model's own GEMM shapes. Above 100 % it is not a utilisation but a sign that the ceiling or the
    step time is wrong, so it is not shown as one."""
    return lambda m, cell: _rate(m, cell, flops_key)


def _rate(m, cell, flops_key: str):
    if not _all(m, flops_key, "step_s_p50", "device_matmul_flops") or m["step_s_p50"] <= 0:
        return None
    if cell.nproc > 1 and cell.device == "cpu":
        return Unavailable(
            "the ranks share this CPU's cores: there is no per-rank matmul ceiling to divide by"
        )
    mfu = 100.0 * m[flops_key] / m["step_s_p50"] / (m["device_matmul_flops"] * cell.nproc)
    if mfu > 100.0:
        return Unavailable(
            f"measurement problem: {mfu:.0f} % of the calibrated matmul rate "
            f"({m['device_matmul_flops'] / 1e9:,.1f} GFLOP/s) is impossible; the ceiling was measured "
            "below what this model's GEMMs reach, or the step time is too short to trust"
        )
    return mfu


_B, _C = "bytes", "count"
METRICS: tuple[Metric, ...] = (
    # shown in the comparison table, in this order
    Metric("params_trainable", _C, "trainable parameters", "count", exact=True),
    Metric(
        "params_trainable_adapter",
        _C,
        "  of which adapters (LoRA's A, B; each method's own)",
        "count",
        exact=True,
    ),
    Metric(
        "params_trainable_full", _C, "  of which trained in full (heads, saved modules)", "count", exact=True
    ),
    Metric(
        "params_trainable_pct",
        "%",
        "trainable % of total",
        "pct",
        inputs=("params_trainable", "params_total"),
        derive=lambda m, c: (
            100.0 * m["params_trainable"] / m["params_total"]
            if _all(m, "params_trainable", "params_total") and m["params_total"]
            else None
        ),
    ),
    Metric("params_total", _C, "total parameters", "count", exact=True),
    Metric(
        "torch_peak_allocated_bytes",
        _B,
        "peak torch allocated (MiB, framework, max over ranks)",
        "bytes",
        gate="memory",
        fold="max",
        per_rank=True,
    ),
    Metric(
        "torch_peak_allocated_sum_bytes",
        _B,
        "peak torch allocated, all devices: sum over ranks (MiB)",
        "bytes",
        sum_of="torch_peak_allocated_bytes",
    ),
    Metric(
        "torch_peak_reserved_bytes",
        _B,
        "peak torch reserved (MiB, framework)",
        "bytes",
        gate="memory",
        fold="max",
    ),
    Metric(
        "torch_peak_above_baseline_bytes",
        _B,
        "peak torch allocated above weights+data (MiB)",
        "bytes",
        fold="max",
    ),
    Metric(
        "nvml_process_peak_bytes",
        _B,
        "peak GPU memory of the cell's process and those it started (MiB, NVML: "
        "driver, CUDA context included, max over ranks)",
        "bytes",
        gate="memory",
        fold="max",
        per_rank=True,
    ),
    Metric(
        "nvml_process_peak_sum_bytes",
        _B,
        "peak GPU memory, all devices: sum over ranks (MiB, NVML)",
        "bytes",
        sum_of="nvml_process_peak_bytes",
    ),
    Metric(
        "nvml_device_used_peak_bytes",
        _B,
        "peak GPU memory used on the device (MiB, NVML: every process, max over the cell's devices)",
        "bytes",
        fold="max",
        per_rank=True,
    ),
    Metric(
        "nvml_device_used_before_bytes",
        _B,
        "GPU memory used before the cell (MiB, NVML: others' load, driver-reserved left out; max over the cell's "
        "devices)",
        "bytes",
        fold="max",
        per_rank=True,
    ),
    Metric(
        "amdsmi_process_peak_bytes",
        _B,
        "peak VRAM of the cell's process and those it started (MiB, amdsmi: driver, max over ranks)",
        "bytes",
        gate="memory",
        fold="max",
        per_rank=True,
    ),
    Metric(
        "amdsmi_process_peak_sum_bytes",
        _B,
        "peak VRAM, all devices: sum over ranks (MiB, amdsmi)",
        "bytes",
        sum_of="amdsmi_process_peak_bytes",
    ),
    Metric(
        "amdsmi_device_vram_used_peak_bytes",
        _B,
        "peak VRAM used on the device (MiB, amdsmi: every process, max over the cell's devices)",
        "bytes",
        fold="max",
        per_rank=True,
    ),
    Metric(
        "gpu_context_bytes",
        _B,
        "GPU runtime context (MiB, driver view less torch reserved, max over ranks)",
        "bytes",
        fold="max",
    ),
    Metric(
        "host_peak_rss_bytes",
        _B,
        "peak host RSS of the cell process (MiB, max over ranks)",
        "bytes",
        gate="memory",
        fold="max",
        per_rank=True,
    ),
    Metric(
        "host_peak_rss_sum_bytes",
        _B,
        "peak host RSS, all ranks: sum (MiB)",
        "bytes",
        sum_of="host_peak_rss_bytes",
    ),
    Metric(
        "host_peak_above_baseline_bytes", _B, "host RSS peak above weights+data (MiB)", "bytes", fold="max"
    ),
    Metric(
        "state_bytes",
        _B,
        "weights + grads + optimizer state (MiB, tensor sum)",
        "bytes",
        inputs=("weights_bytes", "grads_bytes", "optimizer_state_bytes"),
        derive=lambda m, c: (
            m["weights_bytes"] + m["grads_bytes"] + m["optimizer_state_bytes"]
            if _all(m, "weights_bytes", "grads_bytes", "optimizer_state_bytes")
            else None
        ),
    ),
    Metric(
        "activations_saved_bytes",
        _B,
        "activations saved for backward (MiB, saved-tensor hooks)",
        "bytes",
        exact=True,
        fold="max",
    ),
    Metric(
        "activations_bytes",
        _B,
        "activations + temporaries (MiB, peak less weights, grads, optimizer state)",
        "bytes",
        derive=_activations,
        inputs=("grads_bytes", "optimizer_state_bytes"),
    ),
    Metric(
        "epoch_s",
        "s",
        "epoch time (s, median of timed epochs)",
        "time",
        gate="time",
        fold="max",
        per_rank=True,
    ),
    Metric("step_s_p50", "s", "step time p50 (ms)", "ms", gate="time", fold="max", per_rank=True),
    Metric("step_s_p90", "s", "step time p90 (ms)", "ms", fold="max"),
    # not gated: it is step_s_p50 again (batch / its median), and compare gates that once
    Metric(
        "samples_per_s",
        "samples/s",
        "throughput (samples/s)",
        "rate",
        worse=-1,
        inputs=("step_s_p50",),  # samples of one optimizer step / its median time
        derive=lambda m, c: (
            c.batch_size * c.grad_accum * c.nproc / m["step_s_p50"]
            if is_number(m.get("step_s_p50")) and m["step_s_p50"] > 0
            else None
        ),
    ),
    Metric(
        "tokens_per_s",
        "tokens/s",
        "throughput (tokens/s; samples for the image MLP)",
        "rate",
        inputs=("tokens_per_step", "step_s_p50"),
        derive=lambda m, c: (
            m["tokens_per_step"] / m["step_s_p50"]
            if _all(m, "tokens_per_step", "step_s_p50") and m["step_s_p50"] > 0
            else None
        ),
    ),
    Metric(
        "mfu_pct",
        "%",
        "model FLOPs utilisation (% of the measured matmul rate)",
        "pct",
        derive=_utilisation("flops_per_step"),
        inputs=("flops_per_step", "step_s_p50", "device_matmul_flops"),
    ),
    Metric(
        "hfu_pct",
        "%",
        "hardware FLOPs utilisation (% of the measured matmul rate; recomputation counted)",
        "pct",
        derive=_utilisation("hardware_flops_per_step"),
        inputs=("hardware_flops_per_step", "step_s_p50", "device_matmul_flops"),
    ),
    Metric(
        "energy_j_per_epoch",
        "J",
        "energy per timed epoch (J, each device's own counter, summed over the cell's devices)",
        "joules",
        fold="devices",
        per_rank=True,
    ),
    Metric("compile_s", "s", "torch.compile: its first step, compilation included (s, untimed)", "time"),
    Metric("compile_graph_breaks", _C, "torch.compile: graph breaks", "count"),
    Metric(
        "compile_graphs_in_timed_epochs",
        _C,
        "torch.compile: graphs compiled inside the timed epochs (0: none in the timed figures)",
        "count",
    ),
    Metric("final_eval_accuracy", "fraction", "final eval accuracy", "acc", gate="quality", worse=-1),
    Metric("final_eval_loss", "nats", "final eval loss", "loss"),
    Metric(
        "checkpoint_bytes",
        _B,
        "checkpoint to store (full model / adapter file)",
        "size",
        inputs=("model_file_bytes",),  # the adapter file beside the base, or the whole model
        derive=lambda m, c: (
            m["adapter_file_bytes"]
            if is_number(m.get("adapter_file_bytes"))
            else m.get("model_file_bytes")
            if is_number(m.get("model_file_bytes"))
            else None
        ),
    ),
    Metric(
        "predicted_total_bytes",
        _B,
        "predicted: weights+grads+optimizer+activations (MiB, per device)",
        "bytes",
    ),
    Metric(
        "predicted_peak_bytes",
        _B,
        "predicted peak: a simulated step on fake tensors (MiB, per device; the closed form where it cannot be "
        "simulated: `predicted_peak_by` says which)",
        "bytes",
    ),
    *(
        Metric(
            f"predicted_peak_{kind}_bytes", _B, f"predicted peak, of which {what} (MiB)", "bytes", shown=False
        )
        for kind, what in (
            ("weights_frozen", "frozen weights"),
            ("weights_trainable", "trainable weights"),
            ("gradients", "gradients"),
            ("optimizer", "optimizer state"),
            ("activations", "what the forward made that is live (activations)"),
            ("temporaries", "what the backward and the optimizer step made, less gradients and state"),
        )
    ),
    Metric(
        "host_tensors_peak_bytes",
        _B,
        "CPU: torch tensors live at the peak of one training step after the timed region, counted by a dispatch "
        "mode (framework level; weights and optimizer state included, the data set not; one process or an FSDP2 "
        "rank's shards, max over ranks) (MiB)",
        "bytes",
        fold="max",
    ),
    Metric(
        "host_rss_step_peak_bytes",
        _B,
        "CPU: host RSS at the peak of that step, the C library's freed heap handed back around every operator "
        "(malloc_trim): the tensors it started with (weights, optimizer state) plus the kernel's RSS high-water mark "
        "above its start (device level without the heap's retention; max over ranks) (MiB)",
        "bytes",
        fold="max",
    ),
    Metric(
        "predicted_over_measured",
        "x",
        "predicted / measured peak (x; measured at the framework level: the allocator's peak on a GPU, the live "
        "tensors' peak on the CPU): how far to trust the next prediction",
        "num",
        inputs=("predicted_total_bytes",),
        derive=lambda m, c: _prediction_error(m),
    ),
    Metric(
        "predicted_over_host_peak",
        "x",
        "predicted peak / host RSS peak (x; weights + RSS above them, the CPU's device level: the C library's "
        "heap keeps freed memory, so this sits below 1)",
        "num",
        inputs=("predicted_total_bytes", "host_peak_above_baseline_bytes"),
        derive=lambda m, c: _over(_predicted(m), _host_peak(m)),
        shown=False,
    ),
    Metric(
        "predicted_over_host_step_peak",
        "x",
        "predicted peak / host RSS peak of one step with the freed heap handed back (x; the CPU's device level, "
        "weights and optimizer state included)",
        "num",
        inputs=("predicted_total_bytes", "host_rss_step_peak_bytes"),
        derive=lambda m, c: _over(_predicted(m), m.get("host_rss_step_peak_bytes")),
        shown=False,
    ),
    Metric(
        "check_merged_vs_adapter_max_abs_diff",
        "output units",
        "check: merged vs adapter outputs, max abs diff",
        "sci",
    ),
    Metric(
        "check_adapter_off_vs_base_max_abs_diff",
        "output units",
        "check: adapter off vs base outputs, max abs diff",
        "sci",
    ),
    Metric(
        "check_ranks_first_loss_abs_diff",
        "nats",
        "check: first global batch's loss, ranks' mean vs one process (eval mode, before any step), abs diff",
        "sci",
    ),
    Metric(
        "check_ranks_params_max_abs_diff",
        "weight units",
        "check: every rank's parameters vs rank 0's after the first step (DDP), max abs diff",
        "sci",
    ),
    # kept in every row, not shown in the comparison table
    Metric(
        "check_adapter_on_vs_base_max_abs_diff",
        "output units",
        "check: adapter on vs base outputs (how far training moved them), max abs diff",
        "sci",
        shown=False,
    ),
    Metric("lora_targets", _C, "Linear modules adapted", "count", exact=True, shown=False),
    Metric(
        "model_file_bytes",
        _B,
        "full model as a checkpoint (weights and buffers)",
        "size",
        exact=True,
        shown=False,
    ),
    Metric("adapter_file_bytes", _B, "adapter as a safetensors file", "size", exact=True, shown=False),
    Metric(
        "weights_bytes",
        _B,
        "weights, every parameter (tensor sum)",
        "bytes",
        exact=True,
        shown=False,
        fold="max",
        per_rank=True,
    ),
    Metric(
        "trainable_weights_bytes",
        _B,
        "trainable weights (tensor sum)",
        "bytes",
        exact=True,
        shown=False,
        fold="max",
    ),
    Metric(
        "grads_bytes",
        _B,
        "gradients after the first backward (tensor sum)",
        "bytes",
        exact=True,
        shown=False,
        fold="max",
        per_rank=True,
    ),
    Metric(
        "optimizer_state_bytes",
        _B,
        "optimizer state after the first step (tensor sum; paged state included)",
        "bytes",
        exact=True,
        shown=False,
        fold="max",
        per_rank=True,
    ),
    Metric(
        "activations_saved_tensors",
        "tensors",
        "storages autograd keeps for backward",
        "count",
        shown=False,
        fold="max",
    ),
    Metric(
        "torch_allocated_baseline_bytes",
        _B,
        "torch allocated once weights and data were placed",
        "bytes",
        shown=False,
        fold="max",
    ),
    Metric(
        "torch_allocated_after_first_backward_bytes",
        _B,
        "torch allocated after the first backward",
        "bytes",
        shown=False,
        fold="max",
    ),
    Metric(
        "torch_allocated_after_first_step_bytes",
        _B,
        "torch allocated after the first optimizer step",
        "bytes",
        shown=False,
        fold="max",
    ),
    Metric(
        "amdsmi_device_vram_used_before_bytes",
        _B,
        "VRAM used before the cell (amdsmi: others' load)",
        "bytes",
        shown=False,
        fold="max",
        per_rank=True,
    ),
    Metric(
        "host_rss_baseline_bytes",
        _B,
        "host RSS once weights and data were placed",
        "bytes",
        shown=False,
        fold="max",
    ),
    Metric(
        "host_maxrss_bytes",
        _B,
        "the kernel's RSS high-water mark of the cell process (imports included)",
        "bytes",
        shown=False,
        fold="max",
    ),
    Metric("epoch_s_stdev_pct", "%", "spread of the timed epochs (stdev, % of mean)", "pct", shown=False),
    Metric("step_s_stdev_pct", "%", "spread of the timed steps (stdev, % of mean)", "pct", shown=False),
    Metric("steps_per_epoch", _C, "optimizer steps per epoch", "count", shown=False),
    Metric(
        "samples_per_step",
        _C,
        "samples per optimizer step, all processes: the global batch (batch per process "
        "x grad_accum x processes)",
        "count",
        shown=False,
    ),
    Metric(
        "cell_wall_s",
        "s",
        "the cell's whole life in its process (build, data, train, checks)",
        "time",
        shown=False,
        fold="max",
    ),
    Metric("predicted_weights_bytes", _B, "predicted weights", "bytes", shown=False),
    Metric("predicted_grads_bytes", _B, "predicted gradients", "bytes", shown=False),
    Metric("predicted_optimizer_bytes", _B, "predicted optimizer state", "bytes", shown=False),
    Metric(
        "predicted_activations_bytes", _B, "predicted activations saved for backward", "bytes", shown=False
    ),
    Metric(
        "predicted_comm_bytes",
        _B,
        "predicted buffers of the strategy: DDP's gradient buckets, or the FSDP2 units "
        "gathered at once (the root's and twice the largest block's)",
        "bytes",
        shown=False,
    ),
    Metric(
        "flops_per_step",
        "FLOP",
        "model FLOPs per optimizer step (matmuls of forward + backward, counted by "
        "torch FlopCounterMode; no recomputation; the optimizer's elementwise update not included): what MFU divides",
        "num",
        shown=False,
        exact=True,
    ),
    Metric(
        "hardware_flops_per_step",
        "FLOP",
        "FLOPs the device runs per optimizer step: the model's, plus the "
        "forward gradient checkpointing recomputes: what HFU divides",
        "num",
        shown=False,
        exact=True,
    ),
    Metric("tokens_per_step", _C, "tokens (or samples) per optimizer step", "count", shown=False),
    Metric(
        "device_matmul_flops",
        "FLOP/s",
        "best matmul rate measured at the start of the run, in the cell's dtype, on "
        "the model's own GEMM shapes and a square one",
        "num",
        shown=False,
    ),
    Metric(
        "achieved_flops",
        "FLOP/s",
        "counted FLOPs per step / median step time",
        "num",
        shown=False,
        inputs=("flops_per_step", "step_s_p50"),
        derive=lambda m, c: (
            m["flops_per_step"] / m["step_s_p50"]
            if _all(m, "flops_per_step", "step_s_p50") and m["step_s_p50"] > 0
            else None
        ),
    ),
)
BY_KEY: dict[str, Metric] = {m.key: m for m in METRICS}
# Descriptive facts of a row, strings: where they are kept instead of `metrics`.
INFO = (
    "data",
    "optimizer",
    "activations_source",
    "energy_source",
    "profile_trace",
    "memory_snapshot",
    "timeline",
    "predicted_peak_by",
    "predicted_attention",
)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Row:
    cell: Cell
    status: Status
    metrics: dict[str, float | int | None] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # metric key -> why it is null
    info: dict[str, str] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)  # EpochRecord dicts, warm-up included
    pretrain_epochs: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # {type, message, traceback}
    run_id: str = ""
    wall_s: float = 0.0  # the parent's view: process start to row
    # A cell of several processes: one entry per rank (its peaks, the tensors it holds, its step
    # time). Beside `metrics`, not in it, so metrics stay one number per key for json_normalize.
    per_rank: list[dict[str, Any]] = field(default_factory=list)

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
        for key in ("epochs", "pretrain_epochs"):  # a diverged epoch's NaN loss is null in JSON
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
            "environment": self.environment,
            "error": self.error,
            "wall_s": self.wall_s,
            **({"per_rank": self.per_rank} if self.per_rank else {}),
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
            per_rank=d.get("per_rank") or [],
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


def split(measured: dict[str, Any]) -> tuple[dict[str, float | int | None], dict[str, str], dict[str, str]]:
    """(metrics, unavailable, info) from raw measurements; a key METRICS does not declare is refused."""
    metrics: dict[str, float | int | None] = {}
    missing: dict[str, str] = {}
    info: dict[str, str] = {}
    for key, value in measured.items():
        if key in INFO:
            info[key] = str(value)
        elif key not in BY_KEY:
            raise KeyError(f"metric {key!r} is not declared in lorabench.results.rows.METRICS")
        elif isinstance(value, Unavailable):
            metrics[key], missing[key] = None, value.reason
        elif is_number(value):
            metrics[key] = value
        else:  # NaN, infinity, None: not a measurement; say so rather than write a non-JSON number
            metrics[key], missing[key] = None, f"not a finite number ({value!r})"
    return metrics, missing, info


def _predicted(m: dict[str, Any]) -> float | None:
    """The predicted peak: the simulated one, or the closed form's total in rows made before it."""
    for key in ("predicted_peak_bytes", "predicted_total_bytes"):
        if is_number(m.get(key)):
            return m[key]
    return None


def _host_peak(m: dict[str, Any]) -> float | None:
    """Weights plus the host RSS peak above the baseline (the interpreter and libraries left out)."""
    return (
        m["weights_bytes"] + m["host_peak_above_baseline_bytes"]
        if _all(m, "weights_bytes", "host_peak_above_baseline_bytes")
        else None
    )


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _prediction_error(m: dict[str, Any]) -> float | None:
    """Predicted peak over the measured peak it predicts, at the framework level: the allocator's
    peak on a GPU, the live tensors' on the CPU; in rows made before the CPU had that figure, the
    weights plus the host RSS peak above the baseline."""
    framework = framework_peak(m)
    return _over(_predicted(m), framework if framework is not None else _host_peak(m))


def framework_peak(m: dict[str, Any]) -> float | None:
    """The measured peak at the framework level: the allocator's on a GPU, the live tensors' on the CPU."""
    return next(
        (m[k] for k in ("torch_peak_allocated_bytes", "host_tensors_peak_bytes") if is_number(m.get(k))), None
    )


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

"""The one table of figures: every metric a result row may hold, its unit, label, definition, how
it is compared and folded across ranks, and how a derived one is computed.

    lorabench list --metrics        # prints METRICS: key, unit, label, exact or noisy, compare's gate

Adding a metric is one entry here: the report's comparison rows, compare's gates and exact checks,
the ranks' fold and docs/metrics.md (its definition) all read it. A key not declared here is
refused when a row is made (`rows.split`). A label is a name and its unit, short enough for a
table's first column; what the figure is, exactly, is its `definition`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..measure.trackers import Unavailable
from ..plan.cells import Cell


@dataclass(frozen=True)
class Metric:
    key: str
    unit: str  # bytes, s, count, %, samples/s, J, FLOP, FLOP/s, tensors, output units
    label: str  # the row of the report: a name and its unit, at most 60 characters
    fmt: str = "num"  # how report.py formats it (a key of render.tables.FORMATS)
    exact: bool = False  # deterministic for an identical cell: compare calls out any change
    gate: str | None = None  # compare gates on it: "time", "memory" or "quality"
    worse: int = +1  # +1: higher is worse; -1: lower is worse
    shown: bool = True  # a row of the comparison table
    derive: Callable[[dict[str, Any], Cell], float | Unavailable | None] | None = None  # from other metrics
    inputs: tuple[str, ...] = ()  # what `derive` reads (a reason for a missing input carries over)
    # A cell of several processes (`fold`): how the processes' figures make the row's.
    # "leader": rank 0's; "max": the max over ranks (per device: what must fit; the slowest rank's
    # time); "devices": summed over the distinct devices the ranks used (a device's own counter).
    fold: str = "leader"
    sum_of: str | None = None  # this figure is the sum over ranks of that one ("all devices")
    per_process: bool = False  # each process's value is kept in the row's `per_process`
    definition: str = ""  # what the figure is, exactly: docs/metrics.md, and notes under a report's table


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
    if cell.nproc > 1 and not cell.on_gpu:
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
    Metric(
        "params_trainable",
        _C,
        "trainable parameters",
        "count",
        exact=True,
        definition="Parameters with requires_grad, counted on the meta device before the run and on the built model.",
    ),
    Metric(
        "params_trainable_adapter",
        _C,
        "  of which adapters",
        "count",
        exact=True,
        definition="Trainable parameters the method adds: LoRA's A and B, each other method's own.",
    ),
    Metric(
        "params_trainable_full",
        _C,
        "  of which trained in full",
        "count",
        exact=True,
        definition="Trainable parameters of modules trained in full beside the adapters: classification heads, `modules_to_save`.",
    ),
    Metric(
        "params_trainable_pct",
        "%",
        "trainable (% of total)",
        "pct",
        inputs=("params_trainable", "params_total"),
        derive=lambda m, c: (
            100.0 * m["params_trainable"] / m["params_total"]
            if _all(m, "params_trainable", "params_total") and m["params_total"]
            else None
        ),
        definition="Trainable parameters as a percentage of all parameters.",
    ),
    Metric(
        "params_total",
        _C,
        "total parameters",
        "count",
        exact=True,
        definition="Every parameter of the model as trained, adapters included.",
    ),
    Metric(
        "torch_peak_allocated_bytes",
        _B,
        "peak torch allocated (MiB)",
        "bytes",
        gate="memory",
        fold="max",
        per_process=True,
        definition="torch's caching allocator: the peak of allocated bytes over the timed region (framework level); max over the ranks of a cell of several processes.",
    ),
    Metric(
        "torch_peak_allocated_sum_bytes",
        _B,
        "peak torch allocated, all devices (MiB)",
        "bytes",
        sum_of="torch_peak_allocated_bytes",
        definition="The sum over ranks of peak torch allocated: what the cell costs on all its devices.",
    ),
    Metric(
        "torch_peak_reserved_bytes",
        _B,
        "peak torch reserved (MiB)",
        "bytes",
        gate="memory",
        fold="max",
        definition="torch's caching allocator: the peak of reserved bytes (allocated plus cached free blocks) over the timed region.",
    ),
    Metric(
        "torch_peak_above_baseline_bytes",
        _B,
        "peak torch allocated above weights+data (MiB)",
        "bytes",
        fold="max",
        definition="Peak torch allocated less the bytes allocated once weights and data were in place.",
    ),
    Metric(
        "nvml_process_peak_bytes",
        _B,
        "peak GPU memory of the process, NVML (MiB)",
        "bytes",
        gate="memory",
        fold="max",
        per_process=True,
        definition="Peak GPU memory of the cell's process and those it started (MiB, NVML: driver, CUDA context included, max over ranks).",
    ),
    Metric(
        "nvml_process_peak_sum_bytes",
        _B,
        "peak GPU memory, all devices, NVML (MiB)",
        "bytes",
        sum_of="nvml_process_peak_bytes",
        definition="The sum over ranks of NVML's process peak.",
    ),
    Metric(
        "nvml_device_used_peak_bytes",
        _B,
        "peak GPU memory used on the device, NVML (MiB)",
        "bytes",
        fold="max",
        per_process=True,
        definition="Peak GPU memory used on the device (MiB, NVML: every process, max over the cell's devices).",
    ),
    Metric(
        "nvml_device_used_before_bytes",
        _B,
        "GPU memory used before the cell, NVML (MiB)",
        "bytes",
        fold="max",
        per_process=True,
        definition="GPU memory used before the cell (MiB, NVML: others' load, driver-reserved left out; max over the cell's devices).",
    ),
    Metric(
        "amdsmi_process_peak_bytes",
        _B,
        "peak VRAM of the process, amdsmi (MiB)",
        "bytes",
        gate="memory",
        fold="max",
        per_process=True,
        definition="Peak VRAM of the cell's process and those it started (MiB, amdsmi: driver, max over ranks).",
    ),
    Metric(
        "amdsmi_process_peak_sum_bytes",
        _B,
        "peak VRAM, all devices, amdsmi (MiB)",
        "bytes",
        sum_of="amdsmi_process_peak_bytes",
        definition="The sum over ranks of amdsmi's process peak.",
    ),
    Metric(
        "amdsmi_device_vram_used_peak_bytes",
        _B,
        "peak VRAM used on the device, amdsmi (MiB)",
        "bytes",
        fold="max",
        per_process=True,
        definition="Peak VRAM used on the device (MiB, amdsmi: every process, max over the cell's devices).",
    ),
    Metric(
        "gpu_context_bytes",
        _B,
        "GPU runtime context (MiB)",
        "bytes",
        fold="max",
        definition="GPU runtime context (MiB, driver view less torch reserved, max over ranks).",
    ),
    Metric(
        "host_peak_rss_bytes",
        _B,
        "peak host RSS (MiB)",
        "bytes",
        gate="memory",
        fold="max",
        per_process=True,
        definition="Peak host RSS of the cell process (MiB, max over ranks).",
    ),
    Metric(
        "host_peak_rss_sum_bytes",
        _B,
        "peak host RSS, all ranks (MiB)",
        "bytes",
        sum_of="host_peak_rss_bytes",
        definition="The sum over ranks of peak host RSS.",
    ),
    Metric(
        "host_peak_above_baseline_bytes",
        _B,
        "host RSS peak above weights+data (MiB)",
        "bytes",
        fold="max",
        definition="Peak host RSS less the reading taken once weights and data were in place.",
    ),
    Metric(
        "state_bytes",
        _B,
        "weights + grads + optimizer state (MiB)",
        "bytes",
        inputs=("weights_bytes", "grads_bytes", "optimizer_state_bytes"),
        derive=lambda m, c: (
            m["weights_bytes"] + m["grads_bytes"] + m["optimizer_state_bytes"]
            if _all(m, "weights_bytes", "grads_bytes", "optimizer_state_bytes")
            else None
        ),
        definition="Weights + gradients + optimizer state, the tensors themselves (16 bytes per trainable fp32 parameter with Adam, 4 per frozen one).",
    ),
    Metric(
        "activations_saved_bytes",
        _B,
        "activations saved for backward (MiB)",
        "bytes",
        exact=True,
        fold="max",
        definition="What autograd keeps from the first forward (saved-tensor hooks, parameters and the resident data left out), exact on every device.",
    ),
    Metric(
        "activations_bytes",
        _B,
        "activations + temporaries (MiB)",
        "bytes",
        derive=_activations,
        inputs=("grads_bytes", "optimizer_state_bytes"),
        definition="Activations + temporaries (MiB, peak less weights, grads, optimizer state).",
    ),
    Metric(
        "epoch_s",
        "s",
        "epoch time (s)",
        "time",
        gate="time",
        fold="max",
        per_process=True,
        definition="Wall time of a timed epoch, the device synchronised at both ends; the median of the timed epochs.",
    ),
    Metric(
        "step_s_p50",
        "s",
        "step time p50 (ms)",
        "ms",
        gate="time",
        fold="max",
        per_process=True,
        definition="Median time of one optimizer step (CUDA events on a GPU).",
    ),
    Metric(
        "step_s_p90",
        "s",
        "step time p90 (ms)",
        "ms",
        fold="max",
        definition="90th percentile of the optimizer step time.",
    ),
    Metric(
        "predicted_step_s",
        "s",
        "predicted step (ms)",
        "ms",
        definition="The step time predicted from the simulated step's operators and the rates measured in the cell's own process before its timed region (docs/time.md).",
    ),
    Metric(
        "predicted_over_measured_step",
        "x",
        "predicted / measured step (x)",
        "num",
        inputs=("predicted_step_s", "step_s_p50"),
        derive=lambda m, c: (
            _over(m.get("predicted_step_s"), m.get("step_s_p50"))
            if _all(m, "predicted_step_s", "step_s_p50")
            else None
        ),
        definition="Predicted step time / the median measured step time (x; 1 is exact).",
    ),
    Metric(
        "dry_run_step_s",
        "s",
        "dry run's step (ms)",
        "ms",
        shown=False,
        definition="The step time the plan predicted before any cell ran, with the rates the dry run had (measured then, recorded, or a data sheet's: `dry_run_rates`).",
    ),
    Metric(
        "dry_run_epoch_s",
        "s",
        "dry run's epoch (s)",
        "time",
        shown=False,
        definition="The plan's predicted training time of one epoch (steps per epoch x its predicted step).",
    ),
    Metric(
        "dry_run_cell_s",
        "s",
        "dry run's cell (s)",
        "time",
        shown=False,
        definition="The plan's predicted time of the cell's training steps, probe steps and evaluations (not its process start, build or data).",
    ),
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
        definition="Samples of one optimizer step (every process) / the median step time.",
    ),
    Metric(
        "tokens_per_s",
        "tokens/s",
        "throughput (tokens/s)",
        "rate",
        inputs=("tokens_per_step", "step_s_p50"),
        derive=lambda m, c: (
            m["tokens_per_step"] / m["step_s_p50"]
            if _all(m, "tokens_per_step", "step_s_p50") and m["step_s_p50"] > 0
            else None
        ),
        definition="Tokens of one optimizer step / the median step time; samples for the image MLP.",
    ),
    Metric(
        "mfu_pct",
        "%",
        "model FLOPs utilisation (%)",
        "pct",
        derive=_utilisation("flops_per_step"),
        inputs=("flops_per_step", "step_s_p50", "device_matmul_flops"),
        definition="Counted model FLOPs per step / median step time / the matmul rate measured on this device in the cell's dtype; above 100 % it is reported unavailable as a measurement problem.",
    ),
    Metric(
        "hfu_pct",
        "%",
        "hardware FLOPs utilisation (%)",
        "pct",
        derive=_utilisation("hardware_flops_per_step"),
        inputs=("hardware_flops_per_step", "step_s_p50", "device_matmul_flops"),
        definition="As MFU, with the forward that gradient checkpointing recomputes counted.",
    ),
    Metric(
        "energy_j_per_epoch",
        "J",
        "energy per timed epoch (J)",
        "joules",
        fold="devices",
        per_process=True,
        definition="Energy per timed epoch (J, each device's own counter, summed over the cell's devices).",
    ),
    Metric(
        "compile_s",
        "s",
        "torch.compile: first step (s)",
        "time",
        definition="Torch.compile: its first step, compilation included (s, untimed).",
    ),
    Metric(
        "compile_graph_breaks",
        _C,
        "torch.compile: graph breaks",
        "count",
        definition="Graph breaks torch.compile reported while compiling.",
    ),
    Metric(
        "compile_graphs_in_timed_epochs",
        _C,
        "torch.compile: graphs compiled while timed",
        "count",
        definition="Torch.compile: graphs compiled inside the timed epochs (0: none in the timed figures).",
    ),
    Metric(
        "final_eval_accuracy",
        "fraction",
        "final eval accuracy",
        "acc",
        gate="quality",
        worse=-1,
        definition="Accuracy on the eval set after the last epoch.",
    ),
    Metric(
        "final_eval_loss",
        "nats",
        "final eval loss",
        "loss",
        definition="Loss on the eval set after the last epoch.",
    ),
    Metric(
        "forgetting_pt",
        "pt",
        "source task forgotten (accuracy points)",
        "pt",
        gate=None,
        inputs=("source_accuracy_before", "source_accuracy_after"),
        derive=lambda m, c: (
            (m["source_accuracy_before"] - m["source_accuracy_after"]) * 100
            if _all(m, "source_accuracy_before", "source_accuracy_after")
            else None
        ),
        definition="Accuracy points the model lost on its base's source task while it learned the target "
        "(a trained base, `--weights trained`): source accuracy before adaptation less after it, the "
        "adapter on. Negative: it got better at the source task too.",
    ),
    Metric(
        "source_accuracy_before",
        "fraction",
        "source task accuracy, before",
        "acc",
        shown=False,
        definition="The trained base's accuracy on its source task's eval set, before the method was applied.",
    ),
    Metric(
        "source_accuracy_after",
        "fraction",
        "source task accuracy, after",
        "acc",
        shown=False,
        definition="Accuracy on the source task's eval set after training on the target, the adapter on.",
    ),
    Metric(
        "source_loss_before",
        "nats",
        "source task loss, before",
        "loss",
        shown=False,
        definition="The trained base's loss on its source task's eval set, before the method was applied.",
    ),
    Metric(
        "source_loss_after",
        "nats",
        "source task loss, after",
        "loss",
        shown=False,
        definition="Loss on the source task's eval set after training on the target, the adapter on.",
    ),
    Metric(
        "eval_s",
        "s",
        "time spent evaluating (s)",
        "time",
        shown=False,
        definition="Seconds spent in evaluations during training (after each epoch, and every --eval-every "
        "steps): timed between two synchronisations and left out of every epoch, step and curve time.",
    ),
    Metric(
        "base_made_s",
        "s",
        "time to make the trained base (s)",
        "time",
        shown=False,
        definition="Seconds this cell spent training the base it starts from on the task's source data "
        "(only the first cell of a model that finds none cached), untimed, before everything else.",
    ),
    Metric(
        "checkpoint_bytes",
        _B,
        "checkpoint to store",
        "size",
        inputs=("model_file_bytes",),  # the adapter file beside the base, or the whole model
        derive=lambda m, c: (
            m["adapter_file_bytes"]
            if is_number(m.get("adapter_file_bytes"))
            else m.get("model_file_bytes")
            if is_number(m.get("model_file_bytes"))
            else None
        ),
        definition="What must be stored after training: the adapter file beside the base for an adapter method, the whole model for full fine-tuning.",
    ),
    Metric(
        "predicted_total_bytes",
        _B,
        "predicted, closed form (MiB)",
        "bytes",
        definition="Predicted: weights+grads+optimizer+activations (MiB, per device).",
    ),
    Metric(
        "predicted_peak_bytes",
        _B,
        "predicted peak (MiB)",
        "bytes",
        definition="Predicted peak: a simulated step on fake tensors (MiB, per device; the closed form where it cannot be simulated: `predicted_peak_by` says which).",
    ),
    *(
        Metric(
            f"predicted_peak_{kind}_bytes",
            _B,
            f"predicted peak: {name} (MiB)",
            "bytes",
            shown=False,
            definition=f"Of the predicted peak: {what}.",
        )
        for kind, name, what in (
            ("weights_frozen", "frozen weights", "frozen weights"),
            ("weights_trainable", "trainable weights", "trainable weights"),
            ("gradients", "gradients", "gradients"),
            ("optimizer", "optimizer state", "optimizer state"),
            ("activations", "activations", "what the forward made that is live (activations)"),
            (
                "temporaries",
                "temporaries",
                "what the backward and the optimizer step made, less gradients and state",
            ),
        )
    ),
    Metric(
        "host_tensors_peak_bytes",
        _B,
        "CPU: live tensors at the peak of a step (MiB)",
        "bytes",
        fold="max",
        definition="CPU: torch tensors live at the peak of one training step after the timed region, counted by a dispatch mode (framework level; weights and optimizer state included, the data set not; one process or an FSDP2 rank's shards, max over ranks) (MiB).",
    ),
    Metric(
        "host_rss_step_peak_bytes",
        _B,
        "CPU: host RSS of a step, freed heap returned (MiB)",
        "bytes",
        fold="max",
        definition="CPU: host RSS at the peak of that step, the C library's freed heap handed back around every operator (malloc_trim): the tensors it started with (weights, optimizer state) plus the kernel's RSS high-water mark above its start (device level without the heap's retention; max over ranks) (MiB).",
    ),
    Metric(
        "predicted_over_measured",
        "x",
        "predicted / measured peak (x)",
        "num",
        inputs=("predicted_total_bytes",),
        derive=lambda m, c: _prediction_error(m),
        definition="Predicted / measured peak (x; measured at the framework level: the allocator's peak on a GPU, the live tensors' peak on the CPU): how far to trust the next prediction.",
    ),
    Metric(
        "predicted_over_host_peak",
        "x",
        "predicted / host RSS peak (x)",
        "num",
        inputs=("predicted_total_bytes", "host_peak_above_baseline_bytes"),
        derive=lambda m, c: _over(_predicted(m), _host_peak(m)),
        shown=False,
        definition="Predicted peak / host RSS peak (x; weights + RSS above them, the CPU's device level: the C library's heap keeps freed memory, so this sits below 1).",
    ),
    Metric(
        "predicted_over_host_step_peak",
        "x",
        "predicted / host RSS of a step (x)",
        "num",
        inputs=("predicted_total_bytes", "host_rss_step_peak_bytes"),
        derive=lambda m, c: _over(_predicted(m), m.get("host_rss_step_peak_bytes")),
        shown=False,
        definition="Predicted peak / host RSS peak of one step with the freed heap handed back (x; the CPU's device level, weights and optimizer state included).",
    ),
    Metric(
        "check_merged_vs_adapter_max_abs_diff",
        "output units",
        "check: merged vs adapter outputs (max abs diff)",
        "sci",
        definition="Largest difference between the outputs of the merged model and the model with its adapter on, after training.",
    ),
    Metric(
        "check_adapter_off_vs_base_max_abs_diff",
        "output units",
        "check: adapter off vs base outputs (max abs diff)",
        "sci",
        definition="Largest difference between the outputs with the adapter off and the base before training: the base must be untouched.",
    ),
    Metric(
        "check_ranks_first_loss_abs_diff",
        "nats",
        "check: ranks vs one process, first loss (abs diff)",
        "sci",
        definition="Check: first global batch's loss, ranks' mean vs one process (eval mode, before any step), abs diff.",
    ),
    Metric(
        "check_ranks_params_max_abs_diff",
        "weight units",
        "check: ranks agree after a step (max abs diff)",
        "sci",
        definition="Check: every rank's parameters vs rank 0's after the first step (DDP), max abs diff.",
    ),
    # kept in every row, not shown in the comparison table
    Metric(
        "check_adapter_on_vs_base_max_abs_diff",
        "output units",
        "check: adapter on vs base outputs (max abs diff)",
        "sci",
        shown=False,
        definition="Check: adapter on vs base outputs (how far training moved them), max abs diff.",
    ),
    Metric(
        "lora_targets",
        _C,
        "modules adapted",
        "count",
        exact=True,
        shown=False,
        definition="How many modules the method adapted.",
    ),
    Metric(
        "model_file_bytes",
        _B,
        "full model as a checkpoint",
        "size",
        exact=True,
        shown=False,
        definition="Size of the whole model saved as a checkpoint (weights and buffers).",
    ),
    Metric(
        "adapter_file_bytes",
        _B,
        "adapter as a safetensors file",
        "size",
        exact=True,
        shown=False,
        definition="Size of the adapter saved as a safetensors file.",
    ),
    Metric(
        "weights_bytes",
        _B,
        "weights (MiB)",
        "bytes",
        exact=True,
        shown=False,
        fold="max",
        per_process=True,
        definition="Every parameter as held on the device (tensor sum; a quantised weight with its scales).",
    ),
    Metric(
        "trainable_weights_bytes",
        _B,
        "trainable weights (MiB)",
        "bytes",
        exact=True,
        shown=False,
        fold="max",
        definition="Trainable parameters (tensor sum).",
    ),
    Metric(
        "grads_bytes",
        _B,
        "gradients (MiB)",
        "bytes",
        exact=True,
        shown=False,
        fold="max",
        per_process=True,
        definition="Gradients after the first backward (tensor sum).",
    ),
    Metric(
        "optimizer_state_bytes",
        _B,
        "optimizer state (MiB)",
        "bytes",
        exact=True,
        shown=False,
        fold="max",
        per_process=True,
        definition="Optimizer state after the first step (tensor sum; paged state included).",
    ),
    Metric(
        "activations_saved_tensors",
        "tensors",
        "storages saved for backward",
        "count",
        shown=False,
        fold="max",
        definition="How many storages autograd kept for backward in the first forward.",
    ),
    Metric(
        "torch_allocated_baseline_bytes",
        _B,
        "torch allocated, weights and data placed (MiB)",
        "bytes",
        shown=False,
        fold="max",
        definition="torch allocated once weights and data were placed.",
    ),
    Metric(
        "torch_allocated_after_first_backward_bytes",
        _B,
        "torch allocated after the first backward (MiB)",
        "bytes",
        shown=False,
        fold="max",
        definition="torch allocated after the first backward: weights, data and gradients.",
    ),
    Metric(
        "torch_allocated_after_first_step_bytes",
        _B,
        "torch allocated after the first step (MiB)",
        "bytes",
        shown=False,
        fold="max",
        definition="torch allocated after the first optimizer step: gradients freed, optimizer state allocated.",
    ),
    Metric(
        "amdsmi_device_vram_used_before_bytes",
        _B,
        "VRAM used before the cell, amdsmi (MiB)",
        "bytes",
        shown=False,
        fold="max",
        per_process=True,
        definition="VRAM used before the cell (amdsmi: others' load).",
    ),
    Metric(
        "host_rss_baseline_bytes",
        _B,
        "host RSS, weights and data placed (MiB)",
        "bytes",
        shown=False,
        fold="max",
        definition="Host RSS once weights and data were placed.",
    ),
    Metric(
        "host_maxrss_bytes",
        _B,
        "host RSS high-water mark (MiB)",
        "bytes",
        shown=False,
        fold="max",
        definition="The kernel's RSS high-water mark of the cell process (imports included).",
    ),
    Metric(
        "epoch_s_stdev_pct",
        "%",
        "spread of the timed epochs (%)",
        "pct",
        shown=False,
        definition="Standard deviation of the timed epochs, % of their mean.",
    ),
    Metric(
        "step_s_stdev_pct",
        "%",
        "spread of the timed steps (%)",
        "pct",
        shown=False,
        definition="Standard deviation of the timed steps, % of their mean.",
    ),
    Metric(
        "steps_per_epoch",
        _C,
        "optimizer steps per epoch",
        "count",
        shown=False,
        definition="Optimizer steps in one epoch.",
    ),
    Metric(
        "samples_per_step",
        _C,
        "samples per optimizer step",
        "count",
        shown=False,
        definition="Samples per optimizer step, all processes: the global batch (batch per process x grad_accum x processes).",
    ),
    Metric(
        "cell_wall_s",
        "s",
        "cell wall time (s)",
        "time",
        shown=False,
        fold="max",
        definition="The cell's whole life in its process (build, data, train, checks).",
    ),
    Metric(
        "predicted_weights_bytes",
        _B,
        "predicted weights (MiB)",
        "bytes",
        shown=False,
        definition="Closed form: bytes of every parameter.",
    ),
    Metric(
        "predicted_grads_bytes",
        _B,
        "predicted gradients (MiB)",
        "bytes",
        shown=False,
        definition="Closed form: bytes of the gradients of the trainable parameters.",
    ),
    Metric(
        "predicted_optimizer_bytes",
        _B,
        "predicted optimizer state (MiB)",
        "bytes",
        shown=False,
        definition="Closed form: the optimizer's state.",
    ),
    Metric(
        "predicted_activations_bytes",
        _B,
        "predicted saved activations (MiB)",
        "bytes",
        shown=False,
        definition="Closed form: activations saved for backward.",
    ),
    Metric(
        "predicted_comm_bytes",
        _B,
        "predicted strategy buffers (MiB)",
        "bytes",
        shown=False,
        definition="Predicted buffers of the strategy: DDP's gradient buckets, or the FSDP2 units gathered at once (the root's and twice the largest block's).",
    ),
    Metric(
        "flops_per_step",
        "FLOP",
        "model FLOPs per step",
        "num",
        shown=False,
        exact=True,
        definition="Model FLOPs per optimizer step (matmuls of forward + backward, counted by torch FlopCounterMode; no recomputation; the optimizer's elementwise update not included): what MFU divides.",
    ),
    Metric(
        "hardware_flops_per_step",
        "FLOP",
        "hardware FLOPs per step",
        "num",
        shown=False,
        exact=True,
        definition="FLOPs the device runs per optimizer step: the model's, plus the forward gradient checkpointing recomputes: what HFU divides.",
    ),
    Metric(
        "tokens_per_step",
        _C,
        "tokens per step",
        "count",
        shown=False,
        definition="Tokens (samples for the image MLP) of one optimizer step, every process.",
    ),
    Metric(
        "device_matmul_flops",
        "FLOP/s",
        "measured matmul rate (FLOP/s)",
        "num",
        shown=False,
        definition="Best matmul rate measured at the start of the run, in the cell's dtype, on the model's own GEMM shapes and a square one.",
    ),
    Metric(
        "achieved_flops",
        "FLOP/s",
        "achieved FLOP/s",
        "num",
        shown=False,
        inputs=("flops_per_step", "step_s_p50"),
        derive=lambda m, c: (
            m["flops_per_step"] / m["step_s_p50"]
            if _all(m, "flops_per_step", "step_s_p50") and m["step_s_p50"] > 0
            else None
        ),
        definition="Counted FLOPs per step / median step time.",
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
    "base",
    "predicted_step_by",
    "dry_run_rates",
)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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

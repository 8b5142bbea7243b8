"""The dry run's page: every cell of the plan with its exact parameter counts, its predicted peak
and what holds it, its FLOPs and its predicted step and cell time, and the matrix's predicted
duration.

    lorabench run --dry-run --preset seed-bert      # nothing trained, nothing written
"""

from __future__ import annotations

import pandas as pd

from .tables import fmt, markdown

# The simulated peak's parts, as the plan table abbreviates them.
PEAK_PARTS = {
    "weights_frozen": "frozen",
    "weights_trainable": "trainable",
    "gradients": "grads",
    "optimizer": "optimizer",
    "activations": "activations",
    "temporaries": "temporaries",
}


def peak_parts(pred) -> str:
    """'frozen 16.8 + trainable 0.1 + ...' (MiB) of a simulated peak; how it was predicted otherwise."""
    sim = pred.simulated
    if sim is None or not hasattr(sim, "at_peak"):
        return pred.peak_by
    parts = [
        f"{short} {fmt(sim.at_peak[k], 'bytes')}" for k, short in PEAK_PARTS.items() if sim.at_peak.get(k)
    ]
    if pred.comm_bytes:
        parts.append(f"buffers {fmt(pred.comm_bytes, 'bytes')}")
    return " + ".join(parts)


def plan_table(cells, surveys, skipped: dict[str, str] | None = None) -> str:
    """The dry-run plan: every cell with its exact parameter counts and predicted need."""
    counts = [s.params for s in surveys]
    df = pd.DataFrame(
        {
            "#": list(range(1, len(cells) + 1)),
            "model": [c.model for c in cells],
            "method": [c.label for c in cells],
            "trainable": [fmt(p.trainable, "count") for p in counts],
            "adapters": [fmt(p.adapter, "count") for p in counts],
            "trained in full": [fmt(p.full_trained, "count") for p in counts],
            "total": [fmt(p.total, "count") for p in counts],
            "trainable %": [f"{p.trainable_pct:.3f}%" for p in counts],
            "predicted peak (MiB)": [fmt(s.prediction.peak_bytes, "bytes") for s in surveys],
            "what holds the peak (MiB)": [peak_parts(s.prediction) for s in surveys],
            "GFLOP/step": [
                f"{s.prediction.flops_per_step / 1e9:,.2f}"
                if s.prediction.flops_per_step is not None
                else "unavailable"
                for s in surveys
            ],
            "step (ms)": [_predicted_time(s.duration, "step") for s in surveys],
            "cell (s)": [_predicted_time(s.duration, "cell") for s in surveys],
            # per process x micro-batches, "on" N processes: together, the global batch of a step
            "seq len": [str(c.seq_len) for c in cells],
            "batch": [
                f"{c.batch_size}"
                + (f"x{c.grad_accum}" if c.grad_accum > 1 else "")
                + (f" on {c.nproc}" if c.nproc > 1 else "")
                for c in cells
            ],
            "samples": [c.samples for c in cells],
            "epochs (warm-up+timed)": [f"{c.warmup_epochs}+{c.epochs}" for c in cells],
            "device": [c.device + (" (skipped)" if skipped and c.key() in skipped else "") for c in cells],
        }
    )
    return markdown(
        df,
        [
            "#",
            "trainable",
            "adapters",
            "trained in full",
            "total",
            "trainable %",
            "predicted peak (MiB)",
            "GFLOP/step",
            "step (ms)",
            "cell (s)",
            "seq len",
            "batch",
            "samples",
        ],
    )


def _predicted_time(duration, which: str) -> str:
    """A cell's predicted step (ms) or whole time (s), or "unavailable" (the reason is in the row)."""
    if not hasattr(duration, "cell_s"):
        return "unavailable" if duration is not None else ""
    return f"{duration.step.seconds * 1e3:,.1f}" if which == "step" else f"{duration.cell_s:,.1f}"


def plan_time(plan) -> str:
    """The dry run's last words on time: the matrix's predicted duration and what it rests on."""
    total = plan.predicted_s()
    rates = plan.rates
    if rates is None:
        return ""
    if not hasattr(rates, "device"):
        return f"No time predicted: {rates.reason}."
    if total is None:
        return f"Predicted with the rates of {rates.device} ({rates.source}); some cells have no time (see the table)."
    return (
        f"Predicted: {_duration(total)} of training and evaluation on {rates.device} ({rates.source}); "
        "process start, model builds and data loading come on top."
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"

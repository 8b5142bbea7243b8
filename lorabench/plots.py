"""Plots for the report: matplotlib figures written as PNG beside the markdown.

    lorabench report results/<run-id>       # a rank sweep draws report/<run-id>/<model>-...-rank-sweep.png
"""
from __future__ import annotations

from .rows import is_number

MiB = 2 ** 20


def rank_sweep_plot(model: str, ok: list, path, memory: tuple[str, str]) -> None:
    """Peak memory, epoch time and final accuracy against rank, full fine-tuning as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")   # no display: render to a file
    import matplotlib.pyplot as plt

    mem_key, mem_label = memory
    panels = [(mem_key, mem_label, 1 / MiB), ("epoch_s", "epoch time (s)", 1.0),
              ("final_eval_accuracy", "final eval accuracy", 1.0)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    full = next((v for v in ok if v.cell.is_baseline), None)
    for ax, (key, label, scale) in zip(axes, panels):
        for method in sorted({v.cell.method for v in ok if not v.cell.is_baseline}):
            pts = sorted((v.cell.rank, v.metrics[key] * scale) for v in ok
                         if v.cell.method == method and is_number(v.metrics.get(key)))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        if full is not None and is_number(full.metrics.get(key)):
            ax.axhline(full.metrics[key] * scale, linestyle="--", color="black", label=f"{full.label} fine-tuning")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: LoRA rank sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



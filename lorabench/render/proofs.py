"""The markdown summary of `lorabench proof` (proof.md), from its proof.json alone.

lorabench proof results/gpu-proof --dry-run && cat results/gpu-proof/proof.md
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from .tables import markdown

MiB = 2**20


def _figure(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key.endswith("_bytes"):
        return f"{value / MiB:,.1f} MiB"
    if key.endswith("_s") or key.endswith("_s_p50"):
        return f"{value:.4g} s"
    if "_over_" in key:  # a ratio: three significant digits
        return f"{value:#.3g}"
    return f"{value:.3g}" if isinstance(value, float) else f"{value:,}"


def _cells(step: dict) -> list[str]:
    """The cells a step ran: their figures, n/a where a figure is unavailable, and the reasons below."""
    rows = step["figures"].get("cells", [])
    if not rows:
        return []
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("cell", "unavailable")]
    df = pd.DataFrame(
        {"cell": [r["cell"] for r in rows], **{k: [_figure(k, r.get(k, "n/a")) for r in rows] for k in keys}}
    )
    reasons = {f"{k}: {why}" for r in rows for k, why in r.get("unavailable", {}).items()}
    return [
        f"`{step['figures']['command']}` (run: {step['figures'].get('run')})",
        "",
        markdown(df),
        "",
        *(f"- n/a {reason}" for reason in sorted(reasons)),
        "",
    ]


def proof_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    device = env.get("gpu_name") or env.get("cpu")
    verdict = "every step ok" if data["ok"] else "a step FAILED"
    out = [
        f"# lorabench proof on {device} ({data['device']}{', dry run' if data['dry_run'] else ''}): {verdict}",
        "",
        f"torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, HIP {env.get('hip_runtime')}, "
        f"lorabench {env.get('lorabench_commit')}. Every figure is in proof.json beside this page.",
        "",
        markdown(
            pd.DataFrame(
                {
                    "step": [s["name"] for s in data["steps"]],
                    "status": [s["status"] for s in data["steps"]],
                    "seconds": [f"{s['seconds']:.1f}" for s in data["steps"]],
                }
            )
        ),
        "",
    ]
    for step in data["steps"]:
        out += [f"## {step['name']}: {step['status']}", ""]
        figures = step["figures"]
        if step["name"] == "check":
            df = pd.DataFrame(
                {
                    "check": list(figures),
                    "measured": [f["measured"] for f in figures.values()],
                    "verdict": ["pass" if f["ok"] else "FAIL" for f in figures.values()],
                }
            )
            out += [markdown(df), ""]
        elif "cells" in figures:
            out += _cells(step)
        elif step["name"] == "gpu tests":
            out += [f"{figures.get('summary', '')}", ""]
            out += [f"- {name}: {outcome}" for name, outcome in figures.get("tests", {}).items()] + [""]
        else:
            for key, value in figures.items():
                if isinstance(value, dict):
                    out.append(f"- {key}: " + ", ".join(f"{k} {_figure(k, v)}" for k, v in value.items()))
                else:
                    out.append(f"- {key}: {_figure(key, value)}")
            out.append("")
        if step["status"] == "failed" and step["detail"]:
            out += ["```", step["detail"].strip()[-1500:], "```", ""]
        elif step["status"] == "skipped":
            out += [step["detail"], ""]
    return "\n".join(out)

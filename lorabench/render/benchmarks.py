"""pytest-benchmark results (`--benchmark-json`) as lorabench's markdown table.

lorabench report --pytest-benchmark bench.json -o bench.md
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .tables import fmt, markdown


def load_pytest_benchmark(path: Path) -> dict[str, Any]:
    """A pytest-benchmark JSON (`--benchmark-json`); InputError when the file is not one."""
    from ..errors import InputError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        benchmarks = data["benchmarks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--pytest-benchmark {path}: not a pytest-benchmark JSON ({e})") from None
    if not isinstance(benchmarks, list):
        raise InputError(f"--pytest-benchmark {path}: 'benchmarks' is not a list")
    return data


def pytest_benchmark_report(data: dict[str, Any]) -> str:
    """Render a pytest-benchmark JSON (`--benchmark-json`) as the same kind of markdown table."""
    machine = data.get("machine_info", {})
    out = [
        "# lorabench: pytest-benchmark results",
        "",
        f"{len(data.get('benchmarks', []))} benchmarks, saved {data.get('datetime', '?')}, "
        f"on {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
        f"Python {machine.get('python_version', '?')}.",
        "",
    ]
    rows = []
    for b in data.get("benchmarks", []):
        st, info = b.get("stats", {}), b.get("extra_info", {})
        cell = info.get("cell", {})
        rows.append(
            {
                "benchmark": b.get("name", ""),
                "group": b.get("group") or "",
                "model": cell.get("model", info.get("model", "")),
                "method": info.get("label", cell.get("method", "")),
                "trainable": fmt(info.get("params_trainable"), "count")
                if info.get("params_trainable") is not None
                else "",
                "min (ms)": f"{st['min'] * 1e3:.2f}" if "min" in st else "",
                "median (ms)": f"{st['median'] * 1e3:.2f}" if "median" in st else "",
                "mean (ms)": f"{st['mean'] * 1e3:.2f}" if "mean" in st else "",
                "stddev (ms)": f"{st['stddev'] * 1e3:.2f}" if "stddev" in st else "",
                "rounds": st.get("rounds", ""),
                "peak memory (MiB)": fmt(info.get("peak_memory_bytes"), "bytes")
                if info.get("peak_memory_bytes")
                else "",
            }
        )
    if rows:
        df = pd.DataFrame(rows)
        out += [
            markdown(
                df,
                [
                    "trainable",
                    "min (ms)",
                    "median (ms)",
                    "mean (ms)",
                    "stddev (ms)",
                    "rounds",
                    "peak memory (MiB)",
                ],
            ),
            "",
        ]
    return "\n".join(out)

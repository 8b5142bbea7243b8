"""The short texts of `lorabench list` (what can be run, every figure a row holds) and `lorabench
check` (what was proved).

    lorabench list [--metrics]
    lorabench check --device cpu
"""

from __future__ import annotations

import pandas as pd

from ..plan.cells import Cell
from ..results.metrics import METRICS
from .tables import markdown


def registries() -> str:
    """`lorabench list`: models with their exact parameter counts, methods, presets."""
    from ..plan.presets import PRESETS
    from ..plan.survey import survey
    from ..workload.methods import BASELINE, METHODS
    from ..workload.models import MODELS

    out = ["models:"]
    for name, builder in MODELS.items():
        total = survey(Cell(model=name, method=BASELINE), simulate=False).params.total
        out.append(f"  {name:14s} {total:>15,} parameters  {(builder.__doc__ or '').strip().splitlines()[0]}")
    from ..workload.zoo import ARCHITECTURES, SIZES

    out.append(
        f"  {'<size>-<arch>':14s} the zoo, configurations made in code (random weights): size {', '.join(SIZES)}; "
        f"arch {', '.join(ARCHITECTURES)}"
    )
    out += ["  hf:<dir|id>    any transformers model for sequence classification or causal LM", "methods:"]
    out += [f"  {name:14s} {m.description}" for name, m in METHODS.items()]
    out.append(
        "  peft:<path>    any method PEFT knows, as an adapter_config.json (or its folder) sets it; its "
        "target_modules win, its rank is its own (no --ranks)"
    )
    import dataclasses

    from ..plan.axes import MATRIX_FIELDS
    from ..plan.flags import cli_flags

    out.append("axes (a comma-separated list of values makes one cell per value):")
    for f in dataclasses.fields(Cell):
        if f.name in MATRIX_FIELDS:
            flag = cli_flags(f)[0]
            out.append(f"  {flag.flag:22s} {flag.metavar}")
    from ..plan.cells import REGISTRIES

    for name, (what, registry) in REGISTRIES.items():  # every setting's values, as their entries say
        if name == "dtype":  # --precision's older spelling
            continue
        out.append(f"{what} (--{name.replace('_', '-')}):")
        out += [f"  {value:18s} {entry.description}" for value, entry in registry.items()]
    out.append("presets:")
    for name, matrices in PRESETS.items():
        models = sorted({m for mx in matrices for m in mx.models})
        out.append(
            f"  {name:14s} {sum(len(mx.cells()) for mx in matrices):3d} cells  models: {', '.join(models)}"
        )
    return "\n".join(out)


def check_table(checks, device: str, seconds: float) -> str:
    """`lorabench check`'s table: check, measured, expected, verdict."""
    df = pd.DataFrame(
        {
            "check": [c.name for c in checks],
            "measured": [c.measured for c in checks],
            "expected": [c.expected for c in checks],
            "verdict": ["pass" if c.ok else "FAIL" for c in checks],
        }
    )
    failed = sum(not c.ok for c in checks)
    verdict = "every check passed" if not failed else f"{failed} of {len(checks)} checks FAILED"
    return "\n".join([f"# lorabench check on {device}: {verdict} ({seconds:.1f} s)", "", markdown(df), ""])


def metrics_table() -> str:
    """Every figure a row can hold (metrics.METRICS): the README's table of figures is this."""
    gate = {"time": "gated: time", "memory": "gated: memory", "quality": "gated: accuracy points"}
    df = pd.DataFrame(
        {
            "key": [f"`{m.key}`" for m in METRICS],
            "unit": [m.unit for m in METRICS],
            "label": [m.label.strip() for m in METRICS],
            "what it is": [
                m.definition + (" *Row only.*" if not m.shown else "") + (" *Derived.*" if m.derive else "")
                for m in METRICS
            ],
            "compare": [
                "exact: any change is called out" if m.exact else gate.get(m.gate, "") for m in METRICS
            ],
        }
    )
    return markdown(df)

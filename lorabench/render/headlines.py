"""The headline: one sentence per comparison table that answers what LoRA bought there.

    lorabench run --headline-by time      # the fastest variant within a point of full's accuracy

Every figure in it is one of the comparison table's cells, formatted the same way, so a reader
can find each in the table below it.
"""

from __future__ import annotations

from ..results.metrics import BY_KEY, is_number
from ..results.quality import Goal
from . import quality
from .tables import Variant, column_name, delta, fmt

QUALITY_POINTS = 1.0  # "equal quality" for the time criterion: final accuracy within this many points of full


def headline(variants: list[Variant], by: str = "memory", goal: Goal = Goal()) -> str | None:
    """One or two sentences answering the question the tool exists for, from the rows: the best
    LoRA variant by `by` ("memory": least weight+gradient+optimizer state; "time": least epoch time
    among those within QUALITY_POINTS of full's accuracy, on pretrained weights) against full
    fine-tuning, its time to `goal`'s target against full's. Every figure is one of the comparison
    table's, formatted as it is there."""
    ok = [v for v in variants if v.ok]
    full = next((v for v in ok if v.cell.is_baseline), None)
    loras = [v for v in ok if not v.cell.is_baseline]
    if full is None or not loras:
        return None
    c = full.cell
    pretrained = c.pretrained
    if by == "time":
        acc = full.metrics.get("final_eval_accuracy")
        equal = [
            v
            for v in loras
            if not pretrained
            or not is_number(acc)
            or (
                is_number(v.metrics.get("final_eval_accuracy"))
                and (acc - v.metrics["final_eval_accuracy"]) * 100 <= QUALITY_POINTS
            )
        ]
        pick = _least(equal or loras, "epoch_s")
        why = "the fastest" + (
            f" within {QUALITY_POINTS:g} point of full's accuracy" if pretrained and equal else ""
        )
    else:
        pick = _least(loras, "state_bytes")
        why = "the least memory"
    claims = []
    pct = pick.metrics.get("params_trainable_pct")
    if is_number(pct):
        claims.append(f"trains {fmt(pct, 'pct')} of the parameters")
    needs = _needs(full, pick)
    if needs:
        claims.append("needs " + needs)
    if pretrained:
        said = quality.claims(pick, variants, goal)
        quality_said = "; ".join(said) if said else "quality was not measured"
    else:
        quality_said = "quality is not comparable on random weights"
    subject = f"{c.model} on {c.device} ({c.weights} weights)"
    # where full fine-tuning uses memory savers, name them: "than full fine-tuning (ckpt bf16-mixed adamw-8bit)"
    savers = full.label[len(c.method_label) :].strip()
    than = " than full fine-tuning" + (f" ({savers})" if savers else "")
    return (
        f"{subject}: {column_name(pick)} ({why} of {len(loras)} LoRA variant{'s' * (len(loras) > 1)}) "
        f"{', and '.join(claims) or 'was measured'}{than * bool(needs)}; {quality_said}."
    )


def against_leanest_full(variants: list[Variant]) -> str | None:
    """Across a model's tables, where full fine-tuning ran with and without memory savers (the `fair`
    preset): the leanest LoRA variant against the leanest full fine-tuning that ran, not only against
    plain full fine-tuning. None where full fine-tuning ran one way only."""
    ok = [v for v in variants if v.ok]
    fulls = [v for v in ok if v.cell.is_baseline]
    loras = [v for v in ok if not v.cell.is_baseline]
    if len({v.label for v in fulls}) < 2 or not loras:
        return None
    full, pick = _least(fulls, "state_bytes"), _least(loras, "state_bytes")
    c = full.cell
    needs = _needs(full, pick)
    return (
        f"{c.model} on {c.device}, savers on both sides: against the leanest full fine-tuning that ran "
        f"({column_name(full)}), {column_name(pick)} " + (f"needs {needs}." if needs else "was measured.")
    )


def _needs(full: Variant, pick: Variant) -> str:
    """ "X% less weight+gradient+optimizer memory and Y% less time per epoch", as the table says them."""
    out = []
    for key, what in (("state_bytes", "weight+gradient+optimizer memory"), ("epoch_s", "time per epoch")):
        d = delta(full.metrics.get(key), pick.metrics.get(key), BY_KEY[key].fmt)  # a reduction; "-" is more
        if d:
            out.append(f"{d.lstrip('-')} {'more' if d.startswith('-') else 'less'} {what}")
    return " and ".join(out)


def _least(variants: list[Variant], key: str) -> Variant:
    measured = [v for v in variants if is_number(v.metrics.get(key))]
    return min(measured, key=lambda v: (v.metrics[key], v.cell.rank or 0)) if measured else variants[0]

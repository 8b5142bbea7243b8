"""The zoo, as a user brings it: twelve architectures, made at test time from configurations in
code, through every method lorabench offers. Every cell builds or is skipped with PEFT's reason;
LoRA and IA3 train what PEFT's own defaults train; FLOPs are counted; and a real run's predicted
peaks sit within 10 % of the measured ones."""

import glob
import json

import pytest
from conftest import TINY, run_subprocess

from lorabench.plan import admission
from lorabench.plan.presets import expand
from lorabench.workload.zoo import ARCHITECTURES


def peft_own(model: str, method: str) -> int | None:
    """Trainable parameters of PEFT's own config for `method` at r=8 on `model`'s architecture;
    None where PEFT has no defaults for it (DistilBERT, ELECTRA: it asks for target_modules)."""
    import peft

    from lorabench.workload import models

    bundle = models.build(model)
    task = getattr(peft.TaskType, bundle.task.peft_task_type)
    config = peft.LoraConfig(task_type=task, r=8) if method == "lora" else peft.IA3Config(task_type=task)
    try:
        adapted = peft.get_peft_model(bundle.module, config)
    except ValueError as e:
        assert "target_modules" in str(e)
        return None
    return sum(p.numel() for p in adapted.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_method_on_every_architecture_is_surveyed_or_skipped_with_peft_reason(arch):
    cells = expand(["zoo"], models=[f"tiny-{arch}"])
    plan = admission.Plan.of(cells)
    for cell, s in zip(plan.cells, plan.surveys):
        if cell.key() in plan.skipped:
            assert plan.skipped[cell.key()].startswith(f"PEFT cannot build {cell.method} on tiny-{arch}: ")
            continue
        p = s.prediction
        assert p.flops_per_step and p.flops_per_step > 0, cell.label
        assert p.peak_by == "simulated step", (cell.label, p.peak_by)
        if cell.method in ("lora", "ia3"):
            theirs = peft_own(cell.model, cell.method)
            assert s.params.trainable == theirs if theirs is not None else s.params.trainable > 0, cell.label
    assert sum(c.method == "full" for c in plan.cells) == 1 and not any(
        c.method in ("full", "lora", "ia3") for c in plan.cells if c.key() in plan.skipped
    )


def test_a_real_run_of_the_zoo_predicts_its_peaks_within_ten_percent(tmp_path):
    models = ",".join(f"tiny-{a}" for a in ("llama", "gpt2", "opt", "roberta", "deberta-v2", "phi"))
    out = run_subprocess(
        "run",
        "--models",
        models,
        "--methods",
        "full,lora",
        "--ranks",
        "8",
        *TINY,
        "--out",
        str(tmp_path / "results"),
        cwd=tmp_path,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = glob.glob(str(tmp_path / "results" / "*" / "results.jsonl"))
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 12
    for row in rows:
        assert row["status"] == "ok", row.get("error")
        m = row["metrics"]
        assert row["info"]["predicted_peak_by"] == "simulated step"
        assert m["predicted_over_measured"] == pytest.approx(1.0, abs=0.10), (row["cell"]["model"], m)
        assert 0 < m["predicted_over_host_peak"] < 1.2  # the timed region's RSS: glibc keeps freed heap
        # host RSS, weights included, with the freed heap handed back: what the "measured" is
        assert m["predicted_over_host_step_peak"] == pytest.approx(1.0, abs=0.10), (row["cell"]["model"], m)

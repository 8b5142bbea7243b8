"""Rows: metrics are numbers or null with a reason, derived figures come from METRICS, old rows convert."""

import json
from pathlib import Path

import pandas as pd
import pytest

from lorabench.measure.trackers import Unavailable
from lorabench.plan.cells import Cell
from lorabench.render import tables
from lorabench.results.metrics import BY_KEY, METRICS, is_number
from lorabench.results.rows import Row, Status

ROOT = Path(__file__).resolve().parents[2]
# two rows of the first committed reference run (20261122-075125-2e42e4), written with schema 1
SCHEMA_1 = Path(__file__).parent / "data" / "schema1-rows.jsonl"
CELL = Cell(model="cifar-mlp", method="lora", rank=2, batch_size=16, grad_accum=2)


def test_measurements_split_into_numbers_reasons_and_info():
    row = Row.make(
        CELL,
        Status.OK,
        {
            "epoch_s": 1.5,
            "torch_peak_allocated_bytes": Unavailable("no allocator"),
            "optimizer": "adam(fused)",
            "final_eval_loss": float("nan"),
        },
    )
    assert row.metrics["epoch_s"] == 1.5
    assert row.metrics["torch_peak_allocated_bytes"] is None
    assert row.unavailable["torch_peak_allocated_bytes"] == "no allocator"
    assert row.info == {"optimizer": "adam(fused)"}
    # a NaN is no measurement: null with why, so the line stays valid JSON
    assert (
        row.metrics["final_eval_loss"] is None and "not a finite number" in row.unavailable["final_eval_loss"]
    )
    json.dumps(row.to_json(), allow_nan=False)


def test_an_undeclared_metric_is_refused():
    with pytest.raises(KeyError, match="not declared in lorabench.results.metrics.METRICS"):
        Row.make(CELL, Status.OK, {"epoch_seconds": 1.0})


def test_derived_figures_by_hand():
    m = {
        "weights_bytes": 100,
        "grads_bytes": 10,
        "optimizer_state_bytes": 20,
        "host_peak_above_baseline_bytes": 50,
        "torch_peak_above_baseline_bytes": Unavailable("cpu"),
        "step_s_p50": 0.5,
        "flops_per_step": 1e9,
        "device_matmul_flops": 4e9,
        "params_trainable": 5,
        "params_total": 200,
        "model_file_bytes": 400,
        "adapter_file_bytes": 30,
    }
    d = Row.make(CELL, Status.OK, m).metrics
    assert d["state_bytes"] == 130
    assert d["activations_bytes"] == 50 - 10 - 20  # host RSS when the allocator has no figure
    assert d["samples_per_s"] == 16 * 2 / 0.5  # batch x accumulation per median step
    assert d["achieved_flops"] == 2e9 and d["mfu_pct"] == 50.0
    assert d["params_trainable_pct"] == 2.5
    assert d["checkpoint_bytes"] == 30  # the adapter file, not the model
    row = Row.make(CELL, Status.OK, {**m, "torch_peak_above_baseline_bytes": 45})
    assert row.metrics["activations_bytes"] == 15 and row.info["activations_source"] == "torch allocator"


def test_mfu_counts_the_models_flops_and_hfu_the_recomputation_too():
    row = Row.make(
        CELL,
        Status.OK,
        {
            "step_s_p50": 0.5,
            "flops_per_step": 1e9,
            "hardware_flops_per_step": 1.3e9,
            "device_matmul_flops": 4e9,
        },
    )
    assert row.metrics["mfu_pct"] == 50.0 and row.metrics["hfu_pct"] == pytest.approx(65.0)


def test_an_mfu_above_100_percent_is_a_measurement_problem_not_a_figure():
    row = Row.make(CELL, Status.OK, {"step_s_p50": 0.5, "flops_per_step": 3e9, "device_matmul_flops": 4e9})
    assert row.metrics["achieved_flops"] == 6e9 and row.metrics["mfu_pct"] is None
    assert row.unavailable["mfu_pct"].startswith("measurement problem: 150 % of the calibrated matmul rate")


def test_a_diverged_rows_nan_losses_are_null_and_the_row_is_valid_json():
    import json

    row = Row.make(
        CELL,
        Status.DIVERGED,
        {"final_eval_loss": float("nan")},
        epochs=[{"epoch": 1, "train_loss": float("nan"), "eval_loss": float("inf"), "epoch_s": 0.1}],
    )
    assert row.epochs == [{"epoch": 1, "train_loss": None, "eval_loss": None, "epoch_s": 0.1}]
    assert row.metrics["final_eval_loss"] is None and "nan" in row.unavailable["final_eval_loss"]
    json.dumps(row.to_json(), allow_nan=False)


def test_a_derived_figure_carries_the_reason_of_a_missing_input():
    row = Row.make(CELL, Status.OK, {"step_s_p50": Unavailable("no timed steps")})
    assert row.metrics["samples_per_s"] is None
    assert row.unavailable["samples_per_s"] == "needs step_s_p50: no timed steps"


def test_every_metric_is_declared_once_with_a_unit_and_a_format():
    assert len(BY_KEY) == len(METRICS)
    assert all(m.unit and m.label and m.fmt in tables.FORMATS for m in METRICS)
    assert all(m.gate in (None, "time", "memory", "quality") for m in METRICS)
    assert not any(m.exact and m.gate for m in METRICS)  # exact figures are not judged by noise limits


def test_a_row_round_trips_through_json():
    row = Row.make(
        CELL,
        Status.OOM,
        {"params_total": 7, "energy_j_per_epoch": Unavailable("cpu")},
        error={"type": "MemoryError", "message": "", "traceback": []},
        run_id="r1",
        wall_s=2.0,
    )
    again = Row.from_json(json.loads(json.dumps(row.to_json())))
    assert again == row and again.status is Status.OOM


def test_schema_1_rows_convert_on_read():
    lines = SCHEMA_1.read_text().splitlines()
    rows = [Row.from_json(json.loads(line)) for line in lines]
    assert len(rows) == 2 and all(r.ok for r in rows)
    old = json.loads(lines[0])
    assert old.get("schema") == 1 and isinstance(old["metrics"]["torch_peak_allocated_bytes"], str)
    r = rows[0]
    assert r.metrics["torch_peak_allocated_bytes"] is None
    assert r.unavailable["torch_peak_allocated_bytes"] == "torch keeps no allocator statistics on the cpu"
    assert r.info["data"].startswith("synthetic CIFAR-shaped") and r.epochs and r.epochs[0]["epoch"] == 1
    assert r.metrics["state_bytes"] == (
        r.metrics["weights_bytes"] + r.metrics["grads_bytes"] + r.metrics["optimizer_state_bytes"]
    )  # derived on read
    df = pd.json_normalize([x.to_json() for x in rows]).filter(like="metrics.")
    assert all(v is None or is_number(v) for v in df.to_numpy().ravel() if not pd.isna(v))
    df.astype(float)  # every metric column converts: no string inside a number's place


def test_every_row_says_how_far_its_prediction_was_from_the_measured_peak():
    cpu = {"predicted_total_bytes": 300, "weights_bytes": 100, "host_peak_above_baseline_bytes": 200}
    assert Row.make(CELL, Status.OK, cpu).metrics["predicted_over_measured"] == 1.0
    gpu = {**cpu, "torch_peak_allocated_bytes": 600}  # the allocator's peak wins where there is one
    assert Row.make(CELL, Status.OK, gpu).metrics["predicted_over_measured"] == 0.5
    none = Row.make(CELL, Status.OK, {"weights_bytes": 100, "host_peak_above_baseline_bytes": 200})
    assert "predicted_over_measured" not in none.metrics
    # a row of the simulated step: its peak over the framework level (the CPU's live tensors), RSS beside it
    sim = {**cpu, "predicted_peak_bytes": 240, "host_tensors_peak_bytes": 200}
    made = Row.make(CELL, Status.OK, sim).metrics
    assert made["predicted_over_measured"] == 1.2 and made["predicted_over_host_peak"] == 0.8
    # and over host RSS of one step with the freed heap handed back, where the row has it
    assert "predicted_over_host_step_peak" not in made
    step = Row.make(CELL, Status.OK, {**sim, "host_rss_step_peak_bytes": 250}).metrics
    assert step["predicted_over_host_step_peak"] == 0.96 and step["predicted_over_measured"] == 1.2

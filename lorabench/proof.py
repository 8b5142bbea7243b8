"""`lorabench proof OUT`: everything a first GPU must show, in one command, written to OUT for the
repository (proof.json and proof.md; docs/proof.md describes both).

    lorabench proof results/gpu-proof-h100           # on a GPU: about 6 minutes on one H100
    lorabench proof /tmp/proof --dry-run             # on any machine: every step on the CPU

The GPU paths are built against fakes of the driver libraries; this is what a real device adds.
In order: `lorabench check --device cuda` (the first use of the device in this process, so the
driver's reading before it is others' load), whether the driver lists this process, the int8 and
nf4 weights' bytes against their prediction, tests/physics/test_gpu.py with the GPU required (from
a checkout: the tests are not installed), bert-base LoRA at seed 003's shape predicted against
measured, and the `quick` preset. The runs go to OUT/runs and their reports to OUT/report. A step
that fails does not stop the others. `--dry-run` runs every step on the CPU, the GPU tests as they
skip without a GPU and bert-tiny in place of bert-base, which proves the command, not a device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent  # a checkout's root (tests/ beside lorabench/)
MiB = 2**20
SEED_SHAPE = {"batch-size": "32", "seq-len": "128", "samples": "256", "eval-samples": "64"}


@dataclass
class Step:
    name: str
    status: str  # ok, failed, skipped
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    detail: str = ""  # what a reader needs to judge it: the command, the reason


@dataclass
class Proof:
    out: Path
    dry: bool  # every step on the CPU

    steps: list[Step] = field(default_factory=list)

    @property
    def device(self) -> str:
        """What the steps run on: cuda, or cpu in a dry run."""
        return "cpu" if self.dry else "cuda"

    def lorabench(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        """The command line as a user runs it, in a fresh process (its own CUDA context)."""
        return subprocess.run(
            [sys.executable, "-m", "lorabench", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )

    def run(self, name: str, fn: Callable[["Proof"], Step]) -> Step:
        t0 = time.perf_counter()
        try:
            step = fn(self)
        except Exception as e:  # noqa: BLE001 (a step that cannot run is a failed step, said why)
            step = Step(name, "failed", detail=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}")
        step.name, step.seconds = name, time.perf_counter() - t0
        self.steps.append(step)
        return step

    def to_json(self) -> dict[str, Any]:
        from .measure import environment

        return {
            "schema": 1,
            "device": self.device,
            "dry_run": self.dry,
            "ok": all(s.status != "failed" for s in self.steps),
            "environment": environment.capture(self.device, gpu=not self.dry),
            "steps": [asdict(s) for s in self.steps],
        }


def check_step(p: Proof) -> Step:
    from .check import run_checks

    checks = run_checks(p.device)
    return Step(
        "check",
        "ok" if all(c.ok for c in checks) else "failed",
        figures={c.name: {"measured": c.measured, "expected": c.expected, "ok": c.ok} for c in checks},
        detail=f"lorabench check --device {p.device}",
    )


def driver_step(p: Proof) -> Step:
    """Does the driver list this process, with its memory? Inside a container it lists host PIDs
    only: the cells then report the process figure unavailable and the device's use instead."""
    if p.dry:
        return Step("driver", "skipped", detail="dry run: no device")
    from .measure.drivers import driver_trackers

    trackers, _, facts, missing = driver_trackers(torch.device("cuda", 0), 0.01)
    if not trackers:
        return Step("driver", "failed", detail=f"no driver view: {next(iter(missing.values())).reason}")
    x = torch.ones(64 * MiB // 4, device="cuda")
    torch.cuda.synchronize()
    with trackers[0]:
        time.sleep(0.05)
    del x
    process_key = trackers[0].KEYS[0]
    seen = trackers[0].result()[process_key]
    figures = {**facts, "process_listed": isinstance(seen, int), "cadence": trackers[0].cadence()}
    if isinstance(seen, int):
        figures["process_bytes"] = seen
    return Step(
        "driver",
        "ok",
        figures=figures,
        detail=f"{seen / MiB:,.0f} MiB" if isinstance(seen, int) else seen.reason,
    )


def quantised_step(p: Proof) -> Step:
    """The MLP's base quantised on the device: the bytes held against the prediction, per kind (int8
    once stayed fp32 when the model was on a GPU before quantisation: 4x the bytes)."""
    from .workload import models, quantization

    device = torch.device(p.device)
    figures, ok = {}, True
    for kind in ("int8", "nf4"):
        why = quantization.unsupported(kind, p.device)
        if why:
            figures[kind], ok = {"unsupported": why}, False
            continue
        with torch.device("meta"):
            predicted = quantization.predicted_bytes(models.build("cifar-mlp").module, kind, 4)
        model = models.build("cifar-mlp").module.to(device)  # on the device first, as a cell does it
        quantization.quantize(model, kind, device)
        held = quantization.weight_bytes(model.parameters())
        figures[kind] = {
            "held_bytes": held,
            "predicted_bytes": predicted,
            "held_over_predicted": held / predicted,
            "weight_dtypes": sorted({str(t.dtype) for t in model.parameters()}),
        }
        ok &= abs(held / predicted - 1) <= 0.01
    return Step("quantised weights", "ok" if ok else "failed", figures=figures)


def gpu_tests_step(p: Proof) -> Step:
    tests = ROOT / "tests" / "physics" / "test_gpu.py"
    if not tests.exists():
        return Step("gpu tests", "skipped", detail=f"{tests} is not here: run the proof from a checkout")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if not p.dry:
        env["LORABENCH_REQUIRE_GPU"] = "1"
    else:
        env.pop("LORABENCH_REQUIRE_GPU", None)
    junit = p.out / "gpu-tests.xml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(tests),
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    outcomes = _junit_outcomes(junit)
    status = (
        "failed"
        if done.returncode
        else ("skipped" if outcomes and set(outcomes.values()) == {"skipped"} else "ok")
    )
    return Step(
        "gpu tests", status, figures={"tests": outcomes, "summary": summary}, detail=done.stdout[-3000:]
    )


def _junit_outcomes(path: Path) -> dict[str, str]:
    """{test: passed | failed | skipped | error} from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {}
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        out[case.get("name", "?")] = next(
            (k for k in ("failure", "error", "skipped") if k in kinds), "passed"
        )
    return {name: {"failure": "failed"}.get(v, v) for name, v in out.items()}


def _rows(run_root: Path, before: set[Path]) -> tuple[Path | None, list[dict]]:
    new = sorted(set(run_root.glob("*/results.jsonl")) - before)
    if not new:
        return None, []
    return new[-1].parent, [json.loads(line) for line in new[-1].read_text().splitlines() if line.strip()]


def _cli_run(p: Proof, name: str, args: list[str], keep: Callable[[dict], dict]) -> Step:
    runs, reports = p.out / "runs", p.out / "report"
    before = set(runs.glob("*/results.jsonl"))
    argv = [
        "run",
        *args,
        "--device",
        p.device,
        "--out",
        str(runs),
        "--report-dir",
        str(reports),
        "--progress",
        "off",
    ]
    done = p.lorabench(*argv)
    run_dir, rows = _rows(runs, before)
    figures = {
        "command": "lorabench " + " ".join(argv),
        "run": str(run_dir.relative_to(p.out)) if run_dir else None,
        "cells": [
            {"cell": f"{r['cell']['model']} {r['label']}", "status": r["status"], **keep(r)} for r in rows
        ],
    }
    ok = done.returncode == 0 and rows and all(r["status"] in ("ok", "skipped") for r in rows)
    return Step(name, "ok" if ok else "failed", figures=figures, detail=(done.stderr or done.stdout)[-2000:])


PEAK_FIGURES = (
    "predicted_peak_bytes",
    "torch_peak_allocated_bytes",
    "torch_peak_reserved_bytes",
    "host_tensors_peak_bytes",
    "predicted_over_measured",
    "gpu_context_bytes",
    "nvml_process_peak_bytes",
    "nvml_device_used_peak_bytes",
    "amdsmi_process_peak_bytes",
    "step_s_p50",
    "epoch_s",
    "energy_j_per_epoch",
)


def _peaks(row: dict) -> dict:
    m = row.get("metrics", {})
    out: dict[str, Any] = {k: m[k] for k in PEAK_FIGURES if m.get(k) is not None}
    out["predicted_attention"] = row.get("info", {}).get("predicted_attention")
    out["unavailable"] = {k: v for k, v in row.get("unavailable", {}).items() if k in PEAK_FIGURES}
    return out


def seed_shape_step(p: Proof) -> Step:
    """bert-base LoRA r=8 at seed 003's shape (batch 32, sequence 128): the prediction against the
    allocator's peak. A dry run takes bert-tiny: bert-base's steps take minutes on a CPU. Random
    weights: a peak does not depend on them, and a trained base would first be made (bert-tiny at
    this shape: 11 s on 2 cores, of a 25 s step)."""
    model = "bert-tiny" if p.dry else "bert-base"
    shape = [a for k, v in SEED_SHAPE.items() for a in (f"--{k}", v)]
    args = [
        "--models",
        model,
        "--methods",
        "lora",
        "--ranks",
        "8",
        *shape,
        "--epochs",
        "1",
        "--warmup-epochs",
        "1",
        "--weights",
        "random",
    ]
    return _cli_run(p, "seed shape", args, _peaks)


def quick_step(p: Proof) -> Step:
    return _cli_run(p, "quick preset", ["--preset", "quick"], _peaks)


STEPS: dict[str, Callable[[Proof], Step]] = {
    "check": check_step,
    "driver": driver_step,
    "quantised weights": quantised_step,
    "gpu tests": gpu_tests_step,
    "seed shape": seed_shape_step,
    "quick preset": quick_step,
}


def prove(out: Path, dry: bool, progress: Callable[[str], None] = lambda name: None) -> Proof:
    """Every step in order, on the GPU (the CPU in a dry run); proof.json and proof.md written to `out`
    after each step, so a proof cut short keeps what it showed."""
    from .render.proofs import proof_markdown

    out.mkdir(parents=True, exist_ok=True)
    proof = Proof(out.resolve(), dry)  # absolute: the GPU tests' pytest writes its report from the checkout
    for name, fn in STEPS.items():
        progress(name)
        proof.run(name, fn)
        if not proof.dry:  # what this process cached must not sit in the next steps' processes' way
            torch.cuda.empty_cache()
        data = proof.to_json()
        (out / "proof.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
        (out / "proof.md").write_text(proof_markdown(data), encoding="utf-8")
    return proof

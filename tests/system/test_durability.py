"""Nothing lost: failures become rows, a killed run resumes, one writer per run directory."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import TINY, run_subprocess

from lorabench.plan.presets import expand
from lorabench.results.rundir import RunDir, RunDirLocked

pytestmark = pytest.mark.slow


def rows_of(run_dir: Path):
    """The rows as read back (Row objects' JSON, a torn last line dropped), and the warnings of
    reading them: a durability test reads a run directory as `lorabench` itself does."""
    rows, warnings = RunDir(run_dir).rows()
    return [r.to_json() for r in rows], warnings


def only_run_dir(cwd: Path) -> Path:
    (run_dir,) = (cwd / "results").iterdir()
    return run_dir


def _as_from_a_terminal() -> None:
    """Ctrl-C's default action, as a command started at a terminal has it: a test run in the
    background of a script (`pytest ... &`, as CI may) has SIGINT ignored, the command inherits
    that, and Python then installs no KeyboardInterrupt handler (the run went on and exited 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "lorabench", *args],
        cwd=cwd,
        env=env,
        start_new_session=True,
        preexec_fn=_as_from_a_terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def calibrated(cwd: Path) -> bool:
    """The run's calibration process has finished (the next fork-server child is a cell)."""
    return bool(list((cwd / "results").glob("*/calibration.json")))


def row_count(cwd: Path) -> int:
    files = list((cwd / "results").glob("*/results.jsonl"))
    return len(files[0].read_text().splitlines()) if files else 0


def cell_processes(parent_pid: int):
    """The cells' own processes: children of the fork server under the lorabench process. The
    matmul calibration runs there too, before the first cell: wait for `calibrated` first."""
    try:
        tree = psutil.Process(parent_pid).children(recursive=True)
    except psutil.Error:
        return []
    cells = []
    for p in tree:
        try:  # a short-lived child (git, the resource tracker) may exit between the listing and this read
            if "forkserver" in " ".join(p.cmdline()):
                cells += p.children()
        except psutil.Error:
            continue
    return cells


MATRIX = ["--models", "cifar-mlp,bert-tiny", "--methods", "full,lora", "--ranks", "1"]


def test_sigkill_then_resume_runs_every_cell_exactly_once(tmp_path):
    proc = start("run", *MATRIX, *TINY, cwd=tmp_path)
    wait_for(lambda: row_count(tmp_path) >= 1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a scheduler kills it
    proc.wait()
    run_dir = only_run_dir(tmp_path)
    before = len(rows_of(run_dir)[0])
    assert 1 <= before < 4
    assert (run_dir / RunDir.OWNER).exists()  # left behind by the killed process (its flock died with it)
    out = run_subprocess("run", "--resume", str(run_dir), "--progress", "off", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "took over the lock" in out.stderr and f"{before} of 4 cells have rows" in out.stderr
    rows, warnings = rows_of(run_dir)
    keys = [r["cell_key"] for r in rows]
    assert len(keys) == len(set(keys)) == 4 and warnings == []
    assert {r["status"] for r in rows} == {"ok"}
    assert not (run_dir / RunDir.OWNER).exists()
    again = run_subprocess("run", "--resume", str(run_dir), "--progress", "off", cwd=tmp_path)
    assert "4 of 4 cells have rows, 0 to run" in again.stderr and len(rows_of(run_dir)[0]) == 4


def test_out_of_memory_becomes_an_oom_row_the_next_cell_runs_and_retry_replaces_it(tmp_path):
    out = run_subprocess(
        "run",
        "--models",
        "cifar-mlp",
        "--methods",
        "full,lora",
        "--ranks",
        "1",
        *TINY,
        "--weights",
        "random",  # a trained base made inside the capped cell would be what runs out
        "--cell-memory-limit",
        "470",  # address space beyond the cell's start: LoRA's cell reaches about +400 MiB, full's +545
        "--strict",
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stderr  # --strict: a cell did not finish ok
    run_dir = only_run_dir(tmp_path)
    rows, _ = rows_of(run_dir)
    full, lora = rows
    assert full["status"] == "oom" and "can't allocate memory" in full["error"]["message"]
    assert full["error"]["traceback"], "the last lines of the traceback are kept"
    assert full["metrics"]["params_trainable"] == 20_998_154  # measured before the failure: kept
    assert lora["status"] == "ok"
    report = next((tmp_path / "report").glob("*.md")).read_text()  # the pictures sit in a folder beside it
    assert "## Cells that did not finish" in report and "| oom" in report
    res = run_subprocess("run", "--resume", str(run_dir), "--retry-failed", "--progress", "off", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "1 of 2 cells have rows, 1 to run" in res.stderr
    rows, _ = rows_of(run_dir)
    assert sorted((r["label"], r["status"]) for r in rows) == [("full", "ok"), ("lora r=1", "ok")]


def test_a_cell_killed_by_a_signal_is_a_crashed_row_and_the_matrix_goes_on(tmp_path):
    proc = start(
        "run",
        "--models",
        "cifar-mlp",
        "--methods",
        "full,lora",
        "--ranks",
        "1",
        "--samples",
        "4096",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--progress",
        "off",
        cwd=tmp_path,
    )
    wait_for(lambda: calibrated(tmp_path) and cell_processes(proc.pid))
    time.sleep(1.0)
    cell_processes(proc.pid)[0].send_signal(signal.SIGSEGV)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    rows, _ = rows_of(only_run_dir(tmp_path))
    assert [r["status"] for r in rows] == ["crashed", "ok"]
    assert rows[0]["error"]["type"] == "SIGSEGV" and "died from SIGSEGV" in rows[0]["error"]["message"]


def test_a_cell_past_its_timeout_is_a_timeout_row(tmp_path):
    out = run_subprocess(
        "run",
        "--models",
        "cifar-mlp",
        "--methods",
        "full",
        "--samples",
        "4096",
        "--batch-size",
        "16",
        "--epochs",
        "5",
        "--progress",
        "off",
        "--cell-timeout",
        "2",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    (row,), _ = rows_of(only_run_dir(tmp_path))
    assert row["status"] == "timeout" and "exceeded its 2 s limit" in row["error"]["message"]
    assert 2 <= row["wall_s"] < 10


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path):
    proc = start(
        "run",
        "--models",
        "cifar-mlp",
        "--methods",
        "full",
        "--samples",
        "4096",
        "--batch-size",
        "16",
        "--epochs",
        "3",
        "--progress",
        "off",
        cwd=tmp_path,
    )
    try:
        wait_for(lambda: list((tmp_path / "results").glob("*/plan.json")))
        run_dir = only_run_dir(tmp_path)
        out = run_subprocess("run", "--resume", str(run_dir), cwd=tmp_path)
        assert out.returncode == 2
        assert f"is in use by process {proc.pid}" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_ctrl_c_stops_cleanly_prints_how_to_resume_and_exits_130(tmp_path):
    proc = start(
        "run",
        "--models",
        "cifar-mlp",
        "--methods",
        "full,lora",
        "--ranks",
        "1",
        "--samples",
        "4096",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--progress",
        "off",
        cwd=tmp_path,
    )
    wait_for(lambda: calibrated(tmp_path) and cell_processes(proc.pid))
    children = cell_processes(proc.pid)
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read()
    assert "Resume with: lorabench run --resume" in err
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], "the running cell was cleaned up"
    assert not (only_run_dir(tmp_path) / RunDir.OWNER).exists()  # the lock was released


def test_truncated_last_line_is_reported_ignored_and_repaired_on_resume(tmp_path):
    out = run_subprocess(
        "run", "--models", "cifar-mlp", "--methods", "full,lora", "--ranks", "1", *TINY, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    run_dir = only_run_dir(tmp_path)
    path = run_dir / RunDir.RESULTS
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing the second row
    rows, warnings = rows_of(run_dir)
    assert len(rows) == 1 and len(warnings) == 1 and "truncated last line" in warnings[0]
    rep = run_subprocess("report", str(run_dir), "-o", str(tmp_path / "r.md"), cwd=tmp_path)
    assert rep.returncode == 0 and "truncated last line" in rep.stderr
    assert "## Warnings reading the results" in (tmp_path / "r.md").read_text()
    res = run_subprocess("run", "--resume", str(run_dir), "--progress", "off", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows, warnings = rows_of(run_dir)
    assert warnings == [] and [r["label"] for r in rows] == ["full", "lora r=1"]


def test_three_shards_merge_into_the_cells_of_one_unsharded_run(tmp_path):
    dirs = []
    for k in (1, 2, 3):
        out = run_subprocess(
            "run", *MATRIX[:-1], "1,2", *TINY, "--shard", f"{k}/3", "--out", f"s{k}", cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
        (d,) = (tmp_path / f"s{k}").iterdir()
        dirs.append(d)
    merged = run_subprocess("merge", *map(str, dirs), "--out", "merged", cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    rows, _ = rows_of(tmp_path / "merged")
    expected = expand(
        ["quick"],
        ["cifar-mlp", "bert-tiny"],
        ["full", "lora"],
        [1, 2],
        {
            "samples": 32,
            "eval_samples": 16,
            "batch_size": 16,
            "epochs": 1,
            "warmup_epochs": 1,
            "seq_len": 16,
            "device": "cpu",
        },
    )
    assert [r["cell_key"] for r in rows] == [c.key() for c in expected]
    assert all(r["status"] == "ok" for r in rows)
    assert (tmp_path / "report" / "merged.md").exists()


def test_merge_refuses_overlapping_shards_other_matrices_and_other_versions(tmp_path):
    import shutil

    out = run_subprocess(
        "run",
        "--models",
        "cifar-mlp",
        "--methods",
        "full,lora-reparam",
        "--ranks",
        "1",
        *TINY,
        "--shard",
        "1/2",
        "--out",
        "s",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    (d,) = (tmp_path / "s").iterdir()
    twice = run_subprocess("merge", str(d), str(d), "--out", "twice", cwd=tmp_path)
    assert twice.returncode == 2 and "is in both" in twice.stderr
    for key, value, message in [
        ("matrix_id", "0" * 16, "ran a different matrix"),
        ("lorabench_commit", "deadbeef", "merge only shards of one code version"),
    ]:
        other = tmp_path / f"other-{key}"
        shutil.copytree(d, other)
        plan_file = other / RunDir.PLAN
        plan_file.write_text(json.dumps({**json.loads(plan_file.read_text()), key: value}))
        (other / RunDir.RESULTS).write_text("")
        bad = run_subprocess("merge", str(d), str(other), "--out", "mixed", cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "twice").exists()


def _hold(path, ready, done):
    with RunDir(path).lock():
        ready.set()
        done.wait(30)


def test_the_lock_refuses_a_second_holder_and_dies_with_its_holder(tmp_path):
    run = RunDir.create(tmp_path, "run-1")
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(run.path, ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunDirLocked, match=f"in use by process {holder.pid}"):
            with run.lock():
                pass
    finally:
        holder.kill()  # SIGKILL: no finally runs in the holder, its .owner stays behind
        holder.join()
    with run.lock() as again:  # the kernel released the flock; the stale owner is reported
        assert again.took_over == f"process {holder.pid} on " + again.took_over.split(" on ", 1)[1]
    assert not (run.path / RunDir.OWNER).exists()

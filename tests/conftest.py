"""Shared helpers: the CLI run in-process, with the working directory in a fresh temp folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorabench.cli import main
from lorabench.measure.heap import hand_back

# The smallest real training settings: every cell trains a few steps on the CPU.
TINY = [
    "--samples",
    "32",
    "--eval-samples",
    "16",
    "--batch-size",
    "16",
    "--epochs",
    "1",
    "--warmup-epochs",
    "1",
    "--seq-len",
    "16",
    "--progress",
    "off",
]


@pytest.fixture(autouse=True, scope="session")
def _imports_out_of_the_collectors_sight():
    """What the imports made (torch, transformers, peft: millions of objects) frozen out of the
    garbage collector's walks, as a cell's process does (`worker.cell_main`): each gc.collect of a
    cell run in-process then takes milliseconds, not 0.2 s."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True, scope="session")
def _a_cache_of_the_sessions_own(tmp_path_factory):
    """Trained bases and device records go to a cache of this session's (the processes the tests
    start inherit it), never the user's: made once per session, shared by its tests."""
    saved = os.environ.get("LORABENCH_CACHE")
    os.environ["LORABENCH_CACHE"] = str(tmp_path_factory.mktemp("lorabench-cache"))
    yield
    if saved is None:
        os.environ.pop("LORABENCH_CACHE", None)
    else:
        os.environ["LORABENCH_CACHE"] = saved


@pytest.fixture(autouse=True)
def heap_handed_back():
    """Every test starts with the C library's free heap handed back to the kernel: a test that
    reads RSS rising by an allocation would read less where glibc carves it from pages an earlier
    test freed and glibc kept resident (CI read +0 MiB for a 64 MiB tensor after test_heap)."""
    hand_back()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def cli(in_tmp, capsys):
    """cli(*args) -> (exit code, stdout, stderr), run in-process from an empty temp folder."""

    def run(*args):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def run_subprocess(*args, cwd, timeout=300, show_warnings=False, env=None):
    """The real command line, as a user runs it (python -m lorabench ...); Python's warnings are
    silenced unless `show_warnings`, which shows them as a user's terminal would; `env`: more
    environment."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    if show_warnings:
        del env["PYTHONWARNINGS"]
    return subprocess.run(
        [sys.executable, "-m", "lorabench", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def rows_in(where: Path) -> list[dict]:
    """The rows of the one run directory under `where` (a run's --out folder, or the folder a run
    started in, whose results/ holds it), as written: JSON dicts, in the order of the file."""
    import json

    found = sorted(where.glob("*/results.jsonl")) or sorted(where.glob("results/*/results.jsonl"))
    assert len(found) == 1, f"expected one run directory under {where}, found {found}"
    return [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()]


def lorabench_rows(*args, cwd: Path, timeout: float = 600) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`lorabench *args` as a user runs it (`run_subprocess`), then the rows it wrote (`rows_in`);
    fails with the command's stderr where it did not exit 0."""
    out = run_subprocess(*args, cwd=cwd, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, rows_in(cwd)


@pytest.fixture(autouse=True)
def _let_kept_out_libraries_in():
    """The CLI run in-process keeps bitsandbytes out of this process (lorabench.forksafe): let it
    back in after each test, so a later test imports it as a user's process would."""
    yield
    from lorabench import forksafe

    forksafe.let_in()

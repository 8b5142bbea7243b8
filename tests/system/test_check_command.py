"""`lorabench check` as a user runs it on a new machine: a fresh process, the real command line."""

import subprocess
import sys


def test_check_proves_the_cpu_stack_and_prints_its_table(tmp_path):
    """In a fresh process, as a user runs it: the RSS check compares against the process's own
    lifetime high-water mark, which a pytest process has long passed."""
    out = subprocess.run(
        [sys.executable, "-m", "lorabench", "check", "--device", "cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("# lorabench check on cpu: every check passed")
    assert "| check " in lines[2] and "| verdict" in lines[2]
    for name in (
        "host RSS sampler",
        "host RSS, freed heap handed back",
        "clock",
        "FlopCounterMode vs closed form",
        "saved activations",
        "matmul ceiling",
    ):
        assert any(name in line and "| pass" in line for line in lines), name
    assert list(tmp_path.iterdir()) == []  # writes nothing

"""The dry run as a user runs it (`lorabench run --dry-run`): every cell surveyed, its step simulated,
the published counts and the plan printed, nothing written. In the slow tier: each surveys models
up to Bloom 1b4 on fake tensors (seconds each)."""

import pytest
from conftest import files_under

pytestmark = pytest.mark.slow


def test_seed_presets_dry_run_prints_the_published_counts(cli, in_tmp):
    code, out, err = cli("run", "--dry-run", "--preset", "seed-cifar-mlp,seed-bert,seed-bloom")
    assert code == 0, err
    for figure in ("15,370", "21,013,524", "8,450", "296,450", "720,896", "94,504,960"):
        assert figure in out, figure
    assert files_under(in_tmp) == []


def test_dry_run_prints_counts_and_writes_nothing(cli, in_tmp):
    code, out, err = cli("run", "--dry-run", "--models", "bert-base")
    assert code == 0
    assert "109,483,778" in out and "296,450" in out and "75,266" in out
    assert "3 cells on cpu; dry run" in out
    assert files_under(in_tmp) == []


def test_dry_run_of_a_shard_shows_only_its_cells(cli):
    counts = []
    for k in (1, 2, 3):
        code, out, err = cli("run", "--dry-run", "--shard", f"{k}/3")
        assert code == 0
        counts.append(int(out.strip().splitlines()[-1].split()[0]))
    assert sum(counts) == 6 and all(c >= 1 for c in counts)


def test_fit_memory_answers_whether_each_cell_fits_a_device_you_do_not_have(cli, capsys):
    code, out, _ = cli(
        "run",
        "--dry-run",
        "--models",
        "bert-base",
        "--methods",
        "full,lora",
        "--ranks",
        "8",
        "--fit-memory",
        "2GiB",
    )
    assert code == 0 and "nothing written" in out
    assert "- bert-base full: predicted to need 2.75 GiB (simulated step); --fit-memory: 2.00 GiB" in out
    assert "bert-base lora r=8:" not in out  # it fits
    with pytest.raises(SystemExit) as exit_:  # argparse's own errors exit from inside parse_args
        cli("run", "--dry-run", "--fit-memory", "24 furlongs")
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2
        and "expected a size such as 24GiB" in err
        and len(err.strip().splitlines()) == 1
    )


def test_dry_run_predicts_each_cells_time_and_the_matrixs(cli):
    code, out, err = cli("run", "--dry-run", "--preset", "seed-cifar-mlp")
    assert code == 0, err
    assert "step (ms)" in out and "cell (s)" in out
    assert "Predicted: " in out and "(measured by the dry run)" in out


def test_a_target_you_do_not_have_is_planned_from_its_data_sheet(cli):
    code, out, err = cli("run", "--dry-run", "--models", "bert-base", "--methods", "full", "--target", "h100")
    assert code == 0, err
    assert "from the data sheet" in out and "not calibrated" in out
    assert "cells on cuda" in out
    code, _, err = cli("run", "--dry-run", "--models", "bert-base", "--target", "h1000")
    assert code == 2 and "unknown accelerator" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("run", "--models", "bert-base", "--target", "h100")
    assert code == 2 and "goes with --dry-run" in err

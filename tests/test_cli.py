import pytest
import torch

from conftest import files_under

BAD = [
    (["run", "--models", "gpt-17"], "unknown model 'gpt-17'; choose from"),
    (["run", "--methods", "qlora"], "unknown method 'qlora'; choose from full, lora, lora-reparam"),
    (["run", "--preset", "nightly"], "unknown preset 'nightly'; choose from"),
    (["run", "--ranks", "0"], "rank must be a whole number >= 1, got 0"),
    (["run", "--ranks", "-4"], "rank must be a whole number >= 1, got -4"),
    (["run", "--ranks", "two"], "ranks must be whole numbers"),
    (["run", "--methods", "full", "--ranks", "4"], "ranks apply to the lora methods"),
    (["run", "--methods", "lora", "--ranks", "11", "--models", "cifar-mlp"], "rank 11 exceeds the smaller dimension (10)"),
    (["run", "--epochs", "0"], "epochs must be a whole number >= 1, got 0"),
    (["run", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["run", "--warmup-epochs", "-1"], "warmup_epochs must be a whole number >= 0"),
    (["run", "--batch-size", "0"], "batch_size must be a whole number >= 1, got 0"),
    (["run", "--samples", "8", "--batch-size", "16"], "samples (8) must be at least batch_size"),
    (["run", "--lr", "-1"], "lr must be a number > 0"),
    (["run", "--alpha", "0"], "alpha must be > 0"),
    (["run", "--repeat", "0"], "repeat must be a whole number >= 1"),
    (["run", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["run", "--dtype", "int4"], "argument --dtype: invalid choice"),
    (["run", "--cell-timeout", "0"], "--cell-timeout must be > 0 seconds"),
    (["run", "--models", ""], "expected a comma-separated list"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["report", "no-such-run"], "no results.jsonl here"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(cli, in_tmp, argv, message, capsys):
    try:
        code, out, err = cli(*argv)
    except SystemExit as e:   # argparse's own errors exit from inside parse_args
        code, captured = e.code, capsys.readouterr()
        out, err = captured.out, captured.err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert files_under(in_tmp) == []


def test_output_path_that_is_a_file_is_refused(cli, in_tmp):
    (in_tmp / "taken").write_text("x")
    code, out, err = cli("run", "--out", "taken")
    assert code == 2 and "--out taken: taken is a file, not a directory" in err
    code, out, err = cli("run", "--report-dir", "taken/sub")
    assert code == 2 and "is a file" in err
    assert files_under(in_tmp) == ["taken"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_refused(cli, in_tmp):
    code, out, err = cli("run", "--device", "cuda")
    assert code == 2 and "--device cuda: torch sees no GPU here" in err
    assert files_under(in_tmp) == []


def test_dry_run_prints_counts_and_writes_nothing(cli, in_tmp):
    code, out, err = cli("run", "--dry-run", "--models", "bert-base")
    assert code == 0
    assert "109,483,778" in out and "296,450" in out and "75,266" in out
    assert "3 cells on cpu; dry run" in out
    assert files_under(in_tmp) == []


def test_list_names_every_registry(cli):
    code, out, err = cli("list")
    assert code == 0
    for name in ("cifar-mlp", "20,998,154", "bert-base", "lora-reparam", "quick"):
        assert name in out


def test_help_everywhere(capsys):
    from lorabench.cli import main
    for argv in (["--help"], ["run", "--help"], ["report", "--help"], ["list", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "usage: lorabench" in capsys.readouterr().out

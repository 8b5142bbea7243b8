import os

import pytest
import torch
from conftest import files_under

BAD = [
    (["run", "--models", "gpt-17"], "unknown model 'gpt-17'; choose from"),
    (["run", "--optimizer", "adam,lion"], "unknown optimizer 'lion'; choose from adafactor, adam, adamw"),
    (["run", "--optimizer", "sgd", "--lr", "0"], "lr must be a number > 0, got 0.0"),
    (
        ["run", "--methods", "qlora"],
        "unknown method 'qlora'; choose from adalora, boft, dora, full, ia3, loha, lokr, "
        "lora, lora-reparam, oft, rslora, vera, or peft:<adapter_config.json>",
    ),
    (["run", "--methods", "ia3", "--ranks", "8"], "--ranks was given but the only method is ia3"),
    (["run", "--methods", "peft:missing.json"], "peft:missing.json: no such file"),
    (["run", "--preset", "nightly"], "unknown preset 'nightly'; choose from"),
    (["run", "--ranks", "0"], "rank must be a whole number >= 1, got 0"),
    (["run", "--ranks", "-4"], "rank must be a whole number >= 1, got -4"),
    (["run", "--ranks", "two"], "ranks must be whole numbers"),
    (["run", "--methods", "full", "--ranks", "4"], "ranks apply to the methods that take one"),
    (
        ["run", "--methods", "lora", "--ranks", "11", "--models", "cifar-mlp"],
        "rank 11 exceeds the smaller dimension (10)",
    ),
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
    (["run", "--config", "missing.toml"], "--config missing.toml: no such file"),
    (["run", "--retry-failed"], "--retry-failed goes with --resume RUN_DIR"),
    (["run", "--resume", "nowhere"], "--resume nowhere: no plan.json here"),
    (["run", "--shard", "3/2"], "--shard 3/2: need 1 <= K <= N"),
    (["run", "--shard", "half"], "--shard must look like K/N"),
    (["run", "--parallel", "0"], "--parallel must be auto or a whole number >= 1, got 0"),
    (["run", "--parallel", "many"], "--parallel must be auto or a whole number >= 1, got 'many'"),
    (["run", "--parallel", "2", "--device", "cpu"], "--parallel > 1 runs one cell per GPU"),
    (["run", "--cell-memory-limit", "-5"], "--cell-memory-limit must be > 0 MiB"),
    (
        ["run", "--models", "bert-tiny", "--methods", "lora", "--ranks", "4", "--seq-len", "0"],
        "seq_len must be a whole number >= 1",
    ),
    (["merge", "nowhere", "--out", "m"], "nowhere: no readable plan.json"),
    (["run", "--nproc", "0"], "nproc must be a whole number >= 1, got 0"),
    (
        ["run", "--precision", "fp32,fp8"],
        "unknown precision 'fp8'; choose from bf16, bf16-mixed, fp16, fp16-mixed, fp32",
    ),
    (
        ["run", "--methods", "lora", "--ranks", "8", "--quantize", "nf2"],
        "unknown quantization 'nf2'; choose from int8, nf4, none",
    ),
    (["run", "--methods", "full", "--quantize", "nf4"], "--quantize nf4 freezes the base in bits"),
    (["run", "--grad-checkpointing", "maybe"], "unknown grad_checkpointing 'maybe'; choose from off, on"),
    (["run", "--compile", "on,sometimes"], "unknown compile 'sometimes'; choose from off, on"),
    (
        ["run", "--seq-len", "32,x"],
        "argument --seq-len: expected whole numbers separated by commas, got '32,x'",
    ),
    (["run", "--batch-size", "16,0"], "batch_size must be a whole number >= 1, got 0"),
    (["run", "--nproc", "2,x"], "argument --nproc: expected whole numbers separated by commas, got '2,x'"),
    (["run", "--nproc", str((os.cpu_count() or 1) + 1)], "CPU cores (a rank needs one at least)"),
    (["run", "--nproc", "2", "--strategy", "zero3"], "unknown strategy 'zero3'; choose from ddp, fsdp2"),
    (
        ["run", "--strategy", "fsdp2"],
        "--strategy applies to cells of several processes; give --nproc 2 or more",
    ),
    (
        ["run", "--nproc", "2", "--samples", "40", "--batch-size", "32"],
        "at least batch_size x grad_accum x nproc (64)",
    ),
    (
        ["run", "--target-accuracy", "1.5"],
        "argument --target-accuracy: expected an accuracy above 0 and at most 1",
    ),
    (["report", "r", "--target-loss", "0"], "argument --target-loss: expected a loss above 0, such as 0.5"),
    (
        ["report", "r", "--target-accuracy", "0.9", "--target-loss", "1"],
        "argument --target-loss: not allowed with argument --target-accuracy",
    ),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(cli, in_tmp, argv, message, capsys):
    try:
        code, _, err = cli(*argv)
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        code, err = e.code, capsys.readouterr().err
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


CONFIGS = [
    ('models = "cifar-mlp"\n', "models must be a list of model names, got 'cifar-mlp'"),
    ("ranks = [1, 2.5]\n", "ranks must be a list of whole numbers"),
    ("epochs = 3\n", "unknown key(s) epochs; accepted: methods, models, preset, ranks, repeat, settings"),
    ("[settings]\nepochz = 3\n", "unknown setting(s) epochz"),
    ('[settings]\nepochs = "three"\n', "epochs must be a whole number, got 'three'"),
    ('[settings]\ndropout = "x"\n', "dropout must be a number, got 'x'"),
    ("[settings]\nrank = 4\n", "rank is an axis of the matrix"),
    ("models = [\n", "not valid TOML"),
]


@pytest.mark.parametrize("text, message", CONFIGS)
def test_bad_config_files_are_refused_in_one_line(cli, in_tmp, text, message):
    (in_tmp / "c.toml").write_text(text)
    code, out, err = cli("run", "--config", "c.toml")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert files_under(in_tmp) == ["c.toml"]


def test_config_file_sets_the_matrix_and_flags_override_it(cli, in_tmp):
    (in_tmp / "c.toml").write_text(
        'models = ["cifar-mlp"]\nmethods = ["full", "lora-reparam"]\nranks = [1, 4]\n'
        "[settings]\nbatch_size = 8\nsamples = 64\nepochs = 3\n"
    )
    code, out, err = cli("run", "--config", "c.toml", "--dry-run", "--epochs", "5")
    assert code == 0, err
    assert "lora-reparam r=4" in out and "| 0+5" not in out and "| 1+5" in out and "|       8 |" in out
    assert "3 cells on cpu" in out


def test_resume_refuses_matrix_flags(cli, in_tmp):
    (in_tmp / "r").mkdir()
    code, out, err = cli("run", "--resume", "r", "--models", "bert-tiny")
    assert code == 2 and "--resume takes its cells from RUN_DIR/plan.json; drop --models" in err


def test_check_reports_a_failing_check_with_exit_1(monkeypatch, capsys):
    from lorabench import check, cli

    monkeypatch.setattr(
        check, "clock", lambda: check.Check("clock: 200 ms sleep", "350.0 ms", "200 to 220 ms", False)
    )
    monkeypatch.setattr(check, "host_rss", lambda: check.Check("host", "x", "x", True))
    monkeypatch.setattr(check, "step_time", lambda device: check.Check("step time", "x", "x", True))
    code = cli.main(["check", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1 and "1 of 7 checks FAILED" in out and "| FAIL" in out


def test_a_model_fsdp2_cannot_wrap_is_refused_before_anything_runs(cli, in_tmp, monkeypatch):
    from lorabench.workload import distributed

    monkeypatch.setattr(distributed, "units", lambda module: [])  # a model with no blocks and no Linear
    code, out, err = cli(
        "run", "--models", "cifar-mlp", "--methods", "full", "--nproc", "2", "--strategy", "fsdp2"
    )
    assert code == 2 and "FSDP2 cannot wrap cifar-mlp" in err and len(err.strip().splitlines()) == 1
    assert files_under(in_tmp) == []


def test_list_shows_every_method_and_axis(cli):
    code, out, err = cli("list")
    assert code == 0
    for name in ("dora", "rslora", "loha", "lokr", "ia3", "vera", "adalora", "oft", "boft", "peft:<path>"):
        assert f"\n  {name} " in out, name
    for flag in (
        "--precision",
        "--grad-checkpointing",
        "--compile",
        "--quantize",
        "--seq-len",
        "--batch-size",
        "--nproc",
        "--strategy",
    ):
        assert f"\n  {flag} " in out, flag
    assert "knobs" in out and "peft-methods" in out and "scale" in out


def test_the_slurm_example_is_a_command_line_lorabench_accepts():
    """examples/slurm-array.sbatch: its `lorabench run` parses, and its shard spec is K/N."""
    import shlex
    from pathlib import Path

    from lorabench.parser import build_parser

    text = (Path(__file__).parents[2] / "examples" / "slurm-array.sbatch").read_text()
    line = text.split("lorabench run ", 1)[1].split("\n\n")[0].replace("\\\n", " ")
    argv = [
        a.replace("${SLURM_ARRAY_TASK_ID}", "2").replace("${SLURM_ARRAY_TASK_COUNT}", "4")
        for a in shlex.split(line)
    ]
    args = build_parser().parse_args(["run", *argv])
    assert args.preset == ["scale"] and args.shard == "2/4" and str(args.out) == "shards/2"


def test_fit_memory_plans_for_a_gpu_this_machine_lacks_with_the_runtime_context_check_measured(
    cli, tmp_path, monkeypatch
):
    """No GPU here: a dry run against --fit-memory on cuda still plans (nothing runs on it); the GPU
    runtime context is added once `lorabench check` has recorded one, and said missing before."""
    import torch

    from lorabench.measure import calibration

    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    asked = (
        "run",
        "--dry-run",
        "--device",
        "cuda",
        "--models",
        "tiny-llama",
        "--methods",
        "full,lora",
        "--ranks",
        "8",
    )
    code, out, err = cli(*asked, "--fit-memory", "48MiB")
    # predicted peaks: full 46.4 MiB, LoRA 38.6 MiB
    assert code == 0 and "tiny-llama lora r=8:" not in out and "tiny-llama full:" not in out
    assert "the GPU runtime context is not in the predicted needs" in err
    calibration.record_context("NVIDIA H200", calibration.CHECK, 500 * 2**20, torch.__version__)
    code, out, err = cli(*asked, "--fit-memory", "542MiB")
    assert code == 0 and "runtime context measured on NVIDIA H200: 500 MiB" in err
    assert (
        "- tiny-llama full: predicted to need 0.53 GiB (simulated step + the runtime context, 500 MiB); "
        "--fit-memory: 0.53 GiB" in out
    )
    assert "tiny-llama lora r=8:" not in out  # 538.6 MiB: it fits
    if not torch.cuda.is_available():  # without --fit-memory, a GPU this machine lacks is refused as before
        code, _, err = cli(*asked)
        assert code == 2 and "torch sees no GPU here" in err


def test_runtime_contexts_keep_the_newest_per_device_and_kind_and_the_largest_across_devices(
    tmp_path, monkeypatch
):
    from lorabench.measure import calibration

    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path))
    assert calibration.context(calibration.CHECK) is None
    calibration.path().write_text("{not json")  # a damaged file is no record, not a crash
    assert calibration.known() == {} and calibration.context(calibration.CHECK) is None
    calibration.record_context("NVIDIA A100-SXM4-80GB", calibration.CHECK, 600 * 2**20, "2.14")
    calibration.record_context("NVIDIA H200", calibration.CHECK, 500 * 2**20, "2.14")
    calibration.record_context("NVIDIA A100-SXM4-80GB", calibration.CHECK, 450 * 2**20, "2.15")  # replaced
    assert calibration.context(calibration.CHECK) == ("NVIDIA H200", calibration.CHECK, 500 * 2**20)
    assert calibration.known()["NVIDIA A100-SXM4-80GB"]["torch"] == "2.15"
    calibration.record_energy_update("NVIDIA H200", 0.1, "2.15")  # another fact: the contexts stay
    assert calibration.known()["NVIDIA H200"]["contexts"] == {calibration.CHECK: 500 * 2**20}
    assert calibration.energy_update_s("NVIDIA H200") == 0.1 and calibration.energy_update_s("L4") is None
    assert calibration.context("transformer, bfloat16", kind="rocm") is None


def test_no_gpu_says_what_the_driver_sees_when_torch_cannot_use_it(monkeypatch):
    """A registry torch built for a newer CUDA than the runner's driver: torch sees no GPU, NVML does.
    The refusal names both, so the fix (another torch build) is in the message."""
    import sys

    import torch
    from fakes import FakeGPU, FakeNVML

    from lorabench.measure import environment

    if torch.cuda.is_available() or not torch.version.cuda:
        pytest.skip("needs a CUDA build of torch that sees no GPU")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([FakeGPU()]))
    assert environment.no_gpu_reason() == (
        f"torch sees no GPU here (torch {torch.__version__}, CUDA {torch.version.cuda} build); the driver sees "
        "1 GPU(s) (driver 550.54.15, CUDA 12.4): install the torch build for that CUDA "
        "(https://pytorch.org/get-started/locally/)"
    )

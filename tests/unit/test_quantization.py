"""QLoRA: a base held in 4 or 8 bits, its predicted bytes, and the cells that cannot have one."""

import sys

import pytest

from lorabench.plan.cells import Cell, CellError
from lorabench.plan.survey import survey
from lorabench.workload import models, quantization


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"method": "full", "quantize": "nf4"},
            "--quantize nf4 freezes the base in bits: it needs an adapter method",
        ),
        (
            {"method": "lora", "rank": 8, "quantize": "fp4"},
            "unknown quantization 'fp4'; choose from int8, nf4, none",
        ),
        ({"method": "lora", "rank": 8, "quantize": "int8", "nproc": 2}, "--quantize runs in one process"),
    ],
)
def test_bad_quantization_is_refused(fields, message):
    with pytest.raises(CellError, match=message):
        Cell(model="cifar-mlp", **fields)


def test_the_prediction_holds_the_quantised_layers_in_bits_and_the_rest_as_they_are():
    fp32 = survey(Cell(model="cifar-mlp", method="lora", rank=8)).prediction.weights_bytes
    nf4 = survey(Cell(model="cifar-mlp", method="lora", rank=8, quantize="nf4")).prediction.weights_bytes
    int8 = survey(Cell(model="cifar-mlp", method="lora", rank=8, quantize="int8")).prediction.weights_bytes
    fc1, fc2 = 4096 * 3072, 2048 * 4096  # the head (fc3), biases and adapters stay fp32
    rest = fp32 - (fc1 + fc2) * 4
    blocks = lambda n: -(-n // 64)
    assert nf4 == rest + sum(n // 2 + blocks(n) + -(-blocks(n) // 256) * 4 for n in (fc1, fc2))
    assert int8 == rest + fc1 + fc2 + (4096 + 2048) * 4
    assert quantization.targets(models.build("cifar-mlp").module) == ["fc1", "fc2"]


def test_without_bitsandbytes_a_quantised_cell_is_skipped_with_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # how Python spells "not importable"
    why = quantization.unsupported("nf4", "cpu")
    assert (
        why == "--quantize nf4 cannot run on cpu: ImportError: bitsandbytes is not installed (pip install "
        "'lorabench[quant]')"
    )
    assert quantization.unsupported("none", "cpu") is None


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantised_lora_cell_trains_and_holds_what_was_predicted(kind):
    pytest.importorskip("bitsandbytes")
    from lorabench.run.experiment import execute

    for model in ("cifar-mlp", "bert-tiny"):
        cell = Cell(
            model=model,
            method="lora",
            rank=8,
            quantize=kind,
            samples=64,
            eval_samples=32,
            batch_size=16,
            seq_len=16,
            epochs=1,
            warmup_epochs=0,
        )
        row = execute(cell, known=survey(cell).prediction.to_metrics())
        assert row.ok, row.error
        m = row.metrics
        assert m["weights_bytes"] == pytest.approx(m["predicted_weights_bytes"], rel=0.01)
        assert (
            m["check_adapter_off_vs_base_max_abs_diff"] == 0.0
        )  # the quantised base is untouched by training
        assert m["params_trainable"] == {"cifar-mlp": 122_960, "bert-tiny": 8_450}[model]


def test_an_int8_weight_is_quantised_wherever_it_sits_not_only_on_a_move_from_the_cpu():
    """bitsandbytes' Int8Params quantises in `.to()` only when the weight moves from the CPU: a model
    already on a GPU kept fp32 weights (4x the bytes). The meta device is the other device this
    machine has; the weight must come out int8 with its per-row scales all the same."""
    pytest.importorskip("bitsandbytes")
    import torch

    with torch.device("meta"):
        linear = torch.nn.Linear(256, 128)
    q = quantization._layer("int8", linear, "meta")
    assert q.weight.dtype == torch.int8 and q.weight.device.type == "meta"
    assert q.weight.SCB.shape == (128,) and q.weight.SCB.dtype == torch.float32
    assert q.weight.CB is q.weight.data or q.weight.CB.data_ptr() == q.weight.data.data_ptr()
    assert quantization.weight_bytes([q.weight]) == 256 * 128 + 128 * 4


def test_an_int8_layer_is_quantised_on_the_device_it_will_live_on():
    """Quantised on the CPU and then moved, a layer keeps the parameter object (`Module.to` swaps its
    data) and with it the codes and scales bitsandbytes keeps beside it, on the CPU: the GPU's first
    forward then reads CPU tensors. Built for `device`, everything it holds is there."""
    pytest.importorskip("bitsandbytes")
    import torch

    q = quantization._layer("int8", torch.nn.Linear(64, 32), "meta")
    held = [q.weight, q.weight.CB, q.weight.SCB, q.bias]
    assert {t.device.type for t in held} == {"meta"}


def test_an_int8_layer_quantised_in_place_computes_what_the_fp32_one_does():
    pytest.importorskip("bitsandbytes")
    import torch

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    q = quantization._layer("int8", linear, "cpu")
    x = torch.randn(8, 64)
    assert q.weight.dtype == torch.int8
    torch.testing.assert_close(q(x).float(), linear(x), atol=0.05, rtol=0.05)

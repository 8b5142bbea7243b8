import pytest
import torch
from torch import nn

from lorabench.plan.cells import Cell
from lorabench.workload import models
from lorabench.workload.methods import METHODS, count_params, match_targets
from lorabench.workload.reparam import LoRAParametrization, set_reparam_enabled
from lorabench.workload.tasks import TASKS


def apply(bundle, cell):
    return METHODS[cell.method].apply(bundle, cell.adapter)


def small_mlp():
    return models.Bundle(
        nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), TASKS["image-classification"], ("0", "2")
    )


def test_reparam_is_w_plus_ba_times_scale():
    p = LoRAParametrization(out_features=5, in_features=6, rank=2, alpha=4)
    assert p.lora_A.shape == (2, 6) and p.lora_B.shape == (5, 2)
    assert torch.count_nonzero(p.lora_B) == 0
    w = torch.randn(5, 6)
    with torch.no_grad():
        p.lora_B.normal_()
    assert torch.allclose(p(w), w + (p.lora_B @ p.lora_A) * 2.0)
    p.enabled = False
    assert torch.equal(p(w), w)


def test_reparam_leaves_the_model_unchanged_until_trained_and_freezes_the_base():
    torch.manual_seed(0)
    bundle = small_mlp()
    x = torch.randn(4, 6)
    before = bundle.module(x)
    adapted = apply(bundle, Cell(model="cifar-mlp", method="lora-reparam", rank=2))
    assert torch.equal(adapted.module(x), before)
    trainable = {n for n, p in adapted.module.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.parametrizations.weight.0.lora_{m}" for i in (0, 2) for m in "AB"}
    assert count_params(adapted.module).adapter == 2 * (6 + 5) + 2 * (5 + 3)


def test_reparam_switch_off_gives_the_base_model_after_training():
    torch.manual_seed(0)
    bundle = small_mlp()
    x = torch.randn(8, 6)
    base = bundle.module(x).detach()
    m = apply(bundle, Cell(model="cifar-mlp", method="lora-reparam", rank=2)).module
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(m(x), base)
    set_reparam_enabled(m, False)
    assert torch.allclose(m(x), base)
    set_reparam_enabled(m, True)
    assert not torch.allclose(m(x), base)


def test_full_unfreezes_everything():
    bundle = small_mlp()
    bundle.module.requires_grad_(False)
    p = apply(bundle, Cell(model="cifar-mlp", method="full")).params
    assert p.trainable == p.total == 6 * 5 + 5 + 5 * 3 + 3 and p.adapter == 0


def test_target_matching_follows_peft():
    with torch.device("meta"):
        m = models.build("bert-tiny").module
    names = match_targets(m, ("query", "value"))
    assert names == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]
    assert match_targets(m, r".*\.1\..*query") == ["bert.encoder.layer.1.attention.self.query"]
    assert match_targets(m, ("uery",)) == []  # suffix match is on whole name parts


PEFT_NAMES = ["lora", "dora", "rslora", "loha", "lokr", "ia3", "vera", "adalora", "oft", "boft"]


def build(model, method, rank=8, **fields):
    cell = Cell(model=model, method=method, rank=rank if METHODS[method].ranked else None, **fields)
    return METHODS[method].apply(models.build(model, "random", None), cell.adapter)


@pytest.mark.parametrize("name", PEFT_NAMES)
def test_every_peft_method_counts_what_peft_counts_split_into_adapters_and_full(name):
    adapted = build("bert-tiny", name)
    trainable, total = adapted.module.get_nb_trainable_parameters()
    p = adapted.params
    assert (p.trainable, p.total) == (trainable, total)
    assert p.full_trained == 2 * 128 + 2  # the SEQ_CLS head (128 x 2 + 2), trained in full beside any adapter
    assert p.adapter == trainable - p.full_trained > 0


def test_dora_adds_one_magnitude_per_output_feature_of_each_adapted_linear():
    # BERT-Tiny r=8 on query, value of 2 layers: LoRA's 4 x 8 x (128 + 128), plus 4 x 128 magnitudes, plus the head
    assert build("bert-tiny", "dora").params.trainable == 4 * 8 * 256 + 4 * 128 + 258 == 8_962
    # IA3 on PEFT's own BERT defaults: a scale per output feature of key, value and attention.output.dense,
    # and per input feature of the feed-forward output.dense (intermediate 512), in each of 2 layers
    assert build("bert-tiny", "ia3").params.adapter == 2 * (3 * 128 + 512) == 1_792


def test_adalora_spreads_its_rank_schedule_over_the_cells_steps():
    cell = Cell(
        model="bert-tiny", method="adalora", rank=8, samples=512, batch_size=32, epochs=2, warmup_epochs=1
    )
    assert cell.adapter.steps == 512 // 32 * 3
    module = METHODS["adalora"].apply(models.build("bert-tiny", "random", None), cell.adapter).module
    assert module.peft_config["default"].total_step == 48
    assert METHODS["adalora"].step_hook(module) == module.base_model.update_and_allocate
    assert (
        METHODS["dora"].step_hook(build("bert-tiny", "dora").module) is None
    )  # nothing to call between steps


def test_a_peft_adapter_config_file_is_a_method_with_its_own_targets(tmp_path):
    from peft import LoraConfig

    from lorabench.workload.methods import MethodError, method

    LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value"], use_dora=True).save_pretrained(
        tmp_path
    )
    m = method(f"peft:{tmp_path}")  # the folder, or its adapter_config.json
    assert not m.ranked and set(method(f"peft:{tmp_path / 'adapter_config.json'}").targets) == {
        "query",
        "key",
        "value",
    }
    adapted = m.apply(
        models.build("bert-tiny", "random", None), Cell(model="bert-tiny", method=f"peft:{tmp_path}").adapter
    )
    assert adapted.params.adapter == 6 * (4 * 256 + 128)  # q, k, v of 2 layers: A, B and DoRA's magnitudes
    assert len(adapted.targets) == 6
    (tmp_path / "bad.json").write_text('{"peft_type": "MAGIC"}')
    with pytest.raises(MethodError, match="peft_type 'MAGIC' is not a method PEFT knows"):
        method(f"peft:{tmp_path / 'bad.json'}")
    (tmp_path / "notjson.json").write_text("r = 8")
    with pytest.raises(MethodError, match="not a JSON adapter_config.json"):
        method(f"peft:{tmp_path / 'notjson.json'}")

import torch
from torch import nn

from lorabench import models
from lorabench.cells import Cell
from lorabench.methods import METHODS, LoRAParametrization, count_params, match_targets, set_reparam_enabled
from lorabench.tasks import TASKS


def apply(bundle, cell):
    return METHODS[cell.method].apply(bundle, cell.adapter)


def small_mlp():
    return models.Bundle(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), TASKS["image-classification"], ("0", "2"))


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
    assert names == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
                     "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    assert match_targets(m, r".*\.1\..*query") == ["bert.encoder.layer.1.attention.self.query"]
    assert match_targets(m, ("uery",)) == []   # suffix match is on whole name parts

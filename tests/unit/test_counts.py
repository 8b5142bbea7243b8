"""Parameter counts by closed form: LoRA adds r * (in + out) per adapted Linear."""

import pytest

from lorabench.plan.cells import Cell
from lorabench.plan.presets import expand
from lorabench.plan.survey import survey
from lorabench.workload.methods import MethodError


def inspect(cell):
    return survey(cell, simulate=False).params  # counts: no step to simulate


MLP_LINEARS = [(3072, 4096), (4096, 2048), (2048, 10)]
MLP_TOTAL = sum(i * o + o for i, o in MLP_LINEARS)


def bert_total(layers, hidden, inter, vocab=30522, positions=512, types=2, labels=2):
    emb = (vocab + positions + types) * hidden + 2 * hidden
    attn = 4 * (hidden * hidden + hidden) + 2 * hidden
    ffn = hidden * inter + inter + inter * hidden + hidden + 2 * hidden
    pooler = hidden * hidden + hidden
    return emb + layers * (attn + ffn) + pooler + hidden * labels + labels


def test_mlp_total_matches_the_seed():
    assert MLP_TOTAL == 20_998_154
    assert inspect(Cell(model="cifar-mlp", method="full")).total == MLP_TOTAL


@pytest.mark.parametrize("method", ["lora", "lora-reparam"])
@pytest.mark.parametrize("rank", [1, 2, 8])
def test_mlp_lora_adds_r_times_in_plus_out(method, rank):
    p = inspect(Cell(model="cifar-mlp", method=method, rank=rank))
    added = sum(rank * (i + o) for i, o in MLP_LINEARS)
    assert p.adapter == p.trainable == added
    assert p.full_trained == 0
    assert p.total == MLP_TOTAL + added


def test_seed_002_counts():
    p = inspect(Cell(model="cifar-mlp", method="lora-reparam", rank=1, alpha=1))
    assert (p.trainable, p.total) == (15_370, 21_013_524)
    assert round(p.trainable_pct, 3) == 0.073


@pytest.mark.parametrize("model, shape", [("bert-tiny", (2, 128, 512)), ("bert-base", (12, 768, 3072))])
@pytest.mark.parametrize("rank", [2, 8])
def test_bert_lora_counts(model, shape, rank):
    layers, hidden, inter = shape
    total = bert_total(layers, hidden, inter)
    assert inspect(Cell(model=model, method="full")).trainable == total
    p = inspect(Cell(model=model, method="lora", rank=rank))
    adapters = layers * 2 * rank * (hidden + hidden)  # query and value, hidden x hidden each
    head = hidden * 2 + 2  # PEFT trains the classifier for SEQ_CLS
    assert (p.adapter, p.full_trained, p.trainable) == (adapters, head, adapters + head)
    # PEFT keeps the frozen original head and trains a copy (modules_to_save), so it counts twice.
    assert p.total == total + adapters + head


def test_seed_bert_published_counts():
    assert inspect(Cell(model="bert-tiny", method="full")).total == 4_386_178
    assert inspect(Cell(model="bert-base", method="full")).total == 109_483_778
    assert inspect(Cell(model="bert-tiny", method="lora", rank=8)).trainable == 8_450
    assert inspect(Cell(model="bert-base", method="lora", rank=8)).trainable == 296_450


def test_quick_preset_counts_by_closed_form():
    for cell in expand():
        p = inspect(cell)
        if cell.model == "cifar-mlp":
            expected = MLP_TOTAL if cell.rank is None else sum(cell.rank * (i + o) for i, o in MLP_LINEARS)
        else:
            expected = bert_total(2, 128, 512) if cell.rank is None else 2 * 2 * cell.rank * 256 + 258
        assert p.trainable == expected, cell.label


def test_rank_above_a_targets_smaller_dimension_is_refused():
    with pytest.raises(MethodError, match=r"rank 11 exceeds the smaller dimension \(10\) of target fc3"):
        inspect(Cell(model="cifar-mlp", method="lora", rank=11))


def test_a_target_matching_nothing_lists_the_linear_modules():
    with pytest.raises(
        MethodError, match="matches no Linear module of bert-tiny; its Linear modules end in: .*query"
    ):
        inspect(Cell(model="bert-tiny", method="lora", rank=4, targets=("qkv",)))

import dataclasses
import math
import re

import pytest

from lorabench.plan.axes import MATRIX_FIELDS
from lorabench.plan.cells import Cell, CellError
from lorabench.plan.presets import PRESETS, Matrix, expand
from lorabench.plan.survey import survey_all
from lorabench.workload.methods import METHODS


def test_full_cell_defaults_are_valid():
    c = Cell(model="cifar-mlp", method="full")
    assert c.rank is None and c.scale is None and c.label == "full"


def test_lora_scale_defaults_to_one_and_honours_alpha():
    assert Cell(model="bert-tiny", method="lora", rank=8).scale == 1.0
    assert Cell(model="bert-tiny", method="lora", rank=8, alpha=16).scale == 2.0
    assert Cell(model="bert-tiny", method="lora", rank=4).label == "lora r=4"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model": "gpt-17"}, "unknown model 'gpt-17'; choose from bert-base, bert-tiny"),
        (
            {"method": "qlora", "rank": 4},
            "unknown method 'qlora'; choose from adalora, boft, dora, full, ia3",
        ),
        ({"method": "ia3", "rank": 4}, "a rank was given to IA3"),
        ({"method": "full", "rank": 4}, "a rank was given to full fine-tuning"),
        ({"method": "lora"}, "needs a rank"),
        ({"method": "lora", "rank": 0}, "rank must be a whole number >= 1, got 0"),
        ({"method": "lora", "rank": -3}, "rank must be a whole number >= 1"),
        ({"method": "lora", "rank": 2.5}, "rank must be a whole number, got 2.5"),
        ({"epochs": 0}, "epochs must be a whole number >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
        ({"warmup_epochs": -1}, "warmup_epochs must be a whole number >= 0"),
        ({"samples": 8, "batch_size": 16}, "samples (8) must be at least batch_size x grad_accum (16)"),
        ({"device": "tpu"}, "unknown device 'tpu'; choose from cpu, cuda"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"lr": 0}, "lr must be a number > 0"),
        ({"method": "lora", "rank": 4, "dropout": 1.0}, "dropout must be in [0, 1)"),
        (
            {"method": "full", "targets": ("query",)},
            "targets and modules_to_save apply to the adapter methods only",
        ),
    ],
)
def test_invalid_cells_say_why(fields, message):
    base = {"model": "cifar-mlp", "method": "full"}
    with pytest.raises(CellError, match=None) as e:
        Cell(**{**base, **fields})
    assert message in str(e.value)


def test_byo_model_names_are_accepted():
    assert Cell(model="hf:/some/dir", method="full").model == "hf:/some/dir"


def test_matrix_expands_full_once_and_lora_per_rank():
    cells = Matrix(("cifar-mlp", "bert-tiny"), ("full", "lora", "lora-reparam"), (1, 4, 16)).cells()
    assert len(cells) == 2 * (1 + 3 + 3)
    assert [(c.method, c.rank) for c in cells[:7]] == [
        ("full", None),
        ("lora", 1),
        ("lora", 4),
        ("lora", 16),
        ("lora-reparam", 1),
        ("lora-reparam", 4),
        ("lora-reparam", 16),
    ]


def test_matrix_without_ranks_for_lora_is_refused():
    with pytest.raises(CellError, match="need at least one rank"):
        Matrix(("cifar-mlp",), ("lora",)).cells()


def test_quick_preset_is_two_models_full_and_two_ranks():
    cells = expand()
    assert [(c.model, c.label) for c in cells] == [
        ("cifar-mlp", "full"),
        ("cifar-mlp", "lora r=2"),
        ("cifar-mlp", "lora r=8"),
        ("bert-tiny", "full"),
        ("bert-tiny", "lora r=2"),
        ("bert-tiny", "lora r=8"),
    ]
    assert {c.samples for c in cells} == {512}


def test_models_replace_the_presets_models_keeping_its_shape():
    cells = expand(models=["bert-base"])
    assert {c.model for c in cells} == {"bert-base"}
    assert [c.label for c in cells] == ["full", "lora r=2", "lora r=8"]


def test_models_filter_a_preset_that_names_them():
    cells = expand(models=["bert-tiny"])
    assert {c.model for c in cells} == {"bert-tiny"} and len(cells) == 3


def test_axis_and_field_overrides():
    cells = expand(methods=["lora-reparam"], ranks=[1], overrides={"epochs": 3, "device": "cpu"})
    assert [(c.model, c.label, c.epochs) for c in cells] == [
        ("cifar-mlp", "lora-reparam r=1", 3),
        ("bert-tiny", "lora-reparam r=1", 3),
    ]


def test_methods_full_alone_drops_the_presets_ranks():
    assert [c.label for c in expand(methods=["full"])] == ["full", "full"]


def test_ranks_with_full_only_is_refused():
    with pytest.raises(CellError, match="only method is full"):
        expand(methods=["full"], ranks=[4])


def test_unknown_preset_and_setting_are_refused():
    with pytest.raises(CellError, match="unknown preset 'nope'; choose from"):
        expand(["nope"])
    with pytest.raises(CellError, match="unknown setting"):
        expand(overrides={"epochz": 3})


def test_repeat_makes_distinct_cells_and_duplicates_collapse():
    cells = expand(repeat=3)
    assert len(cells) == 18 and len({c.key() for c in cells}) == 18
    assert len(expand(["quick", "quick"])) == 6


def test_key_is_stable_and_covers_every_field():
    a = Cell(model="bert-tiny", method="lora", rank=8)
    assert a.key() == Cell(model="bert-tiny", method="lora", rank=8).key()
    byo = dataclasses.replace(a, model="hf:/models/x")
    assert dataclasses.replace(byo, task="causal-lm").key() != byo.key()
    for f in dataclasses.fields(Cell):
        if f.name in ("model", "method", "rank", "task", "strategy", "quantize"):
            continue
        changed = {
            "nproc": 2,
            "grad_checkpointing": "on",
            "precision": "bf16-mixed",
            "compile": "on",
            "optimizer": "sgd",
            "alpha": 4.0,
            "dropout": 0.1,
            "targets": ("query",),
            "modules_to_save": ("classifier",),
            "batch_size": 8,
            "grad_accum": 2,
            "seq_len": 32,
            "epochs": 3,
            "warmup_epochs": 0,
            "samples": 1024,
            "eval_samples": 64,
            "lr": 1e-4,
            "device": "cuda",
            "dtype": "bfloat16",
            "seed": 1,
            "weights": "pretrained",
            "data": "/data",
            "repeat": 1,
            "pretrain_epochs": 2,
            "eval_every": 4,
        }[f.name]
        assert dataclasses.replace(a, **{f.name: changed}).key() != a.key(), f.name
    assert dataclasses.replace(a, quantize="nf4").key() != a.key()
    two = dataclasses.replace(a, nproc=2)
    assert two.strategy == "ddp" and dataclasses.replace(two, strategy="fsdp2").key() != two.key()


def test_a_cell_of_one_process_keeps_the_key_it_had_before_nproc_existed():
    """Older run directories resume and compare: the new fields are left out at their default."""
    cell = Cell(model="bert-tiny", method="lora", rank=8)
    assert not {
        "nproc",
        "strategy",
        "grad_checkpointing",
        "precision",
        "quantize",
        "compile",
        "eval_every",
    } & set(cell.to_dict())
    assert Cell.from_dict(cell.to_dict()) == cell
    two = Cell(model="bert-tiny", method="lora", rank=8, nproc=2, strategy="fsdp2")
    assert two.to_dict()["nproc"] == 2 and Cell.from_dict(two.to_dict()) == two
    assert two.label == "lora r=8 fsdp2 n=2"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"nproc": 0}, "nproc must be a whole number >= 1, got 0"),
        ({"nproc": 2, "strategy": "zero3"}, "unknown strategy 'zero3'; choose from ddp, fsdp2"),
        ({"strategy": "ddp"}, "--strategy ddp applies to cells of several processes; give --nproc 2 or more"),
        ({"grad_checkpointing": "yes"}, "unknown grad_checkpointing 'yes'; choose from off, on"),
        ({"compile": "max-autotune"}, "unknown compile 'max-autotune'; choose from off, on"),
    ],
)
def test_bad_process_settings_are_refused(fields, message):
    with pytest.raises(CellError, match=re.escape(message)):
        Cell(model="cifar-mlp", method="full", **fields)


def test_nproc_and_strategy_lists_are_axes_and_one_process_shares_nothing():
    from lorabench.plan.presets import expand

    cells = expand(["quick"], ["cifar-mlp"], ["full"], None, {"nproc": (1, 2), "strategy": ("ddp", "fsdp2")})
    assert [c.label for c in cells] == ["full", "full ddp n=2", "full fsdp2 n=2"]
    with pytest.raises(CellError, match="--strategy applies to cells of several processes"):
        expand(["quick"], ["cifar-mlp"], ["full"], None, {"strategy": ("fsdp2",)})


def test_round_trip_through_dict():
    c = Cell(model="bert-tiny", method="lora", rank=8, targets=("query",), modules_to_save=("classifier",))
    assert Cell.from_dict(c.to_dict()) == c
    assert Cell.from_dict({**c.to_dict(), "targets": ["query"]}).key() == c.key()
    with pytest.raises(CellError, match="unknown cell field"):
        Cell.from_dict({**c.to_dict(), "bogus": 1})


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_expands_to_its_closed_form_count_and_every_cell_builds(name):
    # full once per model, each adapting method once per rank: models x (baselines + ranks x adapters),
    # times the process axis: one cell in one process, one per strategy for each larger count
    def processes(mx):
        nproc, strategy = mx.settings.get("nproc", (1,)), mx.settings.get("strategy", ("ddp",))
        others = [
            len(v)
            for k, v in mx.settings.items()
            if k in MATRIX_FIELDS and k not in ("nproc", "strategy") and isinstance(v, (list, tuple))
        ]
        return sum(1 if n == 1 else len(strategy) for n in nproc) * math.prod(others)

    expected = sum(
        len(mx.models) * processes(mx) * sum(len(mx.ranks) if METHODS[m].adapts else 1 for m in mx.methods)
        for mx in PRESETS[name]
    )
    cells = expand([name])
    assert len(cells) == expected > 0
    # each builds on the meta device, or PlanError names it (the simulated step is tested on its own)
    assert len(survey_all(cells, simulate=False)) == expected


def test_shard_assigns_every_cell_exactly_once_balanced_and_deterministic():
    from lorabench.plan.admission import shard

    cells = expand(["quick"], models=["cifar-mlp", "bert-tiny", "bert-base"], ranks=[1, 2, 4, 8])
    costs = [float(i % 7 + 1) for i in range(len(cells))]
    parts = [shard(cells, costs, k, 3) for k in (1, 2, 3)]
    keys = [c.key() for part in parts for c in part]
    assert sorted(keys) == sorted(c.key() for c in cells)  # each cell in exactly one shard
    loads = [sum(costs[cells.index(c)] for c in part) for part in parts]
    assert max(loads) - min(loads) <= max(costs)
    # every machine computes the same partition, whatever order it lists the cells in
    flipped = [shard(list(reversed(cells)), list(reversed(costs)), k, 3) for k in (1, 2, 3)]
    assert [{c.key() for c in p} for p in parts] == [{c.key() for c in p} for p in flipped]
    assert all(part == [c for c in cells if c in part] for part in parts)  # a shard keeps the matrix's order


def test_seq_len_and_batch_size_lists_are_axes():
    cells = expand(["quick"], ["bert-tiny"], ["lora"], [8], {"seq_len": (32, 64), "batch_size": (16, 32)})
    assert sorted((c.seq_len, c.batch_size) for c in cells) == [(32, 16), (32, 32), (64, 16), (64, 32)]
    assert len({c.key() for c in cells}) == 4


def test_precision_is_an_axis_and_dtype_its_older_spelling():
    assert (
        Cell(model="cifar-mlp", method="full", dtype="bfloat16").precision == "bf16"
    )  # --dtype keeps working
    mixed = Cell(model="cifar-mlp", method="full", precision="bf16-mixed")
    assert (mixed.dtype, mixed.compute_dtype, mixed.label) == ("float32", "bfloat16", "full bf16-mixed")
    assert Cell(model="cifar-mlp", method="full", precision="bf16").dtype == "bfloat16"
    with pytest.raises(CellError, match="--dtype float16 and --precision bf16-mixed disagree"):
        Cell(model="cifar-mlp", method="full", precision="bf16-mixed", dtype="float16")
    with pytest.raises(
        CellError, match="unknown precision 'fp8'; choose from bf16, bf16-mixed, fp16, fp16-mixed, fp32"
    ):
        Cell(model="cifar-mlp", method="full", precision="fp8")
    cells = expand(
        ["quick"], ["cifar-mlp"], ["full"], None, {"precision": ("fp32", "bf16-mixed", "fp16-mixed", "bf16")}
    )
    assert [c.precision for c in cells] == ["fp32", "bf16-mixed", "fp16-mixed", "bf16"]


def test_every_cell_field_has_one_entry_in_the_axis_table_and_its_views_read_it():
    from lorabench.plan.axes import AXES, SURVEYED_FIELDS
    from lorabench.plan.cells import CELL_FIELDS

    assert list(AXES) == sorted(CELL_FIELDS, key=list(AXES).index) and set(AXES) == set(CELL_FIELDS)
    assert set(MATRIX_FIELDS) >= {
        "batch_size",
        "seq_len",
        "precision",
        "quantize",
        "compile",
        "nproc",
        "strategy",
    }
    assert (
        "lr" not in SURVEYED_FIELDS and "quantize" in SURVEYED_FIELDS
    )  # cells differing in lr share one survey
    cell = Cell(
        model="bert-tiny",
        method="lora",
        rank=8,
        grad_checkpointing="on",
        precision="bf16-mixed",
        compile="on",
        nproc=2,
    )
    assert cell.label == "lora r=8 ckpt bf16-mixed compiled ddp n=2"
    assert Cell(model="bert-tiny", method="lora", rank=8, quantize="nf4").label == "lora r=8 nf4"
    quiet = Cell(model="bert-tiny", method="lora", rank=8).to_dict()
    assert not {"nproc", "strategy", "precision", "quantize", "compile", "grad_checkpointing"} & set(quiet)


def test_published_weights_are_a_property_of_the_builder_not_of_a_name(monkeypatch):
    from lorabench.workload import models

    assert models.hub_id("bert-tiny") == "prajjwal1/bert-tiny" and models.uses_transformers("bert-tiny")
    assert models.hub_id("hf:./my-model") == "./my-model" and models.uses_transformers("hf:./my-model")

    def build_my_mlp(weights="random"):
        return models.build_cifar_mlp(weights)

    monkeypatch.setitem(models.MODELS, "my-mlp", build_my_mlp)  # a model registered without Hub weights
    assert not models.uses_transformers("my-mlp") and models.hub_id("my-mlp") is None
    with pytest.raises(models.ModelError, match="my-mlp has no published weights"):
        models.check_pretrained("my-mlp")

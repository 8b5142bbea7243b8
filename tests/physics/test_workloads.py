"""The seed workloads: published counts, real-data loaders on small files, bring-your-own models,
and the adapter checks (merge and on/off equivalence) on a real trained cell."""

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import files_under

from lorabench.plan.cells import Cell
from lorabench.plan.presets import expand
from lorabench.plan.survey import survey
from lorabench.run.experiment import execute
from lorabench.workload import data, models
from lorabench.workload.methods import METHODS, match_targets
from lorabench.workload.tasks import task_of_data


def inspect(cell):
    return survey(cell, simulate=False).params  # counts: no step to simulate


def test_seed_001_regex_picks_the_fused_projection_of_blocks_starting_with_1():
    with torch.device("meta"):
        module = models.build("bloom-1b4-zh").module
    names = match_targets(module, r".*\.1.*query_key_value")
    assert [n.split(".")[2] for n in names] == ["1"] + [str(i) for i in range(10, 20)]
    assert all(n.endswith("self_attention.query_key_value") for n in names)


def test_seed_bloom_split_shows_the_embedding_trained_in_full():
    (cell,) = expand(["seed-bloom"])
    p = inspect(cell)
    assert p.adapter == 11 * 8 * (2048 + 3 * 2048)  # 11 blocks, r=8, in 2048, out 6144
    assert p.full_trained == 46145 * 2048  # the whole word embedding
    assert cell.batch_size == 1 and cell.grad_accum == 8 and cell.seq_len == 256


def test_seed_cifar_preset_continues_lora_from_trained_weights():
    full, lora = expand(["seed-cifar-mlp"])
    assert (full.batch_size, full.lr, full.pretrain_epochs) == (8, 1e-3, 0)
    assert (lora.method, lora.rank, lora.alpha, lora.pretrain_epochs) == ("lora-reparam", 1, 1.0, 2)


def test_ranks_preset_sweeps_the_mlp_hidden_layers():
    cells = expand(["ranks"], models=["bert-tiny", "cifar-mlp"])
    mlp = [c for c in cells if c.model == "cifar-mlp" and c.rank == 64]
    assert mlp and inspect(mlp[0]).adapter == 64 * (3072 + 4096 + 4096 + 2048)
    assert sorted({c.rank for c in cells if c.rank}) == [1, 2, 4, 8, 16, 32, 64]


def test_prediction_for_full_fp32_is_16_bytes_per_parameter_plus_activations():
    s = survey(Cell(model="cifar-mlp", method="full", batch_size=8))
    p = s.prediction
    assert (p.weights_bytes, p.grads_bytes, p.optimizer_bytes) == (
        4 * 20_998_154,
        4 * 20_998_154,
        8 * 20_998_154 + 6 * 4,  # and Adam's `step`: a float32 scalar tensor per parameter tensor (6)
    )
    assert p.activations_bytes == 8 * (4096 + 2048 + 10) * 4  # each layer's output, per sample, fp32


@pytest.mark.parametrize("method", ["full", "lora", "lora-reparam"])
def test_counted_flops_of_the_mlp_equal_the_closed_form(method):
    """FlopCounterMode on the meta device against the textbook count: the first layer computes no
    input gradient; re-parametrization pays a full weight gradient and its B A products."""
    from lorabench.measure import flops

    cell = Cell(
        model="cifar-mlp",
        method=method,
        batch_size=8,
        grad_accum=2,
        **({} if method == "full" else {"rank": 4}),
    )
    counted = survey(cell).prediction.flops
    with torch.device("meta"):
        module = METHODS[method].apply(models.build("cifar-mlp"), cell.adapter).module
    closed = flops.closed_form(module, rows=8)
    assert (
        counted.forward == 2 * closed.forward and counted.backward == 2 * closed.backward
    )  # 2 micro-batches
    matmul = 3072 * 4096 + 4096 * 2048 + 2048 * 10
    if method == "full":  # 2N forward, 2N weight gradients, input gradients for all but the first layer
        assert counted.total == 16 * (6 * matmul - 2 * 3072 * 4096)


@pytest.mark.parametrize("model", ["bert-tiny", "bloom-560m"])
def test_transformer_flops_are_counted_and_lora_skips_the_frozen_weight_gradients(model):
    full = survey(Cell(model=model, method="full", batch_size=4, seq_len=32)).prediction.flops
    lora = survey(Cell(model=model, method="lora", rank=8, batch_size=4, seq_len=32)).prediction.flops
    assert full.forward > 0 and lora.forward >= full.forward  # the adapters add a little forward work
    # no weight gradients for frozen weights, and none of anything below the first adapter: about half
    assert 0.4 * full.backward < lora.backward < 0.6 * full.backward


@pytest.mark.parametrize(
    "model,method,tolerance",
    [
        ("cifar-mlp", "full", 0.0),
        ("cifar-mlp", "lora", 0.0),
        ("cifar-mlp", "lora-reparam", 0.0),
        ("bert-tiny", "full", 0.2),
        ("bert-tiny", "lora", 0.2),
        ("bert-tiny", "lora-reparam", 0.2),
        ("tiny-bloom", "full", 0.2),
        ("tiny-bloom", "lora", 0.2),
    ],
)
def test_activation_prediction_matches_what_autograd_saves(model, method, tolerance, local_models):
    """The closed form against the saved-tensor count of a real forward: exact for the MLP (layer
    outputs, A's outputs, re-parametrization's merged weights), within 20 % for Korthikanti et al.'s
    transformer estimate (and its LoRA variant, where frozen Linear layers keep no input). A causal
    LM's fp32 log-probabilities (batch x seq x vocab x 4 bytes) dominate a small-hidden, large-vocab
    model: the tiny Bloom's vocabulary is 50,000."""
    from lorabench.measure.trackers import SavedTensors

    if model == "tiny-bloom":
        model = f"hf:{local_models / 'tiny-bloom'}"
    cell = Cell(
        model=model, method=method, batch_size=16, seq_len=64, **({} if method == "full" else {"rank": 8})
    )
    bundle = models.build(model)
    module = METHODS[method].apply(bundle, cell.adapter).module
    ds = bundle.synthetic(16, 64, eval_samples=8)
    exclude = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *ds.train.values())}
    with SavedTensors(exclude) as saved:
        bundle.task.loss(module, ds.train)
    measured = saved.result()["activations_saved_bytes"]
    predicted = survey(cell).prediction.activations_bytes
    # the MLP's loss also keeps nll_loss's fp32 total weight: 4 bytes the closed form leaves out
    assert abs(predicted - measured) <= tolerance * measured + 4, (predicted, measured)


# ---- real data, from small files the tests write ---------------------------------------------


def write_cifar(root, n_train=20, n_test=10):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n)),
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return d


def test_cifar_loader_reads_the_python_batches_with_the_seed_normalisation(tmp_path):
    d = write_cifar(tmp_path)
    assert data.detect(str(tmp_path)) == "cifar10"
    ds = data.load_cifar10(str(tmp_path), samples=64, eval_samples=8, seed=0)
    assert ds.train["x"].shape == (64, 3, 32, 32) and ds.eval["x"].shape == (8, 3, 32, 32)
    with open(d / "test_batch", "rb") as f:
        raw = pickle.load(f)
    first = torch.tensor(raw[b"data"][0], dtype=torch.float32).reshape(3, 32, 32)
    assert torch.allclose(ds.eval["x"][0], (first / 255 - 0.5) / 0.5)
    assert ds.eval["x"].min() >= -1 and ds.eval["x"].max() <= 1
    assert ds.eval["labels"].tolist() == [int(v) for v in raw[b"labels"][:8]]


def test_cifar_loader_refuses_a_pickle_that_would_run_code(tmp_path):
    d = write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(data.DataError, match="refusing to load builtins.print"):
        data.load_cifar10(str(tmp_path), samples=8, eval_samples=4, seed=0)


def test_text_classification_csv_and_jsonl(tmp_path):
    rows = [
        {"text": f"great movie number {i}" if i % 2 else f"awful film {i}", "label": i % 2} for i in range(40)
    ]
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    jsonl_path = tmp_path / "reviews.jsonl"
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (csv_path, jsonl_path):
        assert data.detect(str(path)) == "text-classification"
        ds = data.load(
            str(path),
            samples=24,
            eval_samples=8,
            seq_len=6,
            seed=0,
            vocab_size=1000,
            num_labels=2,
            tokenizer_source=None,
        )
        assert ds.train["input_ids"].shape == (24, 6) and ds.eval["labels"].shape == (8,)
        assert "word-hash tokenizer" in ds.source
        # "awful film 3" -> 3 words, padded with 0 and masked out
        lengths = ds.train["attention_mask"].sum(1)
        assert (
            set(lengths.tolist()) <= {3, 4}
            and (ds.train["input_ids"][ds.train["attention_mask"] == 0] == 0).all()
        )


def test_a_data_set_saved_by_datasets_loads_like_a_file(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the [hf] extra (datasets) is not installed")
    rows = {"text": [f"word{i % 3} text {i}" for i in range(30)], "label": [i % 2 for i in range(30)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    assert data.detect(str(tmp_path / "saved")) == "text-classification"
    ds = data.load(
        str(tmp_path / "saved"),
        samples=20,
        eval_samples=10,
        seq_len=4,
        seed=0,
        vocab_size=500,
        num_labels=2,
        tokenizer_source=None,
    )
    assert ds.train["input_ids"].shape == (20, 4) and sorted(
        ds.eval["labels"].tolist() + ds.train["labels"].tolist()
    ) == sorted(rows["label"])
    instr = {"instruction": ["say hi"] * 8, "input": [""] * 8, "output": ["hi there"] * 8}
    datasets.Dataset.from_dict(instr).save_to_disk(str(tmp_path / "instr"))
    assert data.detect(str(tmp_path / "instr")) == "instructions"


def test_instruction_jsonl_uses_the_seed_001_template_masking_and_cut(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    recs = [
        {"instruction": f"say {i}", "input": "" if i % 2 else "politely", "output": f"ok {i} " * 3}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert data.seed001_prompt("say 1", "") == "Human: say 1\n\nAssistant: "
    assert data.seed001_prompt("say 2", "politely") == "Human: say 2\npolitely\n\nAssistant: "
    tok = data.HashTokenizer(500)
    ds = data.load_instructions(str(path), tok, seq_len=16, samples=8, eval_samples=4, seed=0)
    assert task_of_data(data.detect(str(path))).name == "causal-lm" and ds.train["input_ids"].shape == (8, 16)
    ids, labels = ds.train["input_ids"][0].tolist(), ds.train["labels"][0].tolist()
    n_prompt = labels.index(next(v for v in labels if v != data.IGNORE_INDEX))
    assert n_prompt in (4, 5)  # "Human: say N\n\nAssistant:" (+ "politely") in words
    assert labels[n_prompt : n_prompt + 7] == ids[n_prompt : n_prompt + 7] and tok.eos_id in labels
    short = data.load_instructions(str(path), tok, seq_len=6, samples=8, eval_samples=4, seed=0)
    assert short.train["input_ids"].shape == (8, 6)  # cut at seq_len


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file or directory"),
        ("a,b\n1,2\n", "columns ['a', 'b']; expected text and label"),
        ('{"text": "x", "label": 0}\nnot json\n', "not valid JSON"),
    ],
)
def test_bad_data_paths_are_refused_in_one_line(cli, in_tmp, content, message):
    name = "data.jsonl" if content and content.startswith("{") else "data.csv"
    if content is not None:
        (in_tmp / name).write_text(content)
    code, out, err = cli("run", "--models", "bert-tiny", "--methods", "full", "--data", name)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert files_under(in_tmp) == ([name] if content is not None else [])


def test_data_of_the_wrong_task_is_refused(cli, in_tmp):
    write_cifar(in_tmp / "cifar")
    code, out, err = cli("run", "--models", "bert-tiny", "--methods", "full", "--data", "cifar")
    assert (
        code == 2
        and "holds cifar10 data (image-classification) but bert-tiny is a sequence-classification" in err
    )


def test_pretrained_weights_offline_are_refused(cli, in_tmp, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(in_tmp / "hf"))
    code, out, err = cli("run", "--models", "bert-tiny", "--methods", "full", "--weights", "pretrained")
    assert code == 2 and "'prajjwal1/bert-tiny' are not in the HF cache and HF_HUB_OFFLINE is set" in err
    code, out, err = cli("run", "--models", "cifar-mlp", "--methods", "full", "--weights", "pretrained")
    assert code == 2 and "cifar-mlp has no published weights" in err


# ---- bring your own model, from a local directory ---------------------------------------------


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("byo")
    BertForSequenceClassification(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=200,
            num_labels=3,
        )
    ).save_pretrained(root / "tiny-bert")
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64)
    ).save_pretrained(root / "tiny-gpt2")
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=50_000)).save_pretrained(
        root / "tiny-bloom"
    )
    return root


def test_byo_sequence_classifier_from_a_local_directory(local_models):
    name = f"hf:{local_models / 'tiny-bert'}"
    p = inspect(Cell(model=name, method="lora", rank=4))
    assert p.adapter == 2 * 2 * 4 * (32 + 32)  # PEFT's BERT defaults: query and value
    row = execute(
        Cell(
            model=name,
            method="lora",
            rank=4,
            samples=32,
            eval_samples=16,
            batch_size=8,
            seq_len=12,
            epochs=1,
            warmup_epochs=0,
        )
    )
    assert row.ok, row.error
    assert row.metrics["params_trainable_adapter"] == p.adapter


def test_byo_causal_lm_infers_its_task_and_trains_pretrained_weights(local_models):
    name = f"hf:{local_models / 'tiny-gpt2'}"
    s = survey(Cell(model=name, method="full"))
    assert s.task == "causal-lm"
    row = execute(
        Cell(
            model=name,
            method="lora",
            rank=2,
            weights="pretrained",
            samples=16,
            eval_samples=8,
            batch_size=4,
            seq_len=16,
            epochs=1,
            warmup_epochs=0,
        )
    )
    assert row.ok, row.error
    assert row.metrics["lora_targets"] == 2  # c_attn of each block (PEFT's GPT-2 default)


def test_byo_task_flag_and_bad_sources(cli, local_models):
    code, out, err = cli(
        "run",
        "--dry-run",
        "--models",
        f"hf:{local_models / 'tiny-gpt2'}",
        "--methods",
        "full",
        "--task",
        "causal-lm",
    )
    assert code == 0, err
    code, out, err = cli("run", "--dry-run", "--models", "hf:/no/such/model", "--methods", "full")
    assert code == 2 and "cannot load a configuration from '/no/such/model'" in err
    code, out, err = cli("run", "--dry-run", "--models", "bert-tiny", "--task", "causal-lm")
    assert code == 2 and "--task applies to hf: models only" in err


# ---- the adapter checks on real trained cells -------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "lora-reparam"])
def test_merged_equals_adapter_and_off_equals_base_after_training(method):
    cell = Cell(
        model="cifar-mlp",
        method=method,
        rank=2,
        samples=64,
        eval_samples=16,
        batch_size=16,
        epochs=1,
        warmup_epochs=0,
        pretrain_epochs=1,
    )
    row = execute(cell)
    assert row.ok, row.error
    m = row.metrics
    assert len(row.pretrain_epochs) == 1
    assert m["check_merged_vs_adapter_max_abs_diff"] < 1e-4
    assert m["check_adapter_off_vs_base_max_abs_diff"] < 1e-5  # the base weights did not move
    assert m["check_adapter_on_vs_base_max_abs_diff"] > 1e-3  # the adapter learned something
    assert 0 < m["adapter_file_bytes"] < 200_000 < 80_000_000 < m["model_file_bytes"]


def test_weights_a_test_trained_and_saved_load_through_weights_pretrained(tmp_path):
    """The real-weights path as a user meets it: a model trained here and saved with
    save_pretrained, named by its directory, starts its cells from what it learnt (a LoRA cell's
    first evaluation, one step in at lr 1e-5, is where the training left it), and random weights
    of the same configuration do not."""
    from transformers import BertConfig, BertForSequenceClassification

    from lorabench.run.train import fit
    from lorabench.workload.tasks import TASKS

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=200, num_labels=3
        )
    )  # fmt: skip
    task = TASKS["sequence-classification"]
    train_on = task.build_data(
        samples=512, eval_samples=128, seq_len=16, seed=1, vocab_size=200, num_labels=3
    )
    trained = fit(
        model, task, train_on, epochs=6, warmup_epochs=0, batch_size=32, lr=3e-3, device=torch.device("cpu")
    )
    assert trained.curve[-1].eval_accuracy > 0.9  # it learnt the task (chance: 1/3)
    model.save_pretrained(tmp_path / "mine")

    def first_accuracy(weights: str) -> float:
        row = execute(
            Cell(
                model=f"hf:{tmp_path / 'mine'}", weights=weights, method="lora", rank=4, lr=1e-5, samples=32,
                eval_samples=64, batch_size=16, seq_len=16, epochs=1, warmup_epochs=0, eval_every=1,
            )
        )  # fmt: skip
        assert row.ok, row.error
        return row.curve[0]["eval_accuracy"]

    assert first_accuracy("pretrained") > 0.85
    assert first_accuracy("random") < 0.6

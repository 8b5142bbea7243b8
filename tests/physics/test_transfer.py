"""Quality on a pretrained base, offline: a base trained on its task's source data once and cached,
a related target task each cell adapts it to, the curve of quality over training time with the
evaluations' time kept out, and what each method forgot of the source task."""

import pytest
import torch

from lorabench.plan.cells import Cell, CellError
from lorabench.run import pretraining
from lorabench.run.experiment import execute
from lorabench.workload import bases, data, models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path))
    return tmp_path


def test_each_task_has_a_source_and_a_related_target_shifted_in_a_stated_way():
    g = lambda: torch.Generator().manual_seed(1)
    # images: the same classes, each prototype moved to 0.31 x the source's + 0.95 x a new direction
    src = data.synthetic_images(2000, 10, 10, g(), data.SOURCE)
    tgt = data.synthetic_images(2000, 10, 10, g(), data.TARGET)
    mean = lambda d, c: d.train["x"][d.train["labels"] == c].mean(0).flatten()
    cos = torch.nn.functional.cosine_similarity(mean(src, 3), mean(tgt, 3), dim=0)
    assert 0.15 < cos < 0.45 and set(tgt.train["labels"].tolist()) == set(range(10))
    # text: a new label rule, class c marked by token 2 + num_labels + c instead of 2 + c
    s = data.synthetic_text_classification(64, 8, 32, 100, 2, g(), data.SOURCE)
    t = data.synthetic_text_classification(64, 8, 32, 100, 2, g(), data.TARGET)
    marker = lambda d: {
        int(tok)
        for ids, y in zip(d.train["input_ids"], d.train["labels"])
        if y == 1
        for tok in ids
        if tok < 6
    }
    assert marker(s) == {3} and marker(t) == {5}
    # causal LM: a shifted distribution of progressions, steps 8-14 instead of 1-7
    steps = lambda d: set((d.train["input_ids"][:, 1] - d.train["input_ids"][:, 0]).remainder(1000).tolist())
    assert steps(data.synthetic_causal_lm(200, 8, 16, 1000, g(), data.SOURCE)) == set(range(1, 8))
    assert steps(data.synthetic_causal_lm(200, 8, 16, 1000, g(), data.TARGET)) == set(range(8, 15))


def test_a_base_is_made_once_kept_by_its_recipe_and_reused(cache):
    spec = Cell(model="tiny-llama", method="full", weights="trained").spec
    small = bases.Source(samples=64, eval_samples=16, epochs=1)
    made = pretraining.ensure(spec, torch.device("cpu"), small)
    assert made.made_s is not None and made.path.parent == cache / "bases" and made.path.exists()
    assert bases.about("tiny-llama", "causal-lm", small)["source_accuracy"] == made.source_accuracy
    again = pretraining.ensure(spec, torch.device("cpu"), small)
    assert again.made_s is None and again.path == made.path and again.source_accuracy == made.source_accuracy
    other = bases.Source(samples=64, eval_samples=16, epochs=1, seed=1)  # another recipe: another base
    assert bases.path("tiny-llama", "causal-lm", other) != made.path
    with torch.device("meta"):
        module = models.build("tiny-llama").module
    module = models.build("tiny-llama").module
    bases.load(module, "tiny-llama", "causal-lm", small)
    saved = {n: p for n, p in module.named_parameters()}
    assert torch.equal(module.lm_head.weight, module.model.embed_tokens.weight) or saved  # tied stay tied
    with pytest.raises(bases.BaseMissing, match="has not been made"):
        bases.load(models.build("tiny-gpt2").module, "tiny-gpt2", "causal-lm", small)


def test_a_cell_on_a_trained_base_adapts_to_the_target_and_measures_what_it_forgot(cache, monkeypatch):
    monkeypatch.setattr(bases, "SOURCE", bases.Source(samples=256, eval_samples=128, epochs=2))  # seconds
    cell = Cell(
        model="cifar-mlp",
        method="lora",
        rank=8,
        lr=5e-3,
        weights="trained",
        samples=256,
        eval_samples=128,
        batch_size=32,
        epochs=1,
        warmup_epochs=1,
        eval_every=2,
    )
    row = execute(cell)
    assert row.ok, row.error
    m = row.metrics
    assert m["base_made_s"] > 0 and "made here" in row.info["base"]  # the first cell of the model makes it
    assert m["source_accuracy_before"] > 0.5  # the base learned its source task (10 classes: chance 0.1)
    assert m["forgetting_pt"] == pytest.approx(
        (m["source_accuracy_before"] - m["source_accuracy_after"]) * 100
    )
    assert "target task" in row.info["data"]
    steps = [p["step"] for p in row.curve]
    assert steps == list(range(2, 17, 2))  # every 2 steps, and each epoch's last (8 steps an epoch)
    times = [p["train_s"] for p in row.curve]
    assert times == sorted(times) and times[0] > 0
    again = execute(cell)
    assert "cached" in again.info["base"] and "base_made_s" not in again.metrics


def test_evaluations_are_kept_out_of_the_epoch_and_the_curves_time():
    """An evaluation after every step, each over 16x a step's samples: the timed epoch stays about
    the sum of its steps, though the evaluations took more than twice as long as the steps."""
    cell = Cell(
        model="cifar-mlp",
        method="lora",
        rank=8,
        samples=256,
        eval_samples=512,
        batch_size=32,
        epochs=1,
        warmup_epochs=0,
        eval_every=1,
    )
    row = execute(cell)
    assert row.ok, row.error
    m = row.metrics
    steps_s = m["step_s_p50"] * m["steps_per_epoch"]
    assert m["epoch_s"] < 1.5 * steps_s and m["eval_s"] > 2 * steps_s
    assert row.curve[-1]["train_s"] == pytest.approx(m["epoch_s"], rel=0.05)


def test_a_trained_base_takes_synthetic_data_and_a_preset_yields_to_the_users():
    with pytest.raises(CellError, match="--weights trained adapts a base trained on a source task"):
        Cell(model="cifar-mlp", method="full", weights="trained", data="/data/cifar")
    from lorabench.plan.presets import expand

    assert {c.weights for c in expand(["quick"])} == {"trained"}
    assert {c.weights for c in expand(["quick"], overrides={"data": "/data/cifar"})} == {"random"}
    digits = expand(["quick"], models=["cifar-mlp"], overrides={"data": data.DIGITS})
    assert {c.weights for c in digits} == {"trained"}  # the digits have a source and a target task
    assert {c.lr for c in expand(["quick"], methods=["lora"], ranks=[8])} == {5e-3}  # adapters' step
    assert {c.lr for c in expand(["quick"], overrides={"lr": 1e-2})} == {1e-2}  # what was asked wins


def test_the_digits_scikit_learn_ships_are_a_real_transfer_from_0_4_to_5_9():
    """Offline real data: the source half and the target half share no digit, the eval scans are the
    same for every seed and never trained on, and the images have the image task's shape."""
    from lorabench.workload import digits

    source, target = digits.load(256, 64, 0, data.SOURCE), digits.load(256, 64, 0, data.TARGET)
    assert set(source.train["labels"].tolist()) == set(range(5))
    assert set(target.train["labels"].tolist()) == set(range(5, 10))
    assert (
        source.train["x"].shape == (256, 3, 32, 32)
        and -1 <= source.train["x"].min() < source.train["x"].max() <= 1
    )
    other_seed = digits.load(256, 64, 1, data.TARGET)
    assert torch.equal(other_seed.eval["x"], target.eval["x"])  # one held-out set
    assert not torch.equal(other_seed.train["x"], target.train["x"])  # the seed draws the samples
    seen = {tuple(x.flatten()[::16].tolist()) for x in digits.load(digits.training_scans(), 10, 0).train["x"]}
    held = [tuple(x.flatten()[::16].tolist()) for x in digits.load(10, 400, 0).eval["x"]]
    assert sum(h in seen for h in held) < len(held) / 10  # held out (a few scans are pixel-alike)
    with pytest.raises(data.DataError, match="fewer than --samples"):
        digits.load(5000, 64, 0, data.TARGET)


def test_a_base_trained_on_digits_0_4_adapts_to_5_9(cache, monkeypatch):
    monkeypatch.setattr(bases, "SOURCE", bases.Source(samples=512, eval_samples=128, epochs=3))  # seconds
    cell = Cell(
        model="cifar-mlp", method="lora", rank=8, lr=5e-3, weights="trained", data=data.DIGITS, samples=512,
        eval_samples=128, batch_size=32, epochs=2, warmup_epochs=0,
    )  # fmt: skip
    row = execute(cell)
    assert row.ok, row.error
    assert "digits 5-9" in row.info["data"] and "made here" in row.info["base"]
    about = bases.about("cifar-mlp", "image-classification", data=data.DIGITS)
    assert "digits 0-4" in about["data"] and about["source_accuracy"] > 0.9
    assert row.metrics["source_accuracy_before"] == pytest.approx(about["source_accuracy"], abs=0.02)
    # the base's head has only ever answered 0-4 (0 on the target); five new classes: chance 0.2
    assert row.metrics["final_eval_accuracy"] > 0.35
    assert bases.about("cifar-mlp", "image-classification") is None  # the synthetic base is another


def test_the_digits_without_scikit_learn_or_with_too_few_scans_are_refused_before_any_cell_runs(
    monkeypatch, tmp_path, capsys
):
    import importlib.util

    from lorabench.cli import main

    monkeypatch.chdir(tmp_path)
    digits = ["run", "--models", "cifar-mlp", "--methods", "full", "--data", data.DIGITS, "--progress", "off"]
    assert main([*digits, "--samples", "800"]) == 2  # the target half holds about 715
    assert "the target task has" in capsys.readouterr().err
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else found(name, *a)
    )
    assert main(digits) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install scikit-learn" in err
    assert not (tmp_path / "results").exists()

import torch

from lorabench.plan.cells import Cell
from lorabench.run.probes import probe_step
from lorabench.run.train import evaluate, fit
from lorabench.workload import data, models, optimizers
from lorabench.workload.methods import METHODS
from lorabench.workload.tasks import TASKS


def apply(bundle, cell):
    return METHODS[cell.method].apply(bundle, cell.adapter)


def synthetic(task, **kw):
    return TASKS[task].build_data(**kw)


CPU = torch.device("cpu")


def test_mlp_learns_the_synthetic_images_and_times_only_timed_epochs():
    torch.manual_seed(0)
    adapted = apply(models.build("cifar-mlp"), Cell(model="cifar-mlp", method="full"))
    ds = synthetic("image-classification", samples=256, eval_samples=128, seq_len=1, seed=0)
    seen = []
    f = fit(
        adapted.module,
        TASKS["image-classification"],
        ds,
        epochs=2,
        warmup_epochs=1,
        batch_size=32,
        device=CPU,
        on_epoch=lambda rec, total: seen.append((rec.epoch, rec.timed, total)),
    )
    assert seen == [(1, False, 3), (2, True, 3), (3, True, 3)]
    assert f.steps_per_epoch == 8 and len(f.step_s) == 16 and len(f.timed_epoch_s) == 2
    assert all(s > 0 for s in f.step_s)
    assert f.epochs[-1].eval_accuracy > 0.5  # chance is 0.1
    assert f.epochs[-1].train_loss < f.epochs[0].train_loss
    assert f.optimizer_impl == "adam(fused)"


def test_state_breakdown_is_4_4_8_bytes_per_trainable_fp32_parameter():
    """The probe step before the training loop measures the gradients and Adam's state it allocates."""
    torch.manual_seed(0)
    cell = Cell(model="cifar-mlp", method="lora", rank=2, batch_size=16)
    bundle = models.build("cifar-mlp")
    adapted = apply(bundle, cell)
    p = adapted.params
    ds = synthetic("image-classification", samples=32, eval_samples=16, seq_len=1, seed=0)
    optimizer, _ = optimizers.make("adam", [q for q in adapted.module.parameters() if q.requires_grad], 1e-3)
    b = probe_step(adapted.module, bundle.task, ds, optimizer, cell, CPU)
    assert sum(q.nbytes for q in adapted.module.parameters()) == 4 * p.total
    assert b["grads_bytes"] == 4 * p.trainable
    # Adam keeps exp_avg and exp_avg_sq (4 bytes each) per parameter, plus one scalar step per tensor.
    n_tensors = sum(1 for q in adapted.module.parameters() if q.requires_grad)
    assert b["optimizer_state_bytes"] == 8 * p.trainable + 4 * n_tensors
    # Adam's state now exists, so even with --warmup-epochs 0 no timed step pays for allocating it
    assert len(optimizer.state) == n_tensors and all(st["exp_avg"].numel() for st in optimizer.state.values())


def test_gradient_accumulation_counts_steps_per_optimizer_update():
    adapted = apply(models.build("cifar-mlp"), Cell(model="cifar-mlp", method="lora", rank=1))
    ds = synthetic("image-classification", samples=64, eval_samples=16, seq_len=1, seed=0)
    f = fit(
        adapted.module,
        TASKS["image-classification"],
        ds,
        epochs=1,
        warmup_epochs=0,
        batch_size=8,
        grad_accum=4,
        device=CPU,
    )
    assert f.steps_per_epoch == 2 and f.samples_per_step == 32 and len(f.step_s) == 2


def test_bert_and_causal_lm_train_and_evaluate():
    torch.manual_seed(0)
    bert = models.build("bert-tiny")
    ds = synthetic(
        "sequence-classification",
        samples=128,
        eval_samples=64,
        seq_len=16,
        seed=0,
        vocab_size=bert.vocab_size,
        num_labels=2,
    )
    f = fit(
        apply(bert, Cell(model="bert-tiny", method="full")).module,
        bert.task,
        ds,
        epochs=3,
        warmup_epochs=0,
        batch_size=16,
        device=CPU,
    )
    assert f.epochs[-1].eval_accuracy >= 0.75
    from transformers import BloomConfig, BloomForCausalLM

    lm = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=2, vocab_size=128))
    ds = synthetic("causal-lm", samples=32, eval_samples=16, seq_len=16, seed=0, vocab_size=128)
    assert (ds.train["labels"][:, :4] == data.IGNORE_INDEX).all()
    loss, acc = evaluate(lm, TASKS["causal-lm"], ds.eval, 8)
    assert 0 <= acc <= 1 and loss > 0
    f = fit(lm, TASKS["causal-lm"], ds, epochs=1, warmup_epochs=0, batch_size=8, device=CPU)
    assert len(f.step_s) == 4


def test_synthetic_data_is_deterministic_per_seed():
    a = synthetic(
        "sequence-classification", samples=8, eval_samples=4, seq_len=12, seed=3, vocab_size=100, num_labels=2
    )
    b = synthetic(
        "sequence-classification", samples=8, eval_samples=4, seq_len=12, seed=3, vocab_size=100, num_labels=2
    )
    assert torch.equal(a.train["input_ids"], b.train["input_ids"])
    # the class marker is present in every sample of its class
    for ids, label in zip(a.train["input_ids"], a.train["labels"]):
        assert (ids == 2 + label).sum() >= 4


def test_saved_activations_of_the_mlp_equal_the_closed_form_and_reparam_keeps_the_merged_weight():
    """Per sample the MLP keeps each ReLU's output (4096, 2048: also the next layer's input) and
    the logits' log-softmax (10), in fp32, and nll_loss one fp32 scalar (its total weight); the
    first input and the labels are the data set, left out."""
    ds = synthetic("image-classification", samples=32, eval_samples=16, seq_len=1, seed=0)
    saved = {}
    for method in ("full", "lora", "lora-reparam"):
        cell = Cell(
            model="cifar-mlp", method=method, batch_size=16, **({} if method == "full" else {"rank": 2})
        )
        bundle = models.build("cifar-mlp")
        module = apply(bundle, cell).module
        optimizer, _ = optimizers.make("adam", [q for q in module.parameters() if q.requires_grad], 1e-3)
        saved[method] = probe_step(module, bundle.task, ds, optimizer, cell, CPU)["activations_saved_bytes"]
    assert saved["full"] == 16 * (4096 + 2048 + 10) * 4 + 4
    # PEFT's side path adds only the r-wide outputs of A (and their inputs, already counted)
    assert 0 < saved["lora"] - saved["full"] < 16 * 2 * 3 * 4 * 2
    # the re-parametrized second and third layers keep their materialised W + BA for grad-input
    assert saved["lora-reparam"] - saved["full"] >= (4096 * 2048 + 2048 * 10) * 4


def test_activation_memory_does_not_grow_with_the_data_set():
    """The peak above weights+data is the step's, not the data set's: an epoch gathers each batch
    by index and never a shuffled copy of the whole set (which at 16,384 images is 192 MiB)."""
    from torch import nn

    from lorabench.measure.trackers import HostMemory

    task = TASKS["image-classification"]
    above = {}
    for n in (1024, 16384):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 16), nn.ReLU(), nn.Linear(16, 10))
        ds = synthetic("image-classification", samples=n, eval_samples=64, seq_len=1, seed=0)
        with HostMemory(0.002) as t:
            fit(model, task, ds, epochs=2, warmup_epochs=0, batch_size=64, device=CPU)
        r = t.result()
        above[n] = r["host_peak_above_baseline_bytes"]
        del ds
    assert abs(above[16384] - above[1024]) < 8 * 2**20, above


def test_a_diverging_cell_is_a_diverged_row_with_null_losses_not_a_crash():
    import json

    from lorabench.results.rows import Status
    from lorabench.run.experiment import execute

    row = execute(
        Cell(
            model="cifar-mlp",
            method="lora",
            rank=2,
            lr=1e30,
            samples=64,
            eval_samples=16,
            batch_size=16,
            epochs=1,
            warmup_epochs=1,
        )
    )
    assert row.status is Status.DIVERGED and row.error["type"] == "Diverged"
    assert "epoch 1" in row.error["message"] and row.epochs[0]["train_loss"] is None
    assert row.metrics["step_s_p50"] is None and "diverged" in row.unavailable["step_s_p50"]
    assert row.metrics["params_trainable"] > 0  # what was measured before it diverged stays
    json.dumps(row.to_json(), allow_nan=False)


def test_gradient_checkpointing_keeps_only_block_inputs_for_backward():
    """BERT-Tiny LoRA: the saved activations at least halve (the issue's bar), and the prediction
    follows the measurement within 25 % both ways."""
    from lorabench.plan.survey import survey
    from lorabench.run.experiment import execute

    rows = {}
    for gc in ("off", "on"):
        cell = Cell(
            model="bert-tiny",
            method="lora",
            rank=8,
            grad_checkpointing=gc,
            samples=64,
            eval_samples=32,
            batch_size=32,
            seq_len=64,
            epochs=1,
            warmup_epochs=0,
        )
        row = execute(cell, known=survey(cell).prediction.to_metrics())
        assert row.ok, row.error
        rows[gc] = row.metrics
    assert rows["on"]["activations_saved_bytes"] * 2 <= rows["off"]["activations_saved_bytes"]
    on = rows["on"]
    assert (
        abs(on["predicted_activations_bytes"] - on["activations_saved_bytes"])
        < 0.25 * on["activations_saved_bytes"]
    )
    # MFU counts the model's FLOPs, the same either way; HFU counts the recomputed forward too
    assert on["flops_per_step"] == rows["off"]["flops_per_step"] == rows["off"]["hardware_flops_per_step"]
    assert on["hardware_flops_per_step"] > on["flops_per_step"]

"""Models people bring, made at test time from tiny configurations: a PEFT method PEFT cannot build
on one of them is a skipped cell with PEFT's reason, and every PEFT method runs on its own defaults."""

import pytest

from lorabench.plan import admission, presets
from lorabench.plan.cells import Cell
from lorabench.plan.survey import survey


def tiny(tmp_path, kind: str) -> str:
    import transformers

    configs = {
        "gpt2": lambda: transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=128
        ),
        "roberta": lambda: transformers.RobertaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=2,
            intermediate_size=128,
            vocab_size=1000,
            max_position_embeddings=130,
        ),
        "deberta": lambda: transformers.DebertaV2Config(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=1000
        ),
        "bert": lambda: transformers.BertConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=1000
        ),
    }
    heads = {
        "gpt2": "GPT2LMHeadModel",
        "roberta": "RobertaForSequenceClassification",
        "bert": "BertForSequenceClassification",
        "deberta": "DebertaV2ForSequenceClassification",
    }
    path = tmp_path / kind
    config = configs[kind]()
    config.architectures = [heads[kind]]  # what a saved model's config.json says: its task
    config.save_pretrained(path)
    return f"hf:{path}"


def test_a_pair_peft_cannot_build_is_skipped_with_its_reason_and_the_rest_runs(tmp_path):
    gpt2 = tiny(tmp_path, "gpt2")
    cells = presets.expand(["quick"], [gpt2], ["lora", "loha"], [8], {"device": "cpu"})
    plan = admission.Plan.of(cells)
    loha = next(c for c in cells if c.method == "loha")
    assert set(plan.skipped) == {loha.key()}
    assert plan.skipped[loha.key()].startswith(f"PEFT cannot build loha on {gpt2}: TypeError: ")
    assert "Conv1D" in plan.skipped[loha.key()]


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
def test_ia3_trains_what_peft_own_defaults_train(tmp_path, kind):
    """IA3 on PEFT's own targets and feed-forward modules for the architecture (not LoRA's), the
    classification head trained in full as PEFT's SEQ_CLS does; RoBERTa's head no longer breaks it."""
    import transformers
    from peft import IA3Config, TaskType, get_peft_model

    model = tiny(tmp_path, kind)
    ours = survey(Cell(model=model, method="ia3", device="cpu")).params
    auto = (
        transformers.AutoModelForCausalLM
        if kind == "gpt2"
        else transformers.AutoModelForSequenceClassification
    )
    config = transformers.AutoConfig.from_pretrained(model[3:])
    if kind != "gpt2":
        config.num_labels = 2
    task = TaskType.CAUSAL_LM if kind == "gpt2" else TaskType.SEQ_CLS
    theirs = get_peft_model(auto.from_config(config), IA3Config(task_type=task))
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert ours.trainable == trainable > 0


def test_flops_of_a_model_the_meta_device_cannot_run_come_from_a_real_step_and_match_it(tmp_path):
    """DeBERTa-v2 reads a tensor's value in its forward, which the meta device cannot: its FLOPs
    come from one real CPU step of one sample, scaled by the batch; an independent FlopCounterMode
    count of one real step of the whole batch agrees within 1 %."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lorabench.workload import models

    model = tiny(tmp_path, "deberta")
    for method, rank in (("full", None), ("lora", 8)):
        counted = survey(
            Cell(model=model, method=method, rank=rank, batch_size=4, seq_len=32)
        ).prediction.flops
        torch.manual_seed(0)
        bundle = models.build(model)
        from lorabench.workload.methods import method as method_of

        module = method_of(method).apply(bundle, Cell(model=model, method=method, rank=rank).adapter).module
        ds = bundle.synthetic(4, 32, seed=1)
        with FlopCounterMode(display=False) as real:
            bundle.task.loss(module.train(), dict(ds.train))[0].backward()
        assert counted.forward + counted.backward == pytest.approx(real.get_total_flops(), rel=0.01), method


def test_every_zoo_architecture_builds_at_both_sizes_for_its_task_with_no_download():
    import torch

    from lorabench.workload import models, zoo

    for name, (arch, size) in zoo.NAMES.items():
        with torch.device("meta"):
            bundle = models.build(name)
        config = zoo.config(arch, size)
        assert bundle.vocab_size == zoo.SIZES[size]["vocab"], name
        causal = config.architectures[0].endswith(("CausalLM", "LMHeadModel"))
        assert bundle.task.name == ("causal-lm" if causal else "sequence-classification"), name
        for token in ("bos_token_id", "eos_token_id", "pad_token_id"):  # inside the vocabulary
            assert getattr(config, token, None) is None or getattr(config, token) < bundle.vocab_size, name
    with pytest.raises(models.ModelError, match="has no published weights"):
        models.build("tiny-llama", "pretrained")


@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-electra"])
def test_every_peft_method_merges_on_a_classification_head_made_of_layers(model):
    """RoBERTa's and ELECTRA's heads are two layers, trained in full as a saved module: PEFT's
    generic unload fails on them after merging (it reads the head's `.weight`), which made every
    such cell but LoRA's an error after training. The merged model must give the trained adapter's
    outputs, and the adapter switched off the base's."""
    import torch

    from lorabench.workload import models
    from lorabench.workload.methods import METHODS

    for name, method in METHODS.items():
        if not getattr(method, "uses_peft", False):
            continue
        torch.manual_seed(0)
        bundle = models.build(model)
        batch = dict(bundle.synthetic(4, 16).train)
        forward = lambda m: bundle.task.loss(m, batch)[1].float()  # noqa: E731 (the run's probe forward)
        base_out = forward(bundle.module.eval())
        cell = Cell(model=model, method=name, rank=None if name == "ia3" else 4)
        adapted = method.apply(bundle, cell.adapter)
        with torch.no_grad():  # as if trained: every trainable tensor moved off its initial value
            for p in adapted.module.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        checks = method.checks(adapted, forward, base_out)
        assert checks["check_merged_vs_adapter_max_abs_diff"] < 1e-4, name
        assert checks["check_adapter_off_vs_base_max_abs_diff"] < 1e-5, name
        assert checks["check_adapter_on_vs_base_max_abs_diff"] > 1e-3, name

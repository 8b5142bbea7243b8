"""The model zoo: the architectures people bring, as configurations made in code (random weights,
nothing downloaded), in two sizes.

    lorabench run --preset zoo                     # every tiny architecture through every method
    lorabench run --models medium-llama,medium-gpt2 --methods full,lora --ranks 16 --dry-run

`tiny-<arch>`: hidden 64, 2 layers, 2 heads, vocabulary 1,000 (seconds on a CPU). `medium-<arch>`:
hidden 512, 4 layers, 8 heads, vocabulary 32,000 (a causal LM's logits then dominate the step, as
they do in the large models). Each is the transformers class a saved model's `architectures`
names, so the task (causal LM or sequence classification) is the one `hf:` would infer.
"""

from __future__ import annotations

# arch: (config class, model class, the config's own names for hidden size, layers, heads and the
# feed-forward width, and anything else the architecture needs at these sizes)
ARCHITECTURES: dict[str, tuple[str, str, dict[str, str], dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}, {}),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {
            "hidden": "n_embd",
            "layers": "n_layer",
            "heads": "n_head",
            "ffn": "n_inner",
            "positions": "n_positions",
        },
        {"bos_token_id": 1, "eos_token_id": 1},  # its own 50,256 lies outside the zoo's vocabularies
    ),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}, {}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}, {}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn": "ffn_dim"}, {}),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", {}, {}),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        {"hidden": "dim", "layers": "n_layers", "heads": "n_heads", "ffn": "hidden_dim"},
        {},
    ),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", {}, {}),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {}, {}),
}
SIZES = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 2, "ffn": 128, "vocab": 1000},
    "medium": {"hidden": 512, "layers": 4, "heads": 8, "ffn": 2048, "vocab": 32000},
}
POSITIONS = 512  # the longest sequence a zoo model takes
DEFAULT_NAMES = {
    "hidden": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "ffn": "intermediate_size",
    "positions": "max_position_embeddings",
}


def config(arch: str, size: str):
    """The transformers configuration of `arch` at `size`, its `architectures` set."""
    import transformers

    config_class, model_class, names, extra = ARCHITECTURES[arch]
    shape = {**SIZES[size], "positions": POSITIONS}
    kwargs = {names.get(k, DEFAULT_NAMES[k]): v for k, v in shape.items() if k != "vocab"}
    kwargs["vocab_size"] = shape["vocab"]
    if arch in ("llama", "qwen2", "mistral", "gemma"):  # grouped-query attention: as many KV heads
        kwargs["num_key_value_heads"] = shape["heads"]
        kwargs["head_dim"] = shape["hidden"] // shape["heads"]
    if arch == "opt":
        kwargs["word_embed_proj_dim"] = shape["hidden"]
    if arch == "electra":
        kwargs["embedding_size"] = shape["hidden"]
    cfg = getattr(transformers, config_class)(**kwargs, **extra)
    cfg.architectures = [model_class]
    return cfg


NAMES = {f"{size}-{arch}": (arch, size) for size in SIZES for arch in ARCHITECTURES}

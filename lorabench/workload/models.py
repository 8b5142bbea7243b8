"""Model registry: name -> short builder returning the module and what the harness needs to know.

    lorabench list                              # prints this registry

Every model builds from its configuration (random weights), so parameter, memory and time
figures need no download; `weights="pretrained"` loads published weights through
`from_pretrained`, honouring the HF cache and HF_HUB_OFFLINE. Builders run on torch's current
default device, so `with torch.device("meta"):` builds any of them in milliseconds for counting.
transformers is imported inside the builders that need it: it costs ~3.6 s per process on 2 cores.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import InputError, first_line
from . import zoo
from .data import Dataset
from .settings import Choice
from .tasks import TASKS, Task


class ModelError(InputError):
    """A model cannot be built as asked (unknown, not loadable, weights missing)."""


@dataclass(frozen=True, kw_only=True)
class Weights(Choice):
    """One `--weights` value: where a model's weights come from."""

    published: bool = False  # loaded with from_pretrained (else built from the configuration)
    trained: bool = False  # lorabench's own base, trained on the task's source data (`bases`)


def _trained_base(cell) -> str | None:
    """What a trained base asks of the rest of its cell: data with a source and a target task
    (synthetic or the digits), and no pretraining of its own."""
    from .data import DIGITS, has_tasks

    if not has_tasks(cell.data):
        return (
            "--weights trained adapts a base trained on a source task to its related target task: "
            f"the synthetic data or --data {DIGITS}; with --data {cell.data} use --weights pretrained or random"
        )
    if cell.pretrain_epochs:
        return "--weights trained starts from a trained base; it takes no --pretrain-epochs"
    return None


WEIGHTS: dict[str, Weights] = {
    "random": Weights(description="built from the configuration (random weights; nothing downloaded)"),
    "pretrained": Weights(
        description="published weights, loaded with from_pretrained (the HF cache, a local directory)",
        published=True,
    ),
    "trained": Weights(
        description="lorabench's own base: trained in full on the task's source data once, cached, then "
        "adapted to the related target task (quality figures compare like with like, offline)",
        trained=True,
        requires=_trained_base,
    ),
}


@dataclass
class Bundle:
    """A built model and the facts the data, method and training code need about it."""

    module: nn.Module
    task: Task
    lora_targets: tuple[str, ...] | str  # PEFT-style default target module names (or a regex)
    vocab_size: int | None = None  # token models: ids are drawn below this
    num_labels: int | None = None  # classifiers
    tokenizer_source: str | None = None  # where a tokenizer for real text data can be loaded

    def synthetic(self, samples: int, seq_len: int, eval_samples: int = 1, seed: int = 0) -> Dataset:
        """The task's synthetic data set for this model: its vocabulary, its labels."""
        return self.task.build_data(
            samples=samples,
            eval_samples=eval_samples,
            seq_len=seq_len,
            seed=seed,
            vocab_size=self.vocab_size,
            num_labels=self.num_labels,
        )


def build_cifar_mlp(weights: str = "random") -> Bundle:
    """Seed 002's MLP: 3*32*32 -> 4096 -> 2048 -> 10 with ReLU, 20,998,154 parameters."""
    if weights != "random":
        raise ModelError(_UNPUBLISHED.format(name="cifar-mlp"))
    module = nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(3 * 32 * 32, 4096),
            relu1=nn.ReLU(),
            fc2=nn.Linear(4096, 2048),
            relu2=nn.ReLU(),
            fc3=nn.Linear(2048, 10),
        )
    )
    return Bundle(module, TASKS["image-classification"], ("fc1", "fc2", "fc3"), num_labels=10)


_UNPUBLISHED = "{name} has no published weights; it trains from scratch (use --weights random)"


def published(hub_id: str) -> Callable[[Callable[[str], Bundle]], Callable[[str], Bundle]]:
    """Mark a builder with where its published weights live on the Hub (`--weights pretrained`);
    a builder without one (the MLP) has none, and builds no transformers model."""

    def mark(build: Callable[[str], Bundle]) -> Callable[[str], Bundle]:
        build.hub_id = hub_id
        return build

    return mark


def hub_id(name: str) -> str | None:
    """Where `name`'s published weights live: its builder's, or the hf: model's own source."""
    return name[3:] if is_byo(name) else getattr(MODELS.get(name), "hub_id", None)


def _bert(hub_id: str, weights: str, **shape) -> Bundle:
    from transformers import BertConfig, BertForSequenceClassification

    if weights == "pretrained":
        module = _from_pretrained(BertForSequenceClassification, hub_id, num_labels=2)
    else:
        module = BertForSequenceClassification(BertConfig(num_labels=2, **shape))
    return Bundle(
        module,
        TASKS["sequence-classification"],
        ("query", "value"),
        vocab_size=module.config.vocab_size,
        num_labels=2,
        tokenizer_source=hub_id,
    )


@published("prajjwal1/bert-tiny")
def build_bert_tiny(weights: str = "random") -> Bundle:
    """2 layers, hidden 128, 2 heads, intermediate 512: 4,386,178 parameters with a 2-label head."""
    return _bert(
        build_bert_tiny.hub_id,
        weights,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
    )


@published("bert-base-uncased")
def build_bert_base(weights: str = "random") -> Bundle:
    """12 layers, hidden 768, 12 heads, intermediate 3072: 109,483,778 parameters with a 2-label head."""
    return _bert(build_bert_base.hub_id, weights)


def _bloom(hub_id: str, weights: str, **shape) -> Bundle:
    from transformers import BloomConfig, BloomForCausalLM

    if weights == "pretrained":
        module = _from_pretrained(BloomForCausalLM, hub_id)
    else:
        module = BloomForCausalLM(BloomConfig(**shape))
    return Bundle(
        module,
        TASKS["causal-lm"],
        ("query_key_value",),
        vocab_size=module.config.vocab_size,
        tokenizer_source=hub_id,
    )


@published("bigscience/bloom-560m")
def build_bloom_560m(weights: str = "random") -> Bundle:
    """Bloom 560m: hidden 1024, 24 layers, 16 heads, vocabulary 250,880."""
    return _bloom(
        build_bloom_560m.hub_id, weights, hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880
    )


@published("Langboat/bloom-1b4-zh")
def build_bloom_1b4_zh(weights: str = "random") -> Bundle:
    """Seed 001's model: Bloom-1b7's shape (hidden 2048, 24 layers, 16 heads), vocabulary cut to 46,145."""
    return _bloom(
        build_bloom_1b4_zh.hub_id, weights, hidden_size=2048, n_layer=24, n_head=16, vocab_size=46145
    )


MODELS: dict[str, Callable[[str], Bundle]] = {
    "cifar-mlp": build_cifar_mlp,
    "bert-tiny": build_bert_tiny,
    "bert-base": build_bert_base,
    "bloom-560m": build_bloom_560m,
    "bloom-1b4-zh": build_bloom_1b4_zh,
}


def is_byo(name: str) -> bool:
    return name.startswith("hf:") and len(name) > 3


def build_byo(source: str, weights: str = "random", task: str | None = None) -> Bundle:
    """Any model transformers can load for sequence classification or causal LM (`hf:<dir or id>`)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a configuration from {source!r}: {first_line(e)}") from None
    return _from_config(config, source, weights, task)


def build_zoo(name: str, weights: str = "random", task: str | None = None) -> Bundle:
    """A zoo model (`zoo.NAMES`): its configuration made in code, random weights."""
    if weights == "pretrained":
        raise ModelError(_UNPUBLISHED.format(name=name))
    return _from_config(zoo.config(*zoo.NAMES[name]), None, weights, task)


def _from_config(config, source: str | None, weights: str, task: str | None) -> Bundle:
    """The model of a transformers configuration for its task (from `source`'s weights when pretrained)."""
    import transformers

    the_task = TASKS[task or _infer_task(config)]
    auto = getattr(transformers, the_task.hf_auto_class)
    if the_task.classifier and not getattr(config, "num_labels", None):
        config.num_labels = 2
    try:
        module = auto.from_pretrained(source) if weights == "pretrained" else auto.from_config(config)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot build {source!r} for {the_task.name}: {first_line(e)}") from None
    targets = _default_targets(module)
    return Bundle(
        module,
        the_task,
        targets,
        vocab_size=getattr(config, "vocab_size", None),
        num_labels=config.num_labels if the_task.classifier else None,
        tokenizer_source=source,
    )


def build(name: str, weights: str = "random", task: str | None = None) -> Bundle:
    if is_byo(name):
        return build_byo(name[3:], weights, task)
    if name in zoo.NAMES:
        return build_zoo(name, weights, task)
    if name not in MODELS:
        raise ModelError(
            f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}, a zoo model (tiny-<arch>, "
            f"medium-<arch>; arch one of {', '.join(zoo.ARCHITECTURES)}) or hf:<dir or hub id>"
        )
    return MODELS[name](weights)


def uses_transformers(name: str) -> bool:
    """Whether building `name` imports transformers (worth preloading in the fork server): every
    model with published weights on the Hub, and every hf: model."""
    return hub_id(name) is not None or name in zoo.NAMES


def linear_names(module: nn.Module) -> list[str]:
    """Names of the Linear (and HF Conv1D) modules: what LoRA can target."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


def _infer_task(config) -> str:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ForCausalLM" in archs or "LMHead" in archs:
        return "causal-lm"
    if "ForSequenceClassification" in archs or "ForMaskedLM" in archs or "Model" in archs:
        return "sequence-classification"
    raise ModelError(
        f"cannot infer the task of {archs or 'this model'}; pass --task causal-lm or sequence-classification"
    )


def _default_targets(module: nn.Module) -> tuple[str, ...]:
    """PEFT's own default targets for the architecture when it has them, else every attention Linear."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type in DEFAULTS:
        return tuple(DEFAULTS[model_type])
    leaves = {n.rsplit(".", 1)[-1] for n in linear_names(module)}
    return tuple(sorted(n for n in leaves if any(k in n for k in ("q", "k", "v", "attn", "query", "value"))))


def _from_pretrained(cls, hub_id: str, **kwargs) -> nn.Module:
    try:
        return cls.from_pretrained(hub_id, low_cpu_mem_usage=True, **kwargs)
    except OSError as e:
        raise ModelError(
            f"pretrained weights for {hub_id!r} are not available here ({first_line(e)}); "
            "download them into the HF cache first, or use --weights random"
        ) from None


def check_pretrained(name: str) -> None:
    """Refuse up front when pretrained weights cannot be had: not in a local directory or the HF
    cache while HF_HUB_OFFLINE is set (or for a model that has none)."""
    import os
    from pathlib import Path

    source = hub_id(name)
    if source is None:
        raise ModelError(_UNPUBLISHED.format(name=name))
    if Path(source).is_dir():
        return
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(source, local_files_only=True)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ModelError(
                f"pretrained weights for {source!r} are not in the HF cache and HF_HUB_OFFLINE is set; "
                "download them first (huggingface-cli download), or use --weights random"
            ) from None

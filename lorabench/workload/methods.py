"""Fine-tuning methods: explicit transforms from a built model to a trainable model plus its counts.

    lorabench run --dry-run --methods full,lora,lora-reparam --ranks 1 --models cifar-mlp

`full` trains every parameter. `lora` wraps the model with PEFT (an adapter path x A^T B^T
beside each frozen Linear). `lora-reparam` is seed 002's method: the Linear's weight is
re-parametrized as W + (B @ A) * alpha/r with torch.nn.utils.parametrize, which materialises a
full out x in matrix on every forward pass. Each method freezes visibly, here, not as a side
effect of a constructor, so the trainable counts below are what the optimizer receives.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import InputError
from .models import Bundle, linear_names
from .reparam import LoRAParametrization, set_reparam_enabled


class MethodError(InputError):
    """A method cannot be applied as asked (no matching target, rank too large)."""


@dataclass(frozen=True)
class Adapter:
    """What a cell asks of a method: the LoRA settings (rank None for full fine-tuning)."""

    rank: int | None = None
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    targets: tuple[str, ...] | str | None = None  # None: the model's default targets
    modules_to_save: tuple[str, ...] = ()
    model: str = "the model"  # for messages
    steps: int = 1  # optimizer steps the cell takes (AdaLoRA's schedule spans them)

    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha is not None else self.rank


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of an adapted model. trainable = adapter + full_trained."""

    total: int  # every parameter of the adapted model, frozen ones and adapter copies included
    trainable: int
    adapter: int  # the adapters' weights (LoRA's A and B, DoRA's magnitudes, IA3's scales, ...)
    full_trained: int  # parameters trained in full: all of them for `full`; saved modules / heads for LoRA

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.total


@dataclass
class Adapted:
    module: nn.Module
    params: ParamCount
    targets: list[str]  # names of the adapted Linear modules (empty for full fine-tuning)


def count_params(module: nn.Module) -> ParamCount:
    total = trainable = adapter = 0
    for name, p in module.named_parameters():  # named_parameters() visits tied weights once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            # LoRA's A and B (PEFT's and the re-parametrization's); any PEFT tuner's adapter weights
            # ("hada_w1_a.default", "ia3_l.default", ...), which its modules_to_save copies are not
            if "lora_" in name or (".default" in name and "modules_to_save" not in name):
                adapter += p.numel()
    return ParamCount(total, trainable, adapter, trainable - adapter)


def match_targets(module: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """PEFT's matching rule: a string is a regex matched against the whole module name; a list
    matches a module whose name equals an entry or ends with '.' + entry. Linear layers only."""
    names = linear_names(module)
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def _resolve(bundle: Bundle, adapter: Adapter, targets=None) -> list[str]:
    """The Linear modules `targets` (default: the adapter's, else the model's) match; refuses none,
    and a rank above a target's smaller dimension."""
    if targets is None:
        targets = adapter.targets if adapter.targets is not None else bundle.lora_targets
    matched = match_targets(bundle.module, targets)
    if not matched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names(bundle.module)})
        raise MethodError(
            f"target {targets!r} matches no Linear module of {adapter.model}; its Linear modules end in: "
            f"{', '.join(leaves)}"
        )
    for name in matched:
        layer = bundle.module.get_submodule(name)
        # a Linear's features, not its weight's shape (a 4-bit weight is packed); GPT-2's Conv1D has only the weight
        smaller = min(
            (layer.in_features, layer.out_features) if hasattr(layer, "in_features") else layer.weight.shape
        )
        if adapter.rank is not None and adapter.rank > smaller:
            raise MethodError(
                f"rank {adapter.rank} exceeds the smaller dimension ({smaller}) of target {name} "
                f"{tuple(layer.weight.shape)} in {adapter.model}; use a rank <= {smaller} or other targets"
            )
    return matched


def _adapter_activations(module: nn.Module, rows: int, b: int, inputs: bool = True) -> int:
    """Bytes LoRA adds to what autograd saves: the r-wide output of each A (PEFT), each adapted
    layer's input (`inputs`: once per parent module, as q, k and v of a block share theirs), and for
    the re-parametrization the materialised W + BA of every adapted layer whose input needs a
    gradient (all but a first one that nothing trainable precedes)."""
    sites: dict[str, int] = {}
    extra, trainable_before = 0, False
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and ".lora_A." in f"{name}.":
            extra += rows * m.out_features * b
            layer = name.split(".lora_A")[0]
        elif isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight"):
            if trainable_before:
                extra += m.out_features * m.in_features * b
            layer = name
        elif isinstance(getattr(m, "base_layer", None), nn.Linear):  # any PEFT tuner: its input is kept
            m, layer = m.base_layer, name
        else:
            trainable_before |= any(p.requires_grad for p in m.parameters(recurse=False))
            continue
        trainable_before = True
        parent = layer.rsplit(".", 1)[0]
        sites[parent] = max(sites.get(parent, 0), m.in_features)
    return extra + (rows * sum(sites.values()) * b if inputs else 0)


class Method:
    """Full fine-tuning: every parameter trains. The base of the other methods.

    A method owns how it is applied, its checks after training, and its term in the memory
    prediction: the activations it changes. (FLOPs are counted, not predicted: see `flops`.)"""

    name, title = "full", "full fine-tuning"
    adapts = False  # trains adapters on targets (checks: adapter off, merged)
    ranked = False  # needs a rank (--ranks)
    uses_peft = False
    survey_device = "meta"  # where the plan builds it to count it (a method that reads its weights: cpu)
    closed_form = True  # flops.closed_form knows its products (`lorabench check` holds the count to it)
    linear_input_units = (
        14  # Korthikanti's 34 units per layer keep the 4 Linear inputs (14) for weight gradients
    )

    @property
    def description(self) -> str:
        """One line for `lorabench list`."""
        return (type(self).__doc__ or "").strip().splitlines()[0]

    def step_hook(self, module: nn.Module) -> Callable[[int], None] | None:
        """What the training loop calls after each optimizer step (with its count), if anything."""
        return None

    def conflict(self, cell) -> str | None:
        """Why this method cannot train the rest of `cell` as asked (settings.Choice's question)."""
        if not self.ranked and cell.rank is not None:
            return (
                f"a rank was given to {self.title}; ranks apply to the methods that take one "
                f"({', '.join(n for n, m in METHODS.items() if m.ranked)})"
            )
        if self.ranked and cell.rank is None:
            return f"method {cell.method!r} needs a rank (a whole number >= 1)"
        if not self.adapts:
            if cell.targets is not None or cell.modules_to_save:
                return "targets and modules_to_save apply to the adapter methods only"
            return None
        if cell.alpha is not None and not cell.alpha > 0:
            return f"alpha must be > 0, got {cell.alpha}"
        if not 0.0 <= cell.dropout < 1.0:
            return f"dropout must be in [0, 1), got {cell.dropout}"
        return None

    def apply(self, bundle: Bundle, adapter: Adapter) -> Adapted:
        bundle.module.requires_grad_(True)
        return Adapted(bundle.module, count_params(bundle.module), [])

    def extra_activations(self, module: nn.Module, rows: int, b: int, inputs: bool) -> int:
        return 0

    def checks(
        self, adapted: Adapted, forward: Callable[[nn.Module], torch.Tensor], base_out: torch.Tensor
    ) -> dict[str, float | int]:
        return {}


class _LoRA(Method):
    adapts = ranked = True
    linear_input_units = 0  # a frozen Linear keeps no input; the adapted ones come back in extra_activations

    def extra_activations(self, module: nn.Module, rows: int, b: int, inputs: bool) -> int:
        return _adapter_activations(module, rows, b, inputs)

    def _views(self, adapted: Adapted, forward) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(output with the adapter off, adapter file bytes, output merged); leaves the module merged."""
        raise NotImplementedError

    @torch.no_grad()
    def checks(self, adapted, forward, base_out):
        """After training: the merged model must give the adapter model's outputs, and the adapter
        switched off must give the base model's (`base_out`, taken before the adapter existed).
        Ends by merging, so the module is left merged. Max absolute differences, in output units."""
        adapted.module.eval()
        on = forward(adapted.module)
        off, adapter_bytes, merged = self._views(adapted, forward)
        return {
            "check_merged_vs_adapter_max_abs_diff": (merged - on).abs().max().item(),
            "check_adapter_off_vs_base_max_abs_diff": (off - base_out).abs().max().item(),
            "check_adapter_on_vs_base_max_abs_diff": (on - base_out).abs().max().item(),
            "adapter_file_bytes": adapter_bytes,
        }


class PeftMethod(_LoRA):
    """A PEFT tuner through its own config class (`config(adapter, targets)`), on the model's targets."""

    uses_peft = True

    def __init__(
        self,
        name: str,
        title: str,
        config: Callable,
        ranked: bool = True,
        survey_device: str = "meta",
        closed_form: bool = False,
    ):
        self.name, self.title, self._config = name, title, config
        self.ranked, self.survey_device, self.closed_form = ranked, survey_device, closed_form

    @property
    def description(self) -> str:
        return self.title

    def peft_default(self, bundle: Bundle, adapter: Adapter) -> list[str] | str | None:
        """The targets PEFT itself chooses for this method on this architecture (`XConfig(
        task_type=...)` with no target_modules: its TRANSFORMERS_MODELS_TO_X_TARGET_MODULES_MAPPING),
        or None where it has none (the MLP, an architecture PEFT does not list)."""
        import peft.utils.constants
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        model_type = getattr(getattr(bundle.module, "config", None), "model_type", None)
        kind = self._config(adapter, None).peft_type
        # most tuners name their mapping as an attribute; IA3 reads its constant directly
        mapping = getattr(PEFT_TYPE_TO_TUNER_MAPPING.get(kind), "target_module_mapping", None) or getattr(
            peft.utils.constants, f"TRANSFORMERS_MODELS_TO_{kind.value}_TARGET_MODULES_MAPPING", {}
        )
        return mapping.get(model_type) if model_type else None

    def apply(self, bundle: Bundle, adapter: Adapter) -> Adapted:
        from peft import TaskType, get_peft_model

        # --targets wins; else the method's own defaults as PEFT has them; else the model's (LoRA's)
        own = self.peft_default(bundle, adapter) if adapter.targets is None else None
        targets = adapter.targets if adapter.targets is not None else (own or bundle.lora_targets)
        matched = _resolve(bundle, adapter, targets)
        # with PEFT's own targets, PEFT fills in the rest of its defaults too (IA3's feed-forward modules)
        config = self._config(
            adapter, None if own else (targets if isinstance(targets, str) else list(targets))
        )
        task_type = bundle.task.peft_task_type
        config.task_type = (
            getattr(TaskType, task_type) if task_type else None
        )  # SEQ_CLS trains the head in full too
        if adapter.modules_to_save:
            config.modules_to_save = list(adapter.modules_to_save)
        bundle.module.requires_grad_(False)  # the base is frozen; PEFT unfreezes adapters and saved modules
        module = get_peft_model(bundle.module, config)
        return Adapted(module, count_params(module), matched)

    def step_hook(self, module):
        update = getattr(
            getattr(module, "base_model", None), "update_and_allocate", None
        )  # AdaLoRA's rank schedule
        return update

    def _views(self, adapted, forward):
        from peft import get_peft_model_state_dict

        module = adapted.module
        with module.disable_adapter():
            off = forward(module)
        adapter_bytes = _state_bytes(get_peft_model_state_dict(module))
        try:
            return off, adapter_bytes, forward(module.merge_and_unload())
        except AttributeError as e:
            # PEFT 0.21's generic unload (IA3, LoHa, LoKr, VeRA, OFT, BOFT; LoRA has its own) sets
            # `.weight` on every module it puts back, so a saved head made of layers (RoBERTa's,
            # ELECTRA's classifier) fails it after the merge. The merge is what is checked: the
            # merged layers, still wrapped, give the outputs the unloaded model would.
            if "has no attribute 'weight'" not in str(e):
                raise
            return off, adapter_bytes, forward(module)


def _peft(name: str):
    import peft

    return getattr(peft, name)


def _lora(**extra) -> Callable:
    return lambda a, t: _peft("LoraConfig")(
        r=a.rank, lora_alpha=a.scale_alpha, lora_dropout=a.dropout, target_modules=t, **extra
    )


# PEFT's methods, each one line: (name, what it trains, its config from the cell's adapter and targets)
PEFT_METHODS = [
    PeftMethod(
        "lora",
        "LoRA through PEFT: an adapter path x A^T B^T beside each frozen Linear.",
        _lora(),
        closed_form=True,
    ),
    PeftMethod(
        "dora",
        "DoRA: LoRA plus a learned magnitude per output feature of each target (use_dora)",
        _lora(use_dora=True),
    ),
    PeftMethod(
        "rslora",
        "rsLoRA: LoRA scaled by alpha / sqrt(r) instead of alpha / r (use_rslora)",
        _lora(use_rslora=True),
    ),
    PeftMethod(
        "loha",
        "LoHa: the update is the Hadamard product of two rank-r pairs",
        lambda a, t: _peft("LoHaConfig")(r=a.rank, alpha=a.scale_alpha, target_modules=t),
    ),
    PeftMethod(
        "lokr",
        "LoKr: the update is a Kronecker product with a rank-r factor",
        lambda a, t: _peft("LoKrConfig")(r=a.rank, alpha=a.scale_alpha, target_modules=t),
    ),
    PeftMethod(
        "ia3",
        "IA3: a learned scale per output feature of each target; no rank",
        lambda a, t: _peft("IA3Config")(target_modules=t, feedforward_modules=None if t is None else []),
        ranked=False,
    ),
    PeftMethod(
        "vera",
        "VeRA: frozen random rank-r projections shared by every target, learned scales",
        lambda a, t: _peft("VeraConfig")(r=a.rank, target_modules=t, vera_dropout=a.dropout),
    ),
    PeftMethod(
        "adalora",
        "AdaLoRA: SVD-form LoRA from rank r, pruned to r/2 over the cell's steps",
        lambda a, t: _peft("AdaLoraConfig")(
            init_r=a.rank,
            target_r=max(a.rank // 2, 1),
            total_step=a.steps,
            lora_alpha=a.scale_alpha,
            target_modules=t,
        ),
    ),
    PeftMethod(
        "oft",
        "OFT: an orthogonal block-diagonal rotation of each target's weight, r blocks",
        lambda a, t: _peft("OFTConfig")(r=a.rank, oft_block_size=0, target_modules=t),
    ),
    # BOFT reads its weights while building (.item()): the plan counts it on the CPU, not on meta
    PeftMethod(
        "boft",
        "BOFT: a butterfly-factored orthogonal rotation of each target, blocks of size r",
        lambda a, t: _peft("BOFTConfig")(boft_block_size=a.rank, boft_n_butterfly_factor=1, target_modules=t),
        survey_device="cpu",
    ),
]


class ReparamLoRA(_LoRA):
    """Seed 002's LoRA: the weight re-parametrized as W + (B @ A) * alpha/r, materialised per forward."""

    name, title = "lora-reparam", "LoRA by re-parametrization"

    def apply(self, bundle: Bundle, adapter: Adapter) -> Adapted:
        if adapter.modules_to_save:
            raise MethodError("lora-reparam trains adapters only; modules_to_save needs --methods lora")
        matched = _resolve(bundle, adapter)
        bundle.module.requires_grad_(False)  # every non-LoRA parameter is frozen (seed 002)
        for name in matched:
            layer = bundle.module.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise MethodError(f"lora-reparam adapts nn.Linear only; {name} is a {type(layer).__name__}")
            w = layer.weight
            parametrize.register_parametrization(
                layer,
                "weight",
                LoRAParametrization(
                    w.shape[0], w.shape[1], adapter.rank, adapter.scale_alpha, device=w.device, dtype=w.dtype
                ),
            )
        return Adapted(bundle.module, count_params(bundle.module), matched)

    def _views(self, adapted, forward):
        module = adapted.module
        set_reparam_enabled(module, False)
        off = forward(module)
        set_reparam_enabled(module, True)
        adapter_bytes = _state_bytes({n: p for n, p in module.named_parameters() if "lora_" in n})
        for name in adapted.targets:
            parametrize.remove_parametrizations(module.get_submodule(name), "weight", leave_parametrized=True)
        return off, adapter_bytes, forward(module)


def _state_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Size of a safetensors file holding `tensors` (header included), without writing it."""
    from safetensors.torch import save

    return len(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def model_file_bytes(module: nn.Module) -> int:
    """Bytes of the model's tensors as a checkpoint would hold them (weights and buffers)."""
    return sum(t.nbytes for t in module.state_dict().values())


METHODS: dict[str, Method] = {
    m.name: m for m in (Method(), PEFT_METHODS[0], ReparamLoRA(), *PEFT_METHODS[1:])
}
BASELINE = next(name for name, m in METHODS.items() if not m.adapts)  # what Delta columns compare against


def method(name: str) -> Method:
    """The method of a cell: a registered one, or `peft:<adapter_config.json or its folder>`."""
    if name in METHODS:
        return METHODS[name]
    if name.startswith("peft:"):
        return _from_file(name[len("peft:") :])
    raise MethodError(
        f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}, or peft:<adapter_config.json>"
    )


@functools.cache
def _from_file(path: str) -> Method:
    """Any method PEFT knows, from an adapter_config.json: its settings as written, its
    target_modules in place of the model's default targets."""
    file = Path(path) / "adapter_config.json" if Path(path).is_dir() else Path(path)
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MethodError(f"peft:{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise MethodError(f"peft:{path}: not a JSON adapter_config.json ({type(e).__name__}: {e})") from None
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    kind = d.get("peft_type") if isinstance(d, dict) else None
    if kind not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise MethodError(
            f"peft:{path}: peft_type {kind!r} is not a method PEFT knows; it knows "
            f"{', '.join(sorted(PEFT_TYPE_TO_CONFIG_MAPPING))}"
        )
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[kind]
    known = {f.name for f in dataclasses.fields(cls)} - {"peft_type", "task_type", "base_model_name_or_path"}
    fields = {k: v for k, v in d.items() if k in known and v is not None}
    return PeftFile(
        f"peft:{path}",
        f"PEFT {kind} as {file} sets it",
        lambda a, t: cls(**{"target_modules": t, **fields}),
        ranked=False,
        targets=fields.get("target_modules"),
    )


class PeftFile(PeftMethod):
    """A PEFT method as an adapter_config.json sets it; its target_modules win over the model's."""

    def __init__(self, name, title, config, ranked=False, targets=None):
        super().__init__(name, title, config, ranked)
        self.targets = tuple(targets) if isinstance(targets, list) else targets

    def apply(self, bundle: Bundle, adapter: Adapter) -> Adapted:
        return super().apply(bundle, dataclasses.replace(adapter, targets=self.targets or adapter.targets))

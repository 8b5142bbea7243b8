"""Fine-tuning methods: explicit transforms from a built model to a trainable model plus its counts.

    lorabench run --dry-run --methods full,lora,lora-reparam --ranks 1 --models cifar-mlp

`full` trains every parameter. `lora` wraps the model with PEFT (an adapter path x A^T B^T
beside each frozen Linear). `lora-reparam` is seed 002's method: the Linear's weight is
re-parametrized as W + (B @ A) * alpha/r with torch.nn.utils.parametrize, which materialises a
full out x in matrix on every forward pass. Each method freezes visibly, here, not as a side
effect of a constructor, so the trainable counts below are what the optimizer receives.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

if TYPE_CHECKING:
    from .cells import Cell
    from .models import Bundle


class MethodError(ValueError):
    """A method cannot be applied as asked (no matching target, rank too large)."""


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of an adapted model. trainable = adapter + full_trained."""

    total: int          # every parameter of the adapted model, frozen ones and adapter copies included
    trainable: int
    adapter: int        # LoRA A and B matrices
    full_trained: int   # parameters trained in full: all of them for `full`; saved modules / heads for LoRA

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.total


@dataclass
class Adapted:
    module: nn.Module
    params: ParamCount
    targets: list[str]   # names of the adapted Linear modules (empty for full fine-tuning)


def count_params(module: nn.Module) -> ParamCount:
    total = trainable = adapter = 0
    for name, p in module.named_parameters():   # named_parameters() visits tied weights once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            if "lora_" in name:
                adapter += p.numel()
    return ParamCount(total, trainable, adapter, trainable - adapter)


def match_targets(module: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """PEFT's matching rule: a string is a regex matched against the whole module name; a list
    matches a module whose name equals an entry or ends with '.' + entry. Linear layers only."""
    from .models import linear_names

    names = linear_names(module)
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def _resolve(bundle: Bundle, cell: Cell) -> list[str]:
    from .models import linear_names

    targets = cell.targets if cell.targets is not None else bundle.lora_targets
    matched = match_targets(bundle.module, targets)
    if not matched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names(bundle.module)})
        raise MethodError(f"target {targets!r} matches no Linear module of {cell.model}; its Linear modules end in: "
                          f"{', '.join(leaves)}")
    for name in matched:
        layer = bundle.module.get_submodule(name)
        smaller = min(layer.weight.shape)
        if cell.rank > smaller:
            raise MethodError(f"rank {cell.rank} exceeds the smaller dimension ({smaller}) of target {name} "
                              f"{tuple(layer.weight.shape)} in {cell.model}; use a rank <= {smaller} or other targets")
    return matched


def apply_full(bundle: Bundle, cell: Cell) -> Adapted:
    bundle.module.requires_grad_(True)
    return Adapted(bundle.module, count_params(bundle.module), [])


def apply_lora(bundle: Bundle, cell: Cell) -> Adapted:
    from peft import LoraConfig, TaskType, get_peft_model

    matched = _resolve(bundle, cell)
    targets = cell.targets if cell.targets is not None else bundle.lora_targets
    task_type = {"sequence-classification": TaskType.SEQ_CLS, "causal-lm": TaskType.CAUSAL_LM}.get(bundle.task)
    config = LoraConfig(
        r=cell.rank,
        lora_alpha=cell.alpha if cell.alpha is not None else cell.rank,
        lora_dropout=cell.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        modules_to_save=list(cell.modules_to_save) or None,
        task_type=task_type,   # SEQ_CLS also trains the classifier head in full, as PEFT does by default
    )
    bundle.module.requires_grad_(False)   # the base is frozen; PEFT unfreezes adapters and saved modules
    module = get_peft_model(bundle.module, config)
    return Adapted(module, count_params(module), matched)


class LoRAParametrization(nn.Module):
    """P(W) = W + (B @ A) * alpha / r, with A ~ N(0, 1) of shape (r, in) and B = 0 of shape (out, r),
    so the model is unchanged until trained; `enabled = False` makes P the identity."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, *, device=None, dtype=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return weight + (self.lora_B @ self.lora_A) * self.scale


def apply_lora_reparam(bundle: Bundle, cell: Cell) -> Adapted:
    if cell.modules_to_save:
        raise MethodError("lora-reparam trains adapters only; modules_to_save needs --methods lora")
    matched = _resolve(bundle, cell)
    bundle.module.requires_grad_(False)   # every non-LoRA parameter is frozen (seed 002)
    alpha = cell.alpha if cell.alpha is not None else cell.rank
    for name in matched:
        layer = bundle.module.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise MethodError(f"lora-reparam adapts nn.Linear only; {name} is a {type(layer).__name__}")
        w = layer.weight
        parametrize.register_parametrization(
            layer, "weight", LoRAParametrization(w.shape[0], w.shape[1], cell.rank, alpha, device=w.device, dtype=w.dtype))
    return Adapted(bundle.module, count_params(bundle.module), matched)


def set_reparam_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every LoRAParametrization in `module` on or off (seed 002's flag)."""
    for m in module.modules():
        if isinstance(m, LoRAParametrization):
            m.enabled = enabled


def _state_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Size of a safetensors file holding `tensors` (header included), without writing it."""
    from safetensors.torch import save
    return len(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


@torch.no_grad()
def adapter_checks(adapted: Adapted, cell: Cell, forward: Callable[[nn.Module], torch.Tensor],
                   base_out: torch.Tensor) -> dict[str, float | int]:
    """After training: the merged model must give the adapter model's outputs, and the adapter
    switched off must give the base model's (`base_out`, taken before the adapter existed).
    Ends by merging, so the module is left merged. Max absolute differences, in output units."""
    module = adapted.module
    module.eval()
    on = forward(module)
    if cell.method == "lora":
        from peft import get_peft_model_state_dict
        with module.disable_adapter():
            off = forward(module)
        adapter_bytes = _state_bytes(get_peft_model_state_dict(module))
        merged = forward(module.merge_and_unload())
    else:
        set_reparam_enabled(module, False)
        off = forward(module)
        set_reparam_enabled(module, True)
        adapter_bytes = _state_bytes({n: p for n, p in module.named_parameters() if "lora_" in n})
        for name in adapted.targets:
            parametrize.remove_parametrizations(module.get_submodule(name), "weight", leave_parametrized=True)
        merged = forward(module)
    return {
        "check_merged_vs_adapter_max_abs_diff": (merged - on).abs().max().item(),
        "check_adapter_off_vs_base_max_abs_diff": (off - base_out).abs().max().item(),
        "check_adapter_on_vs_base_max_abs_diff": (on - base_out).abs().max().item(),
        "adapter_file_bytes": adapter_bytes,
    }


def model_file_bytes(module: nn.Module) -> int:
    """Bytes of the model's tensors as a checkpoint would hold them (weights and buffers)."""
    return sum(t.nbytes for t in module.state_dict().values())


METHODS: dict[str, Callable[[Bundle, Cell], Adapted]] = {
    "full": apply_full,
    "lora": apply_lora,
    "lora-reparam": apply_lora_reparam,
}


def apply(bundle: Bundle, cell: Cell) -> Adapted:
    return METHODS[cell.method](bundle, cell)

"""Seed 002's re-parametrization: a Linear's weight seen as W + (B @ A) * alpha/r through
torch.nn.utils.parametrize, the full out x in matrix materialised on every forward pass, and
switched off (the base alone) for the adapter-off check. `methods.ReparamLoRA` applies it.
"""

from __future__ import annotations

import torch
from torch import nn


class LoRAParametrization(nn.Module):
    """P(W) = W + (B @ A) * alpha / r, with A ~ N(0, 1) of shape (r, in) and B = 0 of shape (out, r),
    so the model is unchanged until trained; `enabled = False` makes P the identity."""

    def __init__(
        self, out_features: int, in_features: int, rank: int, alpha: float, *, device=None, dtype=None
    ):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return weight + (self.lora_B @ self.lora_A) * self.scale


def set_reparam_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every LoRAParametrization in `module` on or off (seed 002's flag)."""
    for m in module.modules():
        if isinstance(m, LoRAParametrization):
            m.enabled = enabled

"""Gradient checkpointing of a cell (`--grad-checkpointing`): activations inside a block recomputed
in backward instead of kept.

    lorabench run --models bert-tiny --methods full,lora --ranks 8 --grad-checkpointing off,on
"""

from __future__ import annotations

from torch import nn

from .models import ModelError
from .settings import switch

CHECKPOINTING = switch(
    on="activations recomputed in backward, block by block (transformers' own; per Linear for the MLP)",
    off="activations kept for backward",
)


def checkpoint(module: nn.Module) -> None:
    """Gradient checkpointing of a built (and adapted) model: transformers' own, non-reentrant (so
    no input needs a gradient, and PEFT's frozen embeddings are no obstacle), or for a plain
    nn.Sequential (the MLP) torch.utils.checkpoint over one segment per Linear. Activations inside
    a block are then recomputed in backward instead of kept; the block inputs stay."""
    import types

    from torch.utils.checkpoint import checkpoint_sequential

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    if hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False  # a cache is of no use to training, and checkpointing refuses one
        return
    if not isinstance(base, nn.Sequential):
        raise ModelError(
            f"gradient checkpointing needs a transformers model or an nn.Sequential; this is a "
            f"{type(base).__name__}"
        )
    segments = max(
        sum(any(True for _ in m.parameters()) for m in base.children()), 1
    )  # a Linear (adapted or not) each
    base.forward = types.MethodType(
        lambda self, x: checkpoint_sequential(self, segments, x, use_reentrant=False), base
    )

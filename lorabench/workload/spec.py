"""What a cell trains, and the one build of it: on the meta device to count it, on fake tensors to
simulate its step, on a real device to run it.

    lorabench run --dry-run --models medium-llama --methods full,lora --ranks 16   # built on meta
    lorabench run --models medium-llama --methods full,lora --ranks 16             # built on the device

The survey, the simulated step, the real-step FLOP count and the experiment all build through
`base`, `hold` and `adapt`, so a prediction is of the very model the cell then trains: its weights' dtype,
its quantised base, its method and adapters, its checkpointing. A new setting that changes what is
trained is added here once. (The experiment runs between them: it pretrains the base before it is
held in bits, and reads its outputs before the method is applied.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import bases, models, quantization
from .checkpointing import checkpoint
from .data import SYNTHETIC
from .methods import Adapted, Adapter
from .methods import method as method_of
from .precision import TORCH


@dataclass(frozen=True)
class Spec:
    """What a cell trains: the model, its weights and task, the method and its adapter, the dtype
    its weights (and their gradients and optimizer state) are kept in, how its base is quantised,
    and whether its activations are recomputed (gradient checkpointing)."""

    model: str
    method: str
    adapter: Adapter = Adapter()
    weights: str = "random"
    task: str | None = None
    dtype: str = "float32"
    quantize: str = "none"
    checkpointing: bool = False
    # whose source task a trained base learnt (`bases`): the synthetic one or the digits
    data: str = SYNTHETIC

    @property
    def quantized(self) -> bool:
        return quantization.QUANTIZATIONS[self.quantize].bits is not None


def base(spec: Spec, device: torch.device | str | None = None, weights: str | None = None) -> models.Bundle:
    """The base model of `spec`, built on `device` (None: torch's current default, as inside
    `with torch.device("meta")`), in the weights' dtype. `weights` overrides the spec's (the survey
    counts a pretrained model on its configuration's random weights)."""
    weights = weights or spec.weights
    trained = models.WEIGHTS[weights].trained
    bundle = models.build(spec.model, "random" if trained else weights, spec.task)
    if trained:  # the configuration's model, its weights those of the base made on the source task
        bases.load(bundle.module, spec.model, bundle.task.name, data=spec.data)
    bundle.module.to(**({"device": device} if device is not None else {}), dtype=TORCH[spec.dtype])
    return bundle


def hold(spec: Spec, bundle: models.Bundle, device: torch.device | str | None = None) -> None:
    """The base held as the cell trains on it: in bits where it is quantised (on a real device:
    bitsandbytes runs no meta or fake tensors, so there it stays in the weights' dtype, and the
    prediction counts the bits in closed form)."""
    where = torch.device(device) if device is not None else next(bundle.module.parameters()).device
    if spec.quantized and where.type != "meta":
        quantization.quantize(bundle.module, spec.quantize, where)


def adapt(spec: Spec, bundle: models.Bundle, device: torch.device | str | None = None) -> Adapted:
    """The method of `spec` applied to a built (and held) base, as the cell trains it: the adapters
    on the base's device in the weights' dtype (a quantised base keeps its own), gradient
    checkpointing on where asked, in training mode."""
    where = torch.device(device) if device is not None else next(bundle.module.parameters()).device
    adapted = method_of(spec.method).apply(bundle, spec.adapter)
    adapted.module.to(device=where, **({} if spec.quantized else {"dtype": TORCH[spec.dtype]}))
    if spec.checkpointing:
        checkpoint(adapted.module)
    adapted.module.train()
    return adapted


def build(
    spec: Spec, device: torch.device | str | None = None, weights: str | None = None
) -> tuple[models.Bundle, Adapted]:
    """`base`, `hold`, then `adapt`: the trainable model of `spec` on `device`."""
    bundle = base(spec, device, weights)
    hold(spec, bundle, device)
    return bundle, adapt(spec, bundle, device)

"""Numeric precision of a cell: the dtype weights and Adam's state are kept in, and autocast.

    lorabench run --models bert-tiny --methods lora --ranks 8 --precision fp32,bf16-mixed,fp16-mixed,bf16

`*-mixed` keeps fp32 master weights and optimizer state and runs the forward (and so the
backward's products) under torch.autocast at 16 bits; fp16 adds a GradScaler, whose loss scale
keeps small gradients from flushing to zero. `bf16` (and `fp16`) keep the weights themselves at
16 bits, with no master copy. A device that cannot run a precision (autocast or a dtype it lacks)
gets its cells `skipped` with the reason, found by trying a small step before the run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import first_line
from .settings import Choice


@dataclass(frozen=True, kw_only=True)
class Level(Choice):
    """One `--precision` value: the dtype of weights, gradients and the optimizer's state, and the
    dtype autocast runs the products at (None: no autocast)."""

    weights: str = "float32"
    autocast: str | None = None

    @property
    def compute(self) -> str:
        """The dtype of the step's matrix products."""
        return self.autocast or self.weights


PRECISIONS: dict[str, Level] = {
    "fp32": Level(description="fp32 weights, state and products"),
    "bf16-mixed": Level(
        description="fp32 weights and state, products under bf16 autocast", autocast="bfloat16", probe=True
    ),
    "fp16-mixed": Level(
        description="fp32 weights and state, products under fp16 autocast, a GradScaler",
        autocast="float16",
        probe=True,
    ),
    "bf16": Level(description="bf16 weights, state and products", weights="bfloat16", probe=True),
    "fp16": Level(description="fp16 weights, state and products", weights="float16", probe=True),
}
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES: dict[str, Choice] = {
    name: Choice(f"weights kept in {name} (--precision's older spelling)") for name in TORCH
}
OF_DTYPE = {level.weights: name for name, level in PRECISIONS.items() if not level.autocast}  # --dtype's


def resolve(precision: str, dtype: str) -> tuple[str, str]:
    """(precision, dtype) of a cell, one spelling each: `--dtype bfloat16` is `--precision bf16`, and
    the dtype follows a precision. ValueError where the two disagree."""
    if precision == "fp32" and dtype != "float32":
        return OF_DTYPE[dtype], dtype
    weights = PRECISIONS[precision].weights
    if weights != dtype and dtype != "float32":
        raise ValueError(f"--dtype {dtype} and --precision {precision} disagree; give --precision only")
    return precision, weights


_NONE = contextlib.nullcontext()


class Precision:
    """How a step runs at `name` on `device`: its autocast context, backward and optimizer step."""

    def __init__(self, name: str = "fp32", device: torch.device | str = "cpu"):
        self.name, self.device = name, torch.device(device)
        cast = PRECISIONS[name].autocast
        self.cast = TORCH[cast] if cast else None
        self.scaler = torch.amp.GradScaler(self.device.type) if name == "fp16-mixed" else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.cast) if self.cast is not None else _NONE

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:  # skips a step whose gradients overflowed, and adapts the scale
            self.scaler.step(optimizer)
            self.scaler.update()


def unsupported(name: str, device: str) -> str | None:
    """Why `device` cannot train at `name` (a small Linear's forward, backward and step), or None."""
    weights = PRECISIONS[name].weights
    try:
        amp = Precision(name, device)
        layer = torch.nn.Linear(16, 16).to(device=device, dtype=TORCH[weights])
        optimizer = torch.optim.Adam(layer.parameters())
        with amp.autocast():
            loss = layer(torch.randn(4, 16, device=device, dtype=TORCH[weights])).float().square().mean()
        amp.backward(loss)
        amp.step(optimizer)
    except Exception as e:  # a dtype or autocast this device or build does not have
        return f"{name} cannot run on {device}: {type(e).__name__}: {first_line(e)[:200]}"
    return None

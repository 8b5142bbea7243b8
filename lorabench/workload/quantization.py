"""Quantised bases (QLoRA): the frozen Linear layers held in 4 or 8 bits by bitsandbytes.

    pip install 'lorabench[quant]'
    lorabench run --models bert-tiny --methods lora --ranks 8 --quantize none,nf4,int8

Every Linear but the output head (the last one) becomes a bitsandbytes layer holding the same
weights: `nf4` packs two 4-bit NormalFloat codes per byte with a scale per block of 64 weights,
the scales themselves quantised to 8 bits with an fp32 scale per 256 of them (QLoRA's double
quantisation, bitsandbytes' default), `int8` one byte per weight with an fp32 scale
per output row (LLM.int8). The adapters then train beside the frozen quantised base, after
PEFT's `prepare_model_for_kbit_training`. A device or install bitsandbytes cannot serve gets the
cell `skipped` with the reason, found by trying a small layer before the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import first_line
from ..forksafe import allow
from .settings import Choice

# bitsandbytes logs on every start that an optional CPU kernel package is absent; set here, at
# import, before any cell imports it.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

NF4_BLOCK, NF4_NESTED = 64, 256  # weights per (8-bit) absmax scale; scales per fp32 scale of those


@dataclass(frozen=True, kw_only=True)
class Quantization(Choice):
    """One `--quantize` value: the bits the frozen base's Linear layers are held in (None: the
    weights' own dtype)."""

    bits: int | None = None


def _in_bits(kind: str):
    """What a quantised base asks of the rest of its cell."""

    def requires(cell) -> str | None:
        from .methods import method

        if not method(cell.method).adapts:
            return f"--quantize {kind} freezes the base in bits: it needs an adapter method, not {method(cell.method).title}"
        if cell.nproc > 1:
            return "--quantize runs in one process; give --nproc 1"
        return None

    return requires


QUANTIZATIONS: dict[str, Quantization] = {
    "none": Quantization(description="the base at the weights' dtype"),
    "nf4": Quantization(
        description="4-bit NormalFloat, double-quantised scales (QLoRA)",
        bits=4,
        requires=_in_bits("nf4"),
        probe=True,
    ),
    "int8": Quantization(
        description="8 bits with a scale per output row (LLM.int8)",
        bits=8,
        requires=_in_bits("int8"),
        probe=True,
    ),
}


def _bnb():
    """bitsandbytes, imported in this (cell or probe) process though the parent and the fork server
    keep it out: its import queries CUDA (`forksafe`)."""
    try:
        return allow("bitsandbytes")
    except ImportError:
        raise ImportError("bitsandbytes is not installed (pip install 'lorabench[quant]')") from None


def targets(module: nn.Module) -> list[str]:
    """The Linear layers a quantised base holds in bits: every one but the output head."""
    names = [
        n.replace(".base_layer", "")
        for n, m in module.named_modules()  # an adapted model: its base's
        if isinstance(m, nn.Linear) and "lora_" not in n
    ]
    return names[:-1]


def _layer(kind: str, linear: nn.Linear, device: torch.device | str) -> nn.Module:
    """`linear` as a bitsandbytes layer on `device`, quantised there: nf4 as its weight moves from
    the CPU, int8 where its weight is moved first. An int8 layer must not move once quantised:
    `Module.to` keeps the parameter object and swaps its data, so the scales and codes bitsandbytes
    keeps beside it (CB, SCB) would stay on the old device."""
    bnb = _bnb()
    has_bias = linear.bias is not None
    if QUANTIZATIONS[kind].bits == 4:
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=linear.weight.dtype,
            quant_type="nf4",
        )
        q.weight = bnb.nn.Params4bit(linear.weight.data.float(), requires_grad=False, quant_type="nf4")
        # On a CPU with AVX512-BF16, an eval-mode forward repacks the weight for inference for good,
        # and the next training forward fails (bitsandbytes 0.50: "a view of a leaf Variable ... in-place"):
        # training evaluates after every epoch, so the repacking is kept off.
        q.support_avx512bf16_for_cpu = False
    else:
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False
        )
        q.weight = _int8(bnb, linear.weight.data.to(device))
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data.to(device, copy=True), requires_grad=False)
    return q.to(device)


def _int8(bnb, weight: torch.Tensor):
    """LLM.int8's weight, quantised here, on the device `weight` is on: one byte per weight and an
    fp32 scale per output row. Not left to `Int8Params.to`, which quantises only on a move from
    the CPU (bitsandbytes 0.50, nn/modules.py): a weight already on the GPU would stay fp32 until
    the first forward, and the cell's weights and checkpoint figures would be 4x too large."""
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)


def quantize(module: nn.Module, kind: str, device: torch.device) -> int:
    """Replace `targets(module)` by bitsandbytes layers quantised on `device` (`_layer`) and prepare
    the model for training adapters on them (PEFT's prepare_model_for_kbit_training: the base
    frozen, norms in fp32, inputs that require grad). Returns how many layers were replaced."""
    names = targets(module)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, leaf, _layer(kind, getattr(owner, leaf), device))
    module.requires_grad_(False)
    # what PEFT reads to wrap bitsandbytes layers with its own k-bit LoRA layers (merging included)
    module.is_loaded_in_4bit, module.is_loaded_in_8bit = (QUANTIZATIONS[kind].bits == b for b in (4, 8))
    if hasattr(module, "config"):  # a transformers model: PEFT's preparation for a k-bit base
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(module, use_gradient_checkpointing=False)
    return len(names)


def weight_bytes(params) -> int:
    """Bytes of the weights as held: every parameter's storage, and each quantised weight's scales."""
    total = 0
    for p in params:
        total += p.nbytes
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.nbytes + (
                state.state2.absmax.nbytes if getattr(state, "nested", False) else 0
            )
        scales = getattr(p, "SCB", None)
        if scales is not None:
            total += scales.nbytes
    return total


def predicted_bytes(module: nn.Module, kind: str, b: int) -> int:
    """The weights' bytes once quantised (`module` may sit on the meta device): the quantised
    layers' payload and scales, every other parameter at `b` bytes."""
    quantised = {f"{n}.weight" for n in targets(module)}
    total = 0
    for name, p in module.named_parameters():
        if name.replace("base_layer.", "") in quantised:
            n = p.numel()
            blocks = -(-n // NF4_BLOCK)
            total += (
                n // 2 + blocks + -(-blocks // NF4_NESTED) * 4
                if QUANTIZATIONS[kind].bits == 4
                else n + p.shape[0] * 4
            )
        else:
            total += p.numel() * b
    return total


def unsupported(kind: str, device: str) -> str | None:
    """Why `kind` cannot run on `device` (a small quantised layer's forward and backward), or None."""
    if QUANTIZATIONS[kind].bits is None:
        return None
    try:
        q = _layer(kind, nn.Linear(64, 64), device)
        x = torch.randn(4, 64, device=device, requires_grad=True)
        q(x).float().sum().backward()
    except Exception as e:  # not installed, no kernel for this device, a driver problem
        return f"--quantize {kind} cannot run on {device}: {type(e).__name__}: {first_line(e)[:200]}"
    return None

"""Load the base model as an adapter was trained on it: the recorded base, stored in the recorded format.

The one place where `peftkit generate`, `merge`, `export` and `serve` turn an adapter's training record
(`peftkit.core.context.TrainingContext`) into a base model: which weights (the recorded name unless the user names
another), in which dtype they are quantized from (training quantized bf16 or fp32 weights: the codes differ), how
they are stored (QLoRA's NF4 with its block size and double quantization), and whether they are the weights the
adapter was trained on (the fingerprint).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from torch import nn

from peftkit.core.context import Quantization, TrainingContext, fingerprint
from peftkit.quant import apply_quantization

__all__ = ["Base", "base_name", "base_quantization", "load_base", "load_base_as"]


@dataclasses.dataclass
class Base:
    """A base model loaded for an adapter.

    Attributes:
        model: the model (eval mode), quantized when `quantization` says so.
        tokenizer: its tokenizer.
        name: the name it was loaded by.
        quantization: how its linear layers are stored (None: full precision).
        fingerprint: `fingerprint` of its weights before quantization (what adapters record).
    """

    model: nn.Module
    tokenizer: Any
    name: str
    quantization: Quantization | None
    fingerprint: str | None


def base_name(context: TrainingContext | None, model: str | None = None) -> str:
    """The base to load for an adapter: `model` if the user names one, else the recorded base, else the bundled
    model."""
    from peftkit.models import BUNDLED_NAME

    return model or (context.base if context is not None else None) or BUNDLED_NAME


def base_quantization(recorded: Quantization | None, quantize: str | None) -> Quantization | None:
    """The format to store the base in: `quantize` None keeps the `recorded` one; ``"none"``: full precision; a
    format name: that format with the recorded block size, double quantization and source dtype (else defaults)."""
    if quantize is None:
        return recorded
    if quantize == "none":
        return None
    return dataclasses.replace(recorded, format=quantize) if recorded else Quantization(quantize)


def load_base_as(
    name: str,
    quantization: Quantization | None,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float32,
) -> Base:
    """Load `name` and store it as `quantization` says (training's way: quantized from the weights in the dtype
    training quantized, then every floating-point weight in `dtype`)."""
    from peftkit.models import load_model

    load_dtype = getattr(torch, quantization.source_dtype) if quantization is not None else dtype
    model, tokenizer = load_model(name, dtype=load_dtype)
    base_fingerprint = fingerprint(model)  # before quantizing: adapters record the weights they were trained on
    if quantization is not None:
        apply_quantization(model, quantization, compute_dtype)
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return Base(model, tokenizer, name, quantization, base_fingerprint)


def load_base(
    context: TrainingContext | None,
    model: str | None = None,
    quantize: str | None = None,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any, Quantization | None]:
    """Load the base model an adapter was trained on, stored as training stored it.

    Args:
        context: the adapter's training context (None: an adapter without one).
        model: the base to load instead of the recorded one (default: recorded, else the bundled model).
        quantize: None: as recorded; ``"none"``: the full-precision base; a format: that format (with the recorded
            block size and double quantization, else the defaults).
        dtype: the dtype of the weights that stay in floating point.
        compute_dtype: the dtype a quantized weight dequantizes to.

    Returns:
        ``(model, tokenizer, quantization)``: `quantization` says what the base was stored in (None: full precision).
        A base whose fingerprint differs from the recorded one is used, with one warning line naming both.
    """
    recorded = context.quantization if context is not None else None
    name = base_name(context, model)
    base = load_base_as(name, base_quantization(recorded, quantize), dtype, compute_dtype)
    if context is not None and context.fingerprint is not None and base.fingerprint != context.fingerprint:
        print(f"peftkit: warning: base {name} (fingerprint {base.fingerprint}) differs from the base this adapter "
              f"was trained on ({context.base}, fingerprint {context.fingerprint}); its answers may be off",
              file=sys.stderr)
    return base.model, base.tokenizer, base.quantization

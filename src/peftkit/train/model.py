"""The model of a training run: loaded (or given), quantized if asked, adapted by the method, dtypes set."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from peftkit.core.adapter_io import apply_method
from peftkit.core.context import Quantization, TrainingContext, fingerprint
from peftkit.hardware import Precision, resolve_precision
from peftkit.quant import QuantLinear, apply_quantization
from peftkit.train.config import TrainConfig
from peftkit.train.packed_attention import use_packed_attention

__all__ = ["count_parameters", "prepare_model"]


def count_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable / total parameter counts (shared tensors counted once) and the trainable percentage.

    A 4-bit weight is a buffer, not a parameter; it counts as the weight it stands for (d_out x d_in).
    """
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    total = sum(p.numel() for p in seen.values()) + quantized
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def prepare_model(cfg: TrainConfig, model: nn.Module | None = None, tokenizer=None,
                  precision: Precision | None = None, weights: bool = True):
    """Load (or take) the model, quantize it if asked, adapt it with the method, set dtypes.

    ``weights=False`` (a model loaded here): the same modules with nothing in them (the meta device; see
    `peftkit.models.load_model`), for a rank that receives its shards from the first one."""
    precision = precision or resolve_precision(cfg.precision)
    if model is None:
        from peftkit.models import load_model

        model, tokenizer = load_model(cfg.model, dtype=precision.weight_dtype, weights=weights)
    quantization = None
    if cfg.quantize != "none":
        source = next((m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)), torch.float32)
        quantization = Quantization(cfg.quantize, cfg.quant_block_size, cfg.double_quant,
                                    str(source).removeprefix("torch."))
    # what the adapter will remember of its base (before quantization and adaptation change the weights)
    context = TrainingContext(base=cfg.model, fingerprint=fingerprint(model), quantization=quantization)
    if quantization is not None:
        # the dequantized weight is in the compute dtype: bf16 (QLoRA as published), fp16, or fp32 activations
        apply_quantization(model, quantization, precision.compute_dtype)
    report = apply_method(model, cfg.method, cfg.method_settings())
    # completed with the template and prompt by `Trainer`; save_adapter writes it (torch types setattr too narrowly)
    model.peftkit_context = context  # type: ignore[assignment]
    # Frozen weights in 16 bits (bf16 / fp16) halve memory and run 16-bit matmuls; trainable weights are fp32
    # masters in every precision.
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if p.requires_grad else precision.weight_dtype)
    use_packed_attention(model)  # per-example attention in packed training batches (other calls: sdpa, unchanged)
    if cfg.gradient_checkpointing:
        lm = cast(Any, model)  # a transformers model
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
    return model, tokenizer, report

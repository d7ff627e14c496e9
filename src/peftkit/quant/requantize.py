"""Re-quantizing a merged model, with the error measured rather than warned about.

Merging a LoRA update into a 4-bit base needs a dense weight: peftkit dequantizes, merges, and saves a bf16/fp32
model. Quantizing that merged model again is possible but lossy — the low-rank update is small next to the 4-bit
grid spacing, so part of it can round away. `requantize_with_report` quantizes in place and reports how much:
per-layer relative weight error ``||W - Q(W)|| / ||W||`` (max and mean over layers) and the change in held-out loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

from peftkit.quant.blockwise import dequantize, quantize
from peftkit.quant.linear import quantize_model

__all__ = ["RequantReport", "requantize_with_report"]


@dataclasses.dataclass
class RequantReport:
    format: str
    layers: int
    max_rel_error: float
    mean_rel_error: float
    loss_before: float | None
    loss_after: float | None

    def __str__(self) -> str:
        text = (f"re-quantized {self.layers} layers to {self.format}: relative weight error max "
                f"{self.max_rel_error:.4f}, mean {self.mean_rel_error:.4f}")
        if self.loss_before is not None and self.loss_after is not None:
            text += (f"; held-out loss {self.loss_before:.4f} -> {self.loss_after:.4f} "
                     f"({self.loss_after - self.loss_before:+.4f})")
        return text


def requantize_with_report(
    model: nn.Module,
    format: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    loss_fn: Callable[[nn.Module], float] | None = None,
    skip: Iterable[str] = ("lm_head",),
) -> RequantReport:
    """Quantize the linear layers of a (merged, dense) model in place and measure what it cost.

    Args:
        loss_fn: ``loss_fn(model) -> float`` on held-out data; called before and after when given.
    """
    loss_before = loss_fn(model) if loss_fn is not None else None
    errors = []
    skip = tuple(skip)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(name.endswith(s) for s in skip):
            w = module.weight.detach().float()
            data, state = quantize(w, format, block_size=block_size, double_quant=double_quant)
            errors.append(float((dequantize(data, state, torch.float32) - w).norm() / w.norm().clamp_min(1e-12)))
    quantize_model(model, format, block_size=block_size, double_quant=double_quant, compute_dtype=compute_dtype,
                   skip=skip)
    loss_after = loss_fn(model) if loss_fn is not None else None
    return RequantReport(format, len(errors), max(errors, default=0.0), sum(errors) / max(len(errors), 1),
                         loss_before, loss_after)

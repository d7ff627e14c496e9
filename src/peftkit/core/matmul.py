"""``x @ W^T`` for a weight that does not train, by oneDNN's linear primitive on CPU in fp32.

For fp32 ``F.linear`` torch calls MKL's sgemm, whose ``x @ W^T`` layout ran below oneDNN's linear primitive on the
bundled model's shapes (2-core AVX2 EPYC; the output head's the most), while the backward product ``g @ W`` runs as
fast in MKL. So the forward product of a frozen weight goes to oneDNN (already
in torch: ``torch.ops.mkldnn._linear_pointwise`` takes the plain dense tensors, no weight copy) and everything else
stays as it was. Only with autograd recording (training): inference keeps ``F.linear``, so that a LoRA layer at init
or a merged model gives the base model's logits bit for bit. Other dtypes and devices, and builds without oneDNN,
use ``F.linear``. ``PEFTKIT_ONEDNN_LINEAR=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FrozenLinear", "frozen_linear", "frozen_product", "onednn_linear_enabled"]


@functools.cache
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear_enabled(x: torch.Tensor, weight_dtype: torch.dtype, bias: torch.Tensor | None = None) -> bool:
    """Whether a frozen product of `x` with a weight of `weight_dtype` goes to oneDNN here (call it outside a
    Function's forward: autograd is off inside one)."""
    return (torch.is_grad_enabled() and x.device.type == "cpu" and _onednn_available()
            and x.dtype == weight_dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and os.environ.get("PEFTKIT_ONEDNN_LINEAR", "1") != "0")


def frozen_product(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    """``x2 @ weight^T (+ bias)`` for a 2-D `x2`, without autograd; `onednn` from `onednn_linear_enabled`."""
    if onednn:
        return torch.ops.mkldnn._linear_pointwise(x2.contiguous(), weight.contiguous(), bias, "none", [], "")
    return F.linear(x2, weight, bias)


class FrozenLinear(torch.autograd.Function):
    """``F.linear`` for a weight and bias that do not train: `frozen_product` forward, ``g @ W`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return frozen_product(x.reshape(-1, x.shape[-1]), weight, bias, True).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through `FrozenLinear` where that is faster; the weight must not train."""
    trains = weight.requires_grad or (bias is not None and bias.requires_grad)
    if trains or not onednn_linear_enabled(x, weight.dtype, bias):
        return F.linear(x, weight, bias)
    return FrozenLinear.apply(x, weight, bias)

"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, https://arxiv.org/abs/2402.09353).

    W' = m * (W0 + s B A) / ||W0 + s B A||_c        y = x W'^T + b

A and B are LoRA's (same shapes, init and scale s); m (d_out) is a trained magnitude per output row, initialised to
``||W0||_c`` so the adapted model starts equal to the base. ``||.||_c`` is the L2 norm over the input dimension of
each output row, and it is detached from the gradient graph (the paper's section 4.3, as peft does): gradients flow
to m, A and B through ``m / ||.||_c`` and ``W0 + s B A`` only.

The adapted layer is a `LoRALayer` with one more parameter, ``lora_magnitude_vector``: the state-dict and adapter
file keys are exactly Hugging Face peft's for ``use_dora: true`` (``...q_proj.lora_magnitude_vector``). It adapts
``nn.Linear``, GPT-2's ``Conv1D`` and peftkit's 4-bit ``QuantLinear`` (DoRA over an NF4 base).

Note:
    Speed: the norm depends only on W0, A, B and s, and it is detached, so it is computed once per change of A or
    B (once per optimizer step in training, not once per forward or per micro-batch) and reused: exact, since it is
    recomputed whenever A or B differs from the copies it was computed from (`DoRALayer.weight_norm`).
    The forward is LoRA's fused product ``z = x W0^T + s (x A^T) B^T`` followed by one column scaling
    ``y = (m / n) z + b``; backward is LoRA's plus one pass over the output gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.core.inject import InjectReport
from peftkit.core.matmul import onednn_linear_enabled
from peftkit.core.registry import Capabilities, MemoryModel, Merging, register_method
from peftkit.errors import PeftkitError
from peftkit.methods import lora
from peftkit.methods.lora import LoRAConfig, LoRALayer, _adapted, _FusedLoRALinear
from peftkit.quant import QuantLinear

if TYPE_CHECKING:
    from peftkit.memory import Arch

__all__ = ["DoRAConfig", "DoRALayer", "dora_layers"]


@dataclasses.dataclass
class DoRAConfig(LoRAConfig):
    """DoRA settings: LoRA's (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``target_modules``); in a
    peft adapter file it is a LoRA config with ``use_dora: true``."""

    peft_unsupported: ClassVar[dict[str, Any]] = {
        k: v for k, v in LoRAConfig.peft_unsupported.items() if k != "use_dora"}

    @classmethod
    def peft_matches(cls, fields: dict[str, Any]) -> bool:
        return bool(fields.get("use_dora", False))

    def validate(self) -> None:
        super().validate()
        if self.init_lora_weights is not True:  # peft's conversion to a portable file drops the magnitude
            raise PeftkitError(f"init_lora_weights={self.init_lora_weights!r} is not supported with DoRA; use True")

    def peft_fields(self, model: nn.Module) -> dict[str, Any]:
        return {**super().peft_fields(model), "use_dora": True}


class DoRALayer(LoRALayer):
    """A `LoRALayer` whose output rows are rescaled to a trained magnitude (see the module docstring)."""

    lora_magnitude_vector: nn.Parameter

    @staticmethod
    @functools.cache
    def _class_for(base_cls: type[nn.Module], residual: bool = False) -> type[nn.Module]:
        return type(f"DoRA{base_cls.__name__}", (DoRALayer, base_cls), {"_base_cls": base_cls})

    @classmethod
    def from_module(cls, base: nn.Module, config: LoRAConfig) -> nn.Module:
        """A DoRA version of `base` sharing its (frozen) tensors, m = ``||W0 + s B A||_c`` (= ``||W0||_c``, B = 0)."""
        layer = super().from_module(base, config)
        layer._norm_key = None
        layer._merged_norm = None
        layer.lora_magnitude_vector = nn.Parameter(layer.weight_norm().to(layer.lora_A.weight.dtype).clone())
        return layer

    def adapter_params(self) -> list[str]:
        return [*super().adapter_params(), "lora_magnitude_vector"]

    def dense_weight(self) -> torch.Tensor:
        """W0 as a (d_out, d_in) fp32 matrix (a 4-bit base dequantized, GPT-2's Conv1D transposed); an fp32 base's
        own tensor (a view): never write to it."""
        if isinstance(self, QuantLinear):
            return self.dequantize_weight(torch.float32)
        weight = self.weight.detach().float()
        return weight.t() if isinstance(self, Conv1D) else weight

    def weight_norm(self) -> torch.Tensor:
        """``||W0 + s B A||_c`` in fp32, detached; recomputed only when A, B or W0 changed since the last call.

        Note:
            A and B are compared by content with the copies the norm was computed from (r x (d_in + d_out)
            elements, a small fraction of the norm's d_out x d_in work): version counters are not enough, since
            fused optimizer kernels (``torch.optim.AdamW(fused=True)``) update parameters in place without bumping
            them. W0 is frozen; a merge or a load writes it through ``copy_``, which its version counter sees.
        """
        a, b, w = self.lora_A.weight.detach(), self.lora_B.weight.detach(), self.weight
        key = (w.data_ptr(), w._version, self.scale)
        seen = self._norm_key
        if seen is None or seen[0] != key or not (torch.equal(seen[1], a) and torch.equal(seen[2], b)):
            with torch.no_grad():
                full = torch.addmm(self.dense_weight(), b.float(), a.float(), alpha=self.scale)
                self._norm = torch.linalg.vector_norm(full, dim=1)
            self._norm_key = (key, a.clone(), b.clone())
        return self._norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.lora_enabled:
            return self._base_cls.forward(self, x)
        ratio = self.lora_magnitude_vector / self.weight_norm().to(self.lora_magnitude_vector.dtype)
        if (base := self._fused_base(x)) is not None:
            weight, bias, state = base
            if state is not None:
                x = x.to(self.compute_dtype)
            onednn = onednn_linear_enabled(x, x.dtype if state is not None else self.weight.dtype, None)
            z = _FusedLoRALinear.apply(x, weight, None, self.lora_A.weight, self.lora_B.weight, self.scale, state,
                                       onednn)
            ratio = ratio.to(z.dtype)
            return z * ratio if bias is None else torch.addcmul(bias.to(z.dtype), z, ratio)
        return self._unfused_forward(x, ratio)

    def _unfused_forward(self, x: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """peft's arithmetic: ``y = base(x) + (m/n - 1) x' W0^T + (m/n) s B A x'``, x' the dropped input; without
        active dropout ``x' W0^T`` is the base output less its bias (with dropout peft recomputes it from x')."""
        out = self._base_cls.forward(self, x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        dropout = self.lora_dropout
        if isinstance(dropout, nn.Identity) or not dropout.training or dropout.p == 0.0:
            dropped, base_out = x, out if self.bias is None else out - self.bias.to(out.dtype)
        else:
            dropped = dropout(x)
            base_out = F.linear(dropped, self.dense_weight().to(dropped.dtype))
        h = self.lora_B(self.lora_A(dropped)) * self.scale
        ratio = ratio.to(out.dtype)
        return out + (ratio - 1) * base_out.to(out.dtype) + ratio * h.to(out.dtype)

    def merged_weight(self, dense: torch.Tensor) -> torch.Tensor:
        """``(m / n) (W0 + s B A)`` (d_out, d_in, fp32) from W0 = `dense` (fp32, unmerged)."""
        full = dense + self.delta_weight()
        norm = torch.linalg.vector_norm(full, dim=1)
        self._merged_norm = norm
        return full * (self.lora_magnitude_vector.detach().float() / norm).unsqueeze(1)

    def _set_dense(self, dense: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_((dense.t() if isinstance(self, Conv1D) else dense).to(self.weight.dtype))

    def _check_float(self) -> None:
        if not isinstance(self.weight, nn.Parameter) or not self.weight.is_floating_point():
            raise PeftkitError(f"cannot merge DoRA into a quantized {self._base_cls.__name__} in place; "
                               "use merge_and_unload(), which dequantizes first")

    def merge(self) -> None:
        """Fold the update into the base weight (idempotent); the norm of the unmerged weight is kept for
        `unmerge`."""
        if not self.merged:
            self._check_float()
            with torch.no_grad():
                self._set_dense(self.merged_weight(self.dense_weight()))
            self.merged = True

    def unmerge(self) -> None:
        """``W0 = W' n / m - s B A`` with the norm kept by `merge` (idempotent)."""
        if self.merged:
            with torch.no_grad():
                ratio = self.lora_magnitude_vector.detach().float() / self._merged_norm
                self._set_dense(self.dense_weight() / ratio.unsqueeze(1) - self.delta_weight())
            self.merged = False

    def to_base(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain base-class layer with the update folded in (quantized bases are dequantized)."""
        if isinstance(self, QuantLinear):
            dense = self._base_cls.to_linear(self, dtype or torch.float32)
            with torch.no_grad():
                dense.weight.copy_(self.merged_weight(self.dense_weight()).to(dense.weight.dtype))
            return dense
        plain = super().to_base(dtype)
        plain.__dict__["_parameters"] = {k: v for k, v in plain._parameters.items() if k != "lora_magnitude_vector"}
        for attr in ("_norm_key", "_norm", "_merged_norm"):
            plain.__dict__.pop(attr, None)
        return plain


def dora_layers(model: nn.Module) -> list[tuple[str, DoRALayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DoRALayer)]


def count(arch: Arch, config: DoRAConfig) -> list[tuple[str, int]]:
    """LoRA's A and B, and a magnitude of d_out per adapted linear layer of `arch`."""
    out = lora.count(arch, config)
    for i, lin in arch.block_linears(config.target_modules):
        out.append((f"layers.{i}.{lin.name}.lora_magnitude_vector", lin.d_out))
    return out


def _block_activations(arch: Arch, config: DoRAConfig, trainable: list[tuple[str, int]], e: int) -> int:
    """LoRA's, plus the unscaled output z (``e*d_out``) the column scaling keeps per adapted linear (for m's
    gradient); with dropout peft's arithmetic also keeps the dropped input and its base product."""
    adapted = _adapted(trainable)
    extra = sum(e * lin.d_out + ((e + 1) * lin.d_in + e * lin.d_out if config.lora_dropout > 0 else 0)
                for lin in arch.linears if lin.name in adapted)
    return lora._block_activations(arch, config, trainable, e) + extra


MEMORY = MemoryModel(adapted_linears=_adapted, block_activations=_block_activations,
                     note="DoRA: an fp32 d_out x d_in temporary while a layer's norm is recomputed (once per step)")


@register_method("dora", DoRAConfig, count=count, peft_type="LORA",
                 merging=Merging(lora.merge_and_unload, merge=lora.merge, unmerge=lora.unmerge), memory=MEMORY,
                 capabilities=Capabilities(batched_serving=False, gguf_adapter=False))
def apply(model: nn.Module, config: DoRAConfig) -> InjectReport:
    """Add DoRA to the target layers of `model` and freeze everything else."""
    return lora.adapt(model, config, "dora", DoRALayer.from_module)

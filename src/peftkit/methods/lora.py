"""LoRA: Low-Rank Adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

    W' = W0 + (alpha / r) * B A        (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r))

A (r x d_in) is Kaiming-uniform (a = sqrt(5)), B (d_out x r) is zero, so the adapted model starts equal to the
base. Dropout acts on the input of the LoRA branch only (`Dropout`: the same distribution as ``nn.Dropout``,
drawn 3-4x faster on CPU). W0 stays frozen; only A and B train.

The adapted layer is the base layer's own class with LoRA mixed in (`LoRALayer`): it keeps the frozen weight
under its original key (``...q_proj.weight``), so base checkpoints load unchanged, and adds ``lora_A`` /
``lora_B`` submodules whose keys are exactly those of Hugging Face ``peft``. The same code adapts
``nn.Linear``, GPT-2's ``Conv1D`` (weight stored d_in x d_out) and peftkit's 4-bit ``QuantLinear`` (QLoRA is LoRA
on a quantized base, not a separate method).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.core.config import Config
from peftkit.core.inject import AdapterModule, InjectReport, freeze_all, get_submodule_parent, inject
from peftkit.core.matmul import frozen_product, onednn_linear_enabled
from peftkit.core.registry import Capabilities, MemoryModel, Merging, Preset, register_method, register_preset
from peftkit.errors import PeftkitError
from peftkit.methods import lora_init, lora_native
from peftkit.optim.factory import loraplus_groups
from peftkit.quant import QuantLinear, dequantize

if TYPE_CHECKING:
    from peftkit.memory import Arch

__all__ = ["Dropout", "LoRAConfig", "LoRALayer", "lora_layers", "merge", "merge_and_unload", "unmerge"]

_OUTPUT_HEADS = ("lm_head", "embed_out", "output")


@dataclasses.dataclass
class LoRAConfig(Config):
    """LoRA settings (the names peft users know).

    Attributes:
        r: rank of the update.
        lora_alpha: scale numerator; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
        lora_dropout: dropout probability on the LoRA branch input.
        use_rslora: rank-stabilised scaling.
        target_modules: module-name suffixes, one regex over full names, or ``"all-linear"`` (every linear
            layer except the output head).
        init_lora_weights: ``True`` (Kaiming-uniform A, zero B), or from the base weight (`peftkit.methods.lora_init`):
            ``"pissa"``, ``"pissa_niter_<K>"`` (randomized SVD, K power iterations) or ``"olora"``; the layer then
            keeps the residual ``W0 - s B0 A0`` and its adapter file is the equivalent rank-2r LoRA on W0.
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): B trains at this multiple of the learning rate (peft's
            ``create_loraplus_optimizer``; A and everything else at the learning rate); None: one learning rate.
    """

    # peft options peftkit does not implement, with their neutral values: a file setting one otherwise is refused
    peft_unsupported: ClassVar[dict[str, Any]] = {
        "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "layers_to_transform": None, "bias": "none", "lora_bias": False,
    }

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] | str = "all-linear"
    init_lora_weights: bool | str = True
    loraplus_lr_ratio: float | None = None

    peftkit_only_fields = ("loraplus_lr_ratio",)  # an optimizer setting: not written to adapter_config.json unset

    def validate(self) -> None:
        if self.r <= 0:
            raise PeftkitError(f"r must be a positive integer, got {self.r}")
        if self.lora_alpha <= 0:
            raise PeftkitError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PeftkitError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise PeftkitError("target_modules is empty")
        lora_init.check_init(self.init_lora_weights)
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            raise PeftkitError(f"loraplus_lr_ratio must be > 0 (typically 2-16), got {self.loraplus_lr_ratio}")

    def optimizer_groups(self, model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]] | None:
        """The optimizer's parameter groups for `model` adapted with this config: LoRA+'s when
        `loraplus_lr_ratio` is set (B matrices and 1-D adapter vectors at ``ratio * lr``, as peft groups them),
        else None (one group). peftkit's LoRA adapts no embedding, so peft's embedding group stays empty."""
        if self.loraplus_lr_ratio is None:
            return None
        fast = {id(layer.get_parameter(name)) for _, layer in lora_layers(model) for name in layer.adapter_params()
                if name != "lora_A.weight"}
        trained = [p for p in model.parameters() if p.requires_grad]
        return loraplus_groups([p for p in trained if id(p) not in fast], [p for p in trained if id(p) in fast],
                               lr, self.loraplus_lr_ratio, weight_decay)

    @classmethod
    def peft_matches(cls, fields: dict[str, Any]) -> bool:
        """Whether a peft ``LORA`` adapter config is this method's (DoRA's when it sets ``use_dora``)."""
        return not fields.get("use_dora", False)

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def peft_fields(self, model: nn.Module) -> dict[str, Any]:
        """The fields peft's LoRA needs; GPT-2 Conv1D layers store weights transposed (fan_in_fan_out)."""
        fields: dict[str, Any] = {
            "fan_in_fan_out": any(isinstance(m, Conv1D) for m in model.modules()),
            "bias": "none", "modules_to_save": None, "init_lora_weights": True, "use_dora": False,
        }
        if self.target_modules == "all-linear":
            fields["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)})
        if self.init_lora_weights is not True:  # saved converted (lora_init.ResidualInit): rank 2r, same scale
            fields.update(r=2 * self.r, lora_alpha=self.lora_alpha * (math.sqrt(2) if self.use_rslora else 2))
        return fields


def _check_rank(r: int, d_in: int, d_out: int) -> None:
    if r > min(d_in, d_out):
        raise PeftkitError(f"r={r} is larger than the layer ({d_in} -> {d_out}); use r <= {min(d_in, d_out)}")


def _features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like layer."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a layer `is_linear` accepts (GPT-2's ``Conv1D`` stores its weight d_in x d_out)."""
    return _features(module)


def is_linear(module: nn.Module) -> bool:
    """Linear-like layers LoRA can adapt: ``nn.Linear``, GPT-2 ``Conv1D`` and 4-bit ``QuantLinear``."""
    return isinstance(module, (nn.Linear, Conv1D, QuantLinear))


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask comes from four 16-bit lanes of each 64-bit random draw.

    On CPU, ``nn.Dropout`` draws one Bernoulli sample per element, which made it about a quarter of a LoRA
    training step (measured on SmolLM2-135M, bf16, 2 x 512 tokens). Here an element is dropped when its 16-bit lane
    is below ``round(p * 65536)``, so the drop probability is p to within 1/65536; the kept elements are scaled by
    1 / (1 - p) as usual. Other devices use ``nn.Dropout`` itself (already fused there).
    """

    def active(self, x: torch.Tensor) -> bool:
        """Whether this call drops anything with peftkit's CPU mask."""
        return self.training and self.p > 0.0 and x.device.type == "cpu"

    def drop_mask(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh boolean mask of the elements of `x` to drop."""
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        return bits.view(torch.int16)[:n].view(x.shape) < round(self.p * 65536) - 32768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active(x):
            return super().forward(x)
        return x.masked_fill(self.drop_mask(x), 0).mul_(1.0 / (1.0 - self.p))


class _DroppedLinear(torch.autograd.Function):
    """``dropout(x) @ A^T`` that keeps the 1-byte drop mask for backward instead of the dropped copy of x.

    Note:
        Every LoRA layer drops its input independently, so with the usual autograd each one keeps its own fp32
        copy of its dropped input for A's gradient (q, k and v read the same x: three more copies of it). Here
        backward rebuilds the dropped input from x (which the block keeps anyway) and the mask: a quarter of the
        memory, the same gradients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, drop: torch.Tensor, p: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, drop)
        ctx.keep_scale = 1.0 / (1.0 - p)
        return F.linear(x.masked_fill(drop, 0).mul_(ctx.keep_scale), weight)  # autocast applies to F.linear

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, drop = ctx.saved_tensors
        dropped = x.masked_fill(drop, 0).mul_(ctx.keep_scale).to(grad.dtype)
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = (flat.t() @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        grad_x = (grad @ weight.to(grad.dtype)).masked_fill_(drop, 0).mul_(ctx.keep_scale).to(x.dtype)
        return grad_x, grad_w, None, None


def _dense(weight: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense matrix: itself, or a 4-bit one (`state` not None) dequantized to `dtype`."""
    return weight if state is None else dequantize(weight, state, dtype)


class _FusedLoRALinear(torch.autograd.Function):
    """``x W0^T + b + s (x A^T) B^T`` for a frozen dense or 4-bit base, as one autograd node.

    Note:
        Through autograd, adding B's product into the base output in place (a view of the base matmul's result)
        puts a ``CopySlices`` node in the graph: backward copies the whole d_out-wide gradient once per layer, and
        the input gradients of the base and the LoRA branch are summed as two more tensors. Here backward takes
        the output gradient as it comes and accumulates the LoRA branch's input gradient into the base's in place
        (one BLAS call, beta = 1). It saves the (unconverted) input and the r-wide intermediate; a 4-bit weight is
        dequantized again in backward, as `peftkit.quant.linear._QuantMatmul` does. The LoRA matmul with A runs in
        A's dtype (fp32 master weights under bf16 training), B's product in the output dtype, as on the autograd
        path.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, state: Any, onednn: bool) -> torch.Tensor:
        dense = _dense(weight, state, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        out = frozen_product(x2, dense, bias, onednn)  # oneDNN while training in fp32 on CPU (peftkit.core.matmul)
        # fp32 on CPU, small rank: the skinny products by the compiled kernel (peftkit.methods.lora_native)
        native = lora_native.usable(lora_a.shape[0], x2, out, lora_a, lora_b)
        if native:
            h = lora_native.down(x2, lora_a, scale)
            if lora_a.shape[0] <= lora_native.UP_ADD_MAX_RANK:
                lora_native.up_add(out, h, lora_b.t().contiguous())
            else:  # a pass over the d_out-wide output: BLAS does it as fast at wider ranks
                out.addmm_(h, lora_b.t())
        else:
            h = (x2.to(lora_a.dtype) @ lora_a.t()).mul_(scale)
            out.addmm_(h.to(out.dtype), lora_b.t().to(out.dtype))
        ctx.save_for_backward(x2, weight, lora_a, lora_b, h)
        ctx.scale, ctx.state, ctx.in_shape, ctx.native = scale, state, x.shape, native
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, weight, lora_a, lora_b, h = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.native and lora_native.usable(lora_a.shape[0], g2):
            return _FusedLoRALinear._native_backward(ctx, g2, x2, weight, lora_a, lora_b, h)
        # d loss / d (x A^T), r wide, in A's dtype. The skinny products read the T x d_out gradient with both
        # operands walked along d_out (B as a transposed r x d_out copy, B's gradient as (h^T g)^T): 2-6x faster
        # on CPU than the layouts autograd picks (timed at the bundled model's 1000 x 1536 gradients, r=8).
        grad_h = (g2 @ lora_b.t().to(g2.dtype).contiguous().t()).to(lora_a.dtype).mul_(ctx.scale)
        grad_x = grad_a = grad_b = None  # the base's weight and bias are frozen (`LoRALayer._fused_base`)
        if needs[0]:
            dense = _dense(weight, ctx.state, g2.dtype)
            grad_x = (g2 @ dense.to(g2.dtype)).addmm_(grad_h.to(g2.dtype), lora_a.to(g2.dtype))
            grad_x = grad_x.view(ctx.in_shape).to(x2.dtype)
        if needs[3]:
            grad_a = grad_h.t() @ x2.to(lora_a.dtype)
        if needs[4]:
            grad_b = (h.to(g2.dtype).t() @ g2).t().to(lora_b.dtype).contiguous()
        return grad_x, None, None, grad_a, grad_b, None, None, None

    @staticmethod
    def _native_backward(ctx, g2, x2, weight, lora_a, lora_b, h):
        """`backward` by `lora_native` (all fp32): one pass over g for B's gradient and g B, one over x and the input
        gradient for A's gradient and (g B) A; the base's product g W0 stays with BLAS."""
        needs = ctx.needs_input_grad
        grad_h, grad_bt = lora_native.grad_out(g2, lora_b.t().contiguous(), h, ctx.scale)
        grad_x = grad_a = None
        if needs[0]:
            dense = _dense(weight, ctx.state, g2.dtype)
            grad_x = g2 @ dense
        if needs[0] or needs[3]:
            grad_a = lora_native.grad_in(grad_x, x2, grad_h, lora_a)
        grad_x = None if grad_x is None else grad_x.view(ctx.in_shape)
        grad_b = grad_bt.t().contiguous() if needs[4] else None
        return grad_x, None, None, grad_a if needs[3] else None, grad_b, None, None, None


class LoRALayer(AdapterModule):
    """Mixin adding a LoRA branch to a linear-like layer; instances are made by `LoRALayer.from_module`."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module
    scale: float
    merged: bool
    lora_enabled: bool

    @staticmethod
    @functools.cache
    def _class_for(base_cls: type[nn.Module], residual: bool = False) -> type[nn.Module]:
        mixins = (lora_init.ResidualInit, LoRALayer) if residual else (LoRALayer,)
        prefix = "ResidualLoRA" if residual else "LoRA"
        return type(f"{prefix}{base_cls.__name__}", (*mixins, base_cls), {"_base_cls": base_cls})

    @classmethod
    def from_module(cls, base: nn.Module, config: LoRAConfig) -> nn.Module:
        """A LoRA version of `base` sharing its (frozen) tensors; `base` itself is left as it was.

        Note:
            The new object is `base`'s own class with this mixin in front, holding the same parameter and
            buffer tensors under the same names, so its state-dict keys and base forward are exactly
            `base`'s. Its module dicts are copies, so adding the LoRA submodules does not touch `base`.
        """
        d_in, d_out = _features(base)
        _check_rank(config.r, d_in, d_out)
        residual = config.init_lora_weights is not True
        if residual and isinstance(base, QuantLinear):
            raise PeftkitError(f"init_lora_weights={config.init_lora_weights!r} needs a full-precision base weight; "
                               "initialise on the fp32/bf16 model, then quantize the residual")
        layer = object.__new__(cls._class_for(type(base), residual) if residual else cls._class_for(type(base)))
        layer.__dict__.update(base.__dict__)
        for attr in ("_parameters", "_buffers", "_modules"):
            layer.__dict__[attr] = dict(base.__dict__[attr])
        ref = next(iter(base.parameters()), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else getattr(base, "compute_dtype", None)
        device = ref.device if ref is not None else next(base.buffers()).device
        layer.lora_A = nn.Linear(d_in, config.r, bias=False, device=device, dtype=dtype)
        layer.lora_B = nn.Linear(config.r, d_out, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(layer.lora_B.weight)
        layer.lora_dropout = Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        layer.scale = config.scale
        layer.merged = False
        layer.lora_enabled = True
        if residual:
            layer._init_residual(config.init_lora_weights)
        return layer

    def _init_residual(self, how: str) -> None:
        """A and B from W0 by `how` (`lora_init.init_from_weight`), and a new base weight ``W0 - s B A`` (the
        given base layer keeps W0)."""
        conv = isinstance(self, Conv1D)
        w0 = self.weight.detach().float()
        a, b = lora_init.init_from_weight(w0.t() if conv else w0, self.lora_A.weight.shape[0], self.scale, how)
        residual = torch.addmm(w0.t() if conv else w0, b, a, alpha=-self.scale)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
        self.weight = nn.Parameter((residual.t() if conv else residual).to(self.weight.dtype).contiguous(),
                                   requires_grad=False)
        self.lora_init = (self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone())

    def adapter_params(self) -> list[str]:
        return ["lora_A.weight", "lora_B.weight"]

    def _fused_base(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Any] | None:
        """(weight, bias, quant state) for `_FusedLoRALinear`, or None where the autograd path must run.

        Fused: a frozen ``nn.Linear`` (with its own forward) or ``QuantLinear`` base, no active dropout, no
        autocast, no bias on the LoRA matrices.
        """
        if torch.is_autocast_enabled(x.device.type) or self.lora_A.bias is not None or self.lora_B.bias is not None:
            return None
        dropout = self.lora_dropout
        if not isinstance(dropout, nn.Identity) and dropout.training and dropout.p > 0.0:
            return None
        bias = self.bias
        if bias is not None and bias.requires_grad:
            return None
        if self._base_cls is QuantLinear:
            return self.weight, None if bias is None else bias.to(self.compute_dtype), self.state
        if self._base_cls.forward is nn.Linear.forward and not self.weight.requires_grad:
            return self.weight, bias, None
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and self.lora_enabled and (base := self._fused_base(x)) is not None:
            weight, bias, state = base
            if state is not None:
                x = x.to(self.compute_dtype)
            onednn = onednn_linear_enabled(x, x.dtype if state is not None else self.weight.dtype, bias)
            return _FusedLoRALinear.apply(x, weight, bias, self.lora_A.weight, self.lora_B.weight, self.scale, state,
                                          onednn)
        out = self._base_cls.forward(self, x)
        if self.merged or not self.lora_enabled:
            return out
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # under autocast the matmuls pick their own dtype: no copy
        dropout = self.lora_dropout
        if isinstance(dropout, Dropout) and dropout.active(x) and self.lora_A.bias is None:
            h = _DroppedLinear.apply(x, self.lora_A.weight, dropout.drop_mask(x), dropout.p) * self.scale
        else:
            h = self.lora_A(dropout(x)) * self.scale
        # The scale goes on the r-wide intermediate, and B's product accumulates into the base output in place
        # (one BLAS call, beta = 1): no extra pass over the d_out-wide output. A linear layer's backward does not
        # need its output, so autograd allows it.
        if out.is_contiguous() and self.lora_B.bias is None:
            flat = out.view(-1, out.shape[-1])
            flat.addmm_(h.reshape(-1, h.shape[-1]).to(out.dtype), self.lora_B.weight.t().to(out.dtype))
            return out
        return out.add_(self.lora_B(h).to(out.dtype))

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, shaped (d_out, d_in), in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    def _add_to_weight(self, sign: float) -> None:
        if not isinstance(self.weight, nn.Parameter) or not self.weight.is_floating_point():
            raise PeftkitError(
                f"cannot merge LoRA into a quantized {self._base_cls.__name__} in place; "
                "use merge_and_unload(), which dequantizes first"
            )
        delta = sign * self.delta_weight()
        if isinstance(self, Conv1D):  # GPT-2 stores d_in x d_out
            delta = delta.T
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))

    def merge(self) -> None:
        """Fold the update into the base weight (idempotent)."""
        if not self.merged:
            self._add_to_weight(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the base weight (idempotent)."""
        if self.merged:
            self._add_to_weight(-1.0)
            self.merged = False

    def to_base(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain base-class layer with the update folded in (quantized bases are dequantized)."""
        if not isinstance(self.weight, nn.Parameter) or not self.weight.is_floating_point():
            dense = self._base_cls.to_linear(self, dtype or torch.float32)  # QuantLinear -> nn.Linear
            with torch.no_grad():  # a quantized base is never merged in place, so the update is still separate
                dense.weight.copy_((dense.weight.float() + self.delta_weight()).to(dense.weight.dtype))
            return dense
        self.merge()
        plain = object.__new__(self._base_cls)
        plain.__dict__.update(self.__dict__)
        modules = dict(self._modules)
        for name in ("lora_A", "lora_B", "lora_dropout"):
            modules.pop(name)
        plain.__dict__["_modules"] = modules
        for attr in ("scale", "merged", "lora_enabled", "lora_init"):
            plain.__dict__.pop(attr, None)
        if dtype is not None:
            plain.to(dtype)
        return plain


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def merge(model: nn.Module) -> None:
    """Merge every LoRA layer of `model` (idempotent)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Unmerge every LoRA layer of `model` (idempotent)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every LoRA update into its base weight and return the model with plain layers.

    Quantized (4-bit) bases are dequantized to `dtype` (default fp32) before the merge.
    """
    for name, layer in list(lora_layers(model)):
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, layer.to_base(dtype))
    return model


def _is_target_candidate(name: str, module: nn.Module) -> bool:
    return is_linear(module) and not isinstance(module, LoRALayer)


def count(arch: Arch, config: LoRAConfig) -> list[tuple[str, int]]:
    """A (r x d_in) and B (d_out x r) per adapted linear layer of `arch`."""
    out = []
    for i, lin in arch.block_linears(config.target_modules):
        _check_rank(config.r, lin.d_in, lin.d_out)
        name = f"layers.{i}.{lin.name}"
        out += [(f"{name}.lora_A.weight", config.r * lin.d_in), (f"{name}.lora_B.weight", lin.d_out * config.r)]
    return out


def _adapted(trainable: list[tuple[str, int]]) -> set[str]:
    """The adapted block linears (``self_attn.q_proj``), from ``layers.<i>.<linear>.lora_A.weight``."""
    return {n.split(".", 2)[2].removesuffix(".lora_A.weight") for n, _ in trainable if n.endswith(".lora_A.weight")}


def _block_activations(arch: Arch, config: LoRAConfig, trainable: list[tuple[str, int]], e: int) -> int:
    """Per token and block: ``A x`` (``e*r``) per adapted linear, and with dropout a dropped copy of its input and
    the mask (``(e + 1)*d_in``)."""
    adapted = _adapted(trainable)
    return sum(e * config.r + ((e + 1) * lin.d_in if config.lora_dropout > 0 else 0)
               for lin in arch.linears if lin.name in adapted)


MEMORY = MemoryModel(adapted_linears=_adapted, block_activations=_block_activations)


@register_method("lora", LoRAConfig, count=count, peft_type="LORA",
                 merging=Merging(merge_and_unload, merge=merge, unmerge=unmerge), memory=MEMORY,
                 capabilities=Capabilities(batched_serving=True, gguf_adapter=True))
def apply(model: nn.Module, config: LoRAConfig) -> InjectReport:
    """Add LoRA to the target layers of `model` and freeze everything else."""
    return adapt(model, config, "lora", LoRALayer.from_module)


def adapt(model: nn.Module, config: LoRAConfig, method: str,
          make: Callable[[nn.Module, LoRAConfig], nn.Module]) -> InjectReport:
    """Replace the target layers of `model` by ``make(layer, config)`` (a `LoRALayer`), freeze everything else and
    mark the layers' `adapter_params` trainable (shared by LoRA and its variants, e.g. DoRA)."""
    targets = config.target_modules
    if targets == "all-linear":
        heads = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in _OUTPUT_HEADS}
        names = [n for n, m in model.named_modules() if _is_target_candidate(n, m) and n not in heads]
        if not names:
            raise PeftkitError(f"{type(model).__name__} has no linear layers besides the output head")
        targets = names  # full names match themselves as suffixes
    freeze_all(model)
    report = inject(model, method, targets, _is_target_candidate, lambda _, m: make(m, config))
    for _, layer in lora_layers(model):
        for pname in layer.adapter_params():
            layer.get_parameter(pname).requires_grad_(True)
    return report


register_preset(Preset("qlora", "lora", quant="nf4", double_quant=True,
                       doc="LoRA over an NF4 + double-quantized base (QLoRA, Dettmers et al. 2023)"))

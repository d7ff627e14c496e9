"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022,
https://arxiv.org/abs/2205.05638).

    y = l ⊙ (W0 x + b)          (attention-side layers: l scales the d_out outputs)
    y = W0 (l ⊙ x) + b          (feedforward layers: l scales the d_in inputs)

One trained vector l per adapted layer, initialised to ones (the adapted model starts equal to the base); W0 stays
frozen. Merging multiplies W0's rows (and the bias) or columns by l. The layer keeps its base weight under its
original key and adds ``ia3_l`` (shape (d_out, 1), or (1, d_in) for a feedforward layer), exactly the key and
shape of Hugging Face peft's ``IA3`` adapters, so files go both ways (``target_modules`` + ``feedforward_modules``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.core.config import Config
from peftkit.core.inject import AdapterModule, InjectReport, freeze_all, get_submodule_parent, inject
from peftkit.core.registry import Capabilities, MemoryModel, Merging, register_method
from peftkit.errors import PeftkitError
from peftkit.methods.lora import is_linear, linear_features
from peftkit.quant import QuantLinear

if TYPE_CHECKING:
    from peftkit.memory import Arch

__all__ = ["IA3Config", "IA3Layer", "merge", "merge_and_unload", "unmerge"]

# peft's per-architecture defaults as one regex each (Llama family: k, v, down; GPT-2: c_attn, mlp.c_proj;
# Falcon: query_key_value, mlp.dense_4h_to_h); the MLP output projection scales its input
DEFAULT_TARGETS = r".*\.(k_proj|v_proj|down_proj|c_attn|mlp\.c_proj|query_key_value|mlp\.dense_4h_to_h)"
DEFAULT_FEEDFORWARD = r".*\.(down_proj|mlp\.c_proj|mlp\.dense_4h_to_h)"


def matches(name: str, patterns: Sequence[str] | str) -> bool:
    """Whether module `name` is selected by `patterns`: one regex over full names, or a list of suffixes (as
    `peftkit.core.inject` and peft match ``target_modules``)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


@dataclasses.dataclass
class IA3Config(Config):
    """(IA)³ settings (peft's ``IA3Config`` names).

    Attributes:
        target_modules: module-name suffixes or one regex over full names (default: peft's choice for Llama-family,
            GPT-2 and Falcon models: the key and value projections and the MLP's output projection).
        feedforward_modules: which of the targets scale their input rather than their output (suffixes or a regex;
            default: the MLP output projection).
    """

    peft_unsupported: ClassVar[dict[str, Any]] = {"modules_to_save": None, "layers_to_transform": None,
                                                  "init_ia3_weights": True}

    target_modules: list[str] | str = DEFAULT_TARGETS
    feedforward_modules: list[str] | str = DEFAULT_FEEDFORWARD

    def validate(self) -> None:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise PeftkitError("target_modules is empty")
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise PeftkitError(f"feedforward_modules {extra} are not in target_modules (peft requires a subset)")

    def peft_fields(self, model: nn.Module) -> dict[str, Any]:
        return {"fan_in_fan_out": any(isinstance(m, Conv1D) for m in model.modules()), "init_ia3_weights": True,
                "modules_to_save": None}


class IA3Layer(AdapterModule):
    """Mixin adding a scaling vector to a linear-like layer; instances are made by `IA3Layer.from_module`."""

    ia3_l: nn.Parameter
    is_feedforward: bool
    merged: bool

    @staticmethod
    @functools.cache
    def _class_for(base_cls: type[nn.Module]) -> type[nn.Module]:
        return type(f"IA3{base_cls.__name__}", (IA3Layer, base_cls), {"_base_cls": base_cls})

    @classmethod
    def from_module(cls, base: nn.Module, feedforward: bool) -> nn.Module:
        """An (IA)³ version of `base` sharing its (frozen) tensors; `base` itself is left as it was."""
        d_in, d_out = linear_features(base)
        layer = object.__new__(cls._class_for(type(base)))
        layer.__dict__.update(base.__dict__)
        for attr in ("_parameters", "_buffers", "_modules"):
            layer.__dict__[attr] = dict(base.__dict__[attr])
        ref = next(iter(base.parameters()), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else getattr(base, "compute_dtype", None)
        device = ref.device if ref is not None else next(base.buffers()).device
        shape = (1, d_in) if feedforward else (d_out, 1)
        layer.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))
        layer.is_feedforward = feedforward
        layer.merged = False
        return layer

    def adapter_params(self) -> list[str]:
        return ["ia3_l"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._base_cls.forward(self, x)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self._base_cls.forward(self, (x.to(scale.dtype) * scale).to(x.dtype))
        out = self._base_cls.forward(self, x)
        return (out * scale).to(out.dtype)

    def _scaled(self, weight: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """`weight` (stored layout, fp32) times l (or divided by it): rows for output scaling, columns for input."""
        scale = self.ia3_l.detach().float()
        if inverse:
            if (scale == 0).any():
                raise PeftkitError("cannot unmerge (IA)³: a scaling entry is 0 (the merged weight lost that row)")
            scale = 1.0 / scale
        return weight * (scale.t() if isinstance(self, Conv1D) else scale)

    def _fold(self, inverse: bool) -> None:
        if not isinstance(self.weight, nn.Parameter) or not self.weight.is_floating_point():
            raise PeftkitError(f"cannot merge (IA)³ into a quantized {self._base_cls.__name__} in place; "
                               "use merge_and_unload(), which dequantizes first")
        with torch.no_grad():
            self.weight.copy_(self._scaled(self.weight.float(), inverse).to(self.weight.dtype))
            if self.bias is not None and not self.is_feedforward:
                scale = self.ia3_l.detach().float().flatten()
                self.bias.copy_((self.bias.float() * (1.0 / scale if inverse else scale)).to(self.bias.dtype))

    def merge(self) -> None:
        """Fold l into the base weight (and the bias of an output-scaled layer); idempotent."""
        if not self.merged:
            self._fold(inverse=False)
            self.merged = True

    def unmerge(self) -> None:
        """Divide l back out (idempotent)."""
        if self.merged:
            self._fold(inverse=True)
            self.merged = False

    def to_base(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain base-class layer with l folded in (quantized bases are dequantized)."""
        if isinstance(self, QuantLinear):
            dense = self._base_cls.to_linear(self, dtype or torch.float32)
            plain = IA3Layer.from_module(dense.requires_grad_(False), self.is_feedforward)
            with torch.no_grad():
                plain.ia3_l.copy_(self.ia3_l)
            return plain.to_base(dtype)
        self.merge()
        plain = object.__new__(self._base_cls)
        plain.__dict__.update(self.__dict__)
        plain.__dict__["_parameters"] = {k: v for k, v in self._parameters.items() if k != "ia3_l"}
        for attr in ("is_feedforward", "merged"):
            plain.__dict__.pop(attr, None)
        return plain if dtype is None else plain.to(dtype)


def ia3_layers(model: nn.Module) -> list[tuple[str, IA3Layer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Layer)]


def merge(model: nn.Module) -> None:
    for _, layer in ia3_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for _, layer in ia3_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every scaling vector into its base weight and return the model with plain layers."""
    for name, layer in ia3_layers(model):
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, layer.to_base(dtype))
    return model


def _adapted(arch: Arch, config: IA3Config) -> list[tuple[int, Any, bool]]:
    """(block, linear, feedforward) of every adapted block linear, matched on full names as `apply` matches."""
    return [(i, lin, matches(f"{arch.blocks_path}.{i}.{lin.name}", config.feedforward_modules))
            for i, lin in arch.block_linears(config.target_modules)]


def count(arch: Arch, config: IA3Config) -> list[tuple[str, int]]:
    """One vector per adapted linear: d_in entries for a feedforward layer, d_out for the others."""
    return [(f"layers.{i}.{lin.name}.ia3_l", lin.d_in if ff else lin.d_out) for i, lin, ff in _adapted(arch, config)]


def _block_activations(arch: Arch, config: IA3Config, trainable: list[tuple[str, int]], e: int) -> int:
    """Per token and block: the tensor each scaling keeps for l's gradient (the base output, d_out wide, or the
    feedforward layer's input, d_in wide)."""
    return sum(e * (lin.d_in if ff else lin.d_out) for i, lin, ff in _adapted(arch, config) if i == 0)


MEMORY = MemoryModel(block_activations=_block_activations)


@register_method("ia3", IA3Config, count=count, peft_type="IA3",
                 merging=Merging(merge_and_unload, merge=merge, unmerge=unmerge), memory=MEMORY,
                 capabilities=Capabilities(batched_serving=False, gguf_adapter=False))
def apply(model: nn.Module, config: IA3Config) -> InjectReport:
    """Add a scaling vector to the target layers of `model` and freeze everything else."""
    feedforward = {n for n, m in model.named_modules() if is_linear(m) and matches(n, config.feedforward_modules)}
    freeze_all(model)
    report = inject(model, "ia3", config.target_modules, lambda _, m: is_linear(m) and not isinstance(m, IA3Layer),
                    lambda name, m: IA3Layer.from_module(m, name in feedforward))
    for _, layer in ia3_layers(model):
        layer.ia3_l.requires_grad_(True)
    return report

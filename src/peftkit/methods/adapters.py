"""Bottleneck adapters: Houlsby et al. 2019 (https://arxiv.org/abs/1902.00751) and Pfeiffer et al. 2020
(AdapterFusion, https://arxiv.org/abs/2005.00247).

    adapter(h) = h + W_up f(W_down h + b_down) + b_up       W_down: m x d,  W_up: d x m,  m = d / reduction_factor

placed on the output of a sub-layer, before its residual add: ``x + adapter(sublayer(x))``. Houlsby puts one
after the attention output projection and one after the feed-forward block (two per layer); Pfeiffer only the one
after the feed-forward block. Weights start N(0, 1e-2) truncated at 2 sigma, biases zero, so the internal skip makes
each adapter start near the identity; with ``zero_init_up`` (the default) W_up starts at zero and the adapted model
equals the base model exactly.

The adapter wraps the output projection of the sub-layer (``self_attn.o_proj`` / ``mlp.down_proj`` in Llama,
``attn.c_proj`` / ``mlp.c_proj`` in GPT-2): its output is the sub-layer output, before dropout and the residual add.
The wrapped layer keeps the base weights under their original keys; the adapter adds ``adapter_down`` and
``adapter_up`` submodules.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from peftkit.core.config import Config
from peftkit.core.inject import AdapterModule, InjectReport, freeze_all, inject, match_modules
from peftkit.core.registry import MemoryModel, register_method
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.memory import Arch

__all__ = ["BottleneckAdapterLayer", "HoulsbyConfig", "PfeifferConfig", "adapter_layers"]

# Output projections of the attention and feed-forward sub-layers, by architecture (suffixes of module names).
ATTN_OUTPUTS = ("self_attn.o_proj", "attn.c_proj", "self_attention.dense", "attention.dense", "self_attn.out_proj")
FFN_OUTPUTS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "feed_forward.w2")

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
INIT_STD = 1e-2


@dataclasses.dataclass
class _BottleneckConfig(Config):
    """Settings shared by both placements.

    Attributes:
        reduction_factor: bottleneck size m = d // reduction_factor (at least 1).
        bottleneck_size: m directly; overrides `reduction_factor` when set.
        non_linearity: f, one of relu, gelu, silu, tanh.
        zero_init_up: start W_up at zero (exact identity at init) instead of the paper's N(0, 1e-2).
        attn_modules: suffixes of the attention output projections; None detects them by architecture.
        ffn_modules: suffixes of the feed-forward output projections; None detects them by architecture.
    """

    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    zero_init_up: bool = True
    attn_modules: list[str] | None = None
    ffn_modules: list[str] | None = None

    def validate(self) -> None:
        if self.reduction_factor <= 0:
            raise PeftkitError(f"reduction_factor must be a positive integer, got {self.reduction_factor}")
        if self.bottleneck_size is not None and self.bottleneck_size <= 0:
            raise PeftkitError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size}")

    def size(self, d: int) -> int:
        return self.bottleneck_size or max(1, d // self.reduction_factor)


@dataclasses.dataclass
class HoulsbyConfig(_BottleneckConfig):
    """Houlsby: an adapter after the attention output projection and one after the feed-forward block."""


@dataclasses.dataclass
class PfeifferConfig(_BottleneckConfig):
    """Pfeiffer: one adapter per layer, after the feed-forward block."""


def _out_features(module: nn.Module) -> int:
    if hasattr(module, "out_features"):
        return module.out_features
    if hasattr(module, "nf"):  # GPT-2 Conv1D
        return module.nf
    raise PeftkitError(f"cannot tell the output size of {type(module).__name__}")


class BottleneckAdapterLayer(AdapterModule):
    """Mixin adding a bottleneck adapter on the output of a layer; made by `BottleneckAdapterLayer.from_module`."""

    _base_cls: type[nn.Module]
    adapter_down: nn.Linear
    adapter_up: nn.Linear
    adapter_act: nn.Module

    @staticmethod
    @functools.cache
    def _class_for(base_cls: type[nn.Module]) -> type[nn.Module]:
        return type(f"Adapter{base_cls.__name__}", (BottleneckAdapterLayer, base_cls), {"_base_cls": base_cls})

    @classmethod
    def from_module(cls, base: nn.Module, config: _BottleneckConfig) -> Any:
        """A copy of `base` (same tensors, own module dicts) whose output passes through a new adapter."""
        d = _out_features(base)
        m = config.size(d)
        ref = next(base.parameters())
        layer = object.__new__(cls._class_for(type(base)))
        layer.__dict__.update(base.__dict__)
        for attr in ("_parameters", "_buffers", "_modules"):
            layer.__dict__[attr] = dict(base.__dict__[attr])
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        layer.adapter_down = nn.Linear(d, m, device=ref.device, dtype=dtype)
        layer.adapter_up = nn.Linear(m, d, device=ref.device, dtype=dtype)
        layer.adapter_act = _ACTIVATIONS[config.non_linearity]()
        for lin in (layer.adapter_down, layer.adapter_up):
            nn.init.trunc_normal_(lin.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            nn.init.zeros_(lin.bias)
        if config.zero_init_up:
            nn.init.zeros_(layer.adapter_up.weight)
        return layer

    def adapter_params(self) -> list[str]:
        return ["adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self._base_cls.forward(self, *args, **kwargs)
        w = self.adapter_down.weight
        update = self.adapter_up(self.adapter_act(self.adapter_down(h.to(w.dtype))))
        return h + update.to(h.dtype)  # the internal skip


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, BottleneckAdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, BottleneckAdapterLayer):
            yield name, module


def _find(model: nn.Module, given: list[str] | None, known: tuple[str, ...], what: str) -> list[str]:
    def candidate(_: str, m: nn.Module) -> bool:
        return not isinstance(m, BottleneckAdapterLayer) and any(True for _ in m.parameters(recurse=False))

    if given is not None:
        return match_modules(model, given, candidate)
    names = [n for n, m in model.named_modules() if candidate(n, m) and n.endswith(tuple("." + k for k in known))]
    if not names:
        raise _not_found(type(model).__name__, known, what)
    return names


def _not_found(model_name: str, known: tuple[str, ...], what: str) -> PeftkitError:
    return PeftkitError(f"cannot find the {what} output projections of {model_name}; "
                        f"name them with {what}_modules (e.g. {known[0]})")


def _count(arch: Arch, config: _BottleneckConfig, places: tuple[str, ...]) -> list[tuple[str, int]]:
    """One adapter (down d -> m, up m -> d, with biases) on the output of each placed projection of `arch`."""
    placed = []
    for what, given, known in (("attn", config.attn_modules, ATTN_OUTPUTS), ("ffn", config.ffn_modules, FFN_OUTPUTS)):
        if what not in places:
            continue
        if given is not None:
            placed += arch.block_linears(given)
            continue
        found = [(i, lin) for i in range(arch.layers) for lin in arch.linears if lin.name.endswith(known)]
        if not found:
            raise _not_found(arch.name, known, what)
        placed += found
    out = []
    for i, lin in sorted(placed, key=lambda item: item[0]):
        d, m, name = lin.d_out, config.size(lin.d_out), f"layers.{i}.{lin.name}"
        out += [(f"{name}.adapter_down.weight", d * m), (f"{name}.adapter_down.bias", m),
                (f"{name}.adapter_up.weight", m * d), (f"{name}.adapter_up.bias", d)]
    return out


def count_houlsby(arch: Arch, config: HoulsbyConfig) -> list[tuple[str, int]]:
    return _count(arch, config, ("attn", "ffn"))


def count_pfeiffer(arch: Arch, config: PfeifferConfig) -> list[tuple[str, int]]:
    return _count(arch, config, ("ffn",))


def _apply(model: nn.Module, config: _BottleneckConfig, method: str, places: tuple[str, ...]) -> InjectReport:
    targets: list[str] = []
    if "attn" in places:
        targets += _find(model, config.attn_modules, ATTN_OUTPUTS, "attn")
    if "ffn" in places:
        targets += _find(model, config.ffn_modules, FFN_OUTPUTS, "ffn")
    order = [n for n, _ in model.named_modules() if n in set(targets)]  # model order, full names match themselves
    freeze_all(model)
    report = inject(model, method, order, lambda _, m: not isinstance(m, BottleneckAdapterLayer),
                    lambda _, m: BottleneckAdapterLayer.from_module(m, config))
    for _, layer in adapter_layers(model):
        for pname in layer.adapter_params():
            layer.get_parameter(pname).requires_grad_(True)
    return report


def _block_activations(arch: Arch, config: _BottleneckConfig, trainable: list[tuple[str, int]], e: int) -> int:
    """Per token and block, per adapter: its input and the two bottleneck tensors (``e*(h + 2m)``), counted on the
    first block's adapters."""
    return sum(e * (arch.hidden + 2 * m) for n, m in trainable
               if n.startswith("layers.0.") and n.endswith(".adapter_down.bias"))


@register_method("houlsby", HoulsbyConfig, count=count_houlsby,
                 memory=MemoryModel(block_activations=_block_activations, grad_starts="attn_output"))
def apply_houlsby(model: nn.Module, config: HoulsbyConfig) -> InjectReport:
    """Add an adapter after every attention output projection and every feed-forward block; freeze the rest."""
    return _apply(model, config, "houlsby", ("attn", "ffn"))


@register_method("pfeiffer", PfeifferConfig, count=count_pfeiffer,
                 memory=MemoryModel(block_activations=_block_activations, grad_starts="block_output"))
def apply_pfeiffer(model: nn.Module, config: PfeifferConfig) -> InjectReport:
    """Add an adapter after every feed-forward block; freeze the rest."""
    return _apply(model, config, "pfeiffer", ("ffn",))

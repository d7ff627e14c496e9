"""Layers whose weight is the frozen base weight plus an update computed from trainable tensors.

    W' = W0 + delta(theta)

Shared by sparse updates (`peftkit.methods.selective`, delta = scatter of the trained entries) and intrinsic SAID
(`peftkit.methods.intrinsic_said`, delta = lambda_i * P_i(theta_d)). A `DeltaWeightLayer` is the base layer's own
class with the mixin in front, so the base tensors keep their keys; `merge` / `unmerge` / `merge_and_unload` fold
the update into the base weights and back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.core.inject import AdapterModule, get_submodule_parent
from peftkit.errors import PeftkitError

__all__ = ["LINEAR_EQUIVALENTS", "DeltaWeightLayer", "delta_layers", "is_plain_linear", "linear_targets", "merge",
           "merge_and_unload", "unmerge"]

_OUTPUT_HEADS = ("lm_head", "embed_out", "output")

# nn.Linear subclasses whose forward is F.linear written out, so running them as F.linear with another weight
# changes nothing else. Other subclasses (quantized layers above all) are refused, not guessed at.
LINEAR_EQUIVALENTS = frozenset({"FalconLinear"})

_CLASSES: dict[tuple[type, type], type[DeltaWeightLayer]] = {}  # see DeltaWeightLayer._class_for


def is_plain_linear(module: nn.Module) -> bool:
    """``nn.Linear``, GPT-2 ``Conv1D``, or a subclass of ``nn.Linear`` in `LINEAR_EQUIVALENTS`."""
    kind = type(module)
    return kind in (nn.Linear, Conv1D) or (isinstance(module, nn.Linear) and kind.__name__ in LINEAR_EQUIVALENTS)


def linear_targets(model: nn.Module, targets: list[str] | str) -> list[str] | str:
    """``"all-linear"`` -> the names of every linear layer except the output head; other targets unchanged."""
    if targets != "all-linear":
        return targets
    heads = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in _OUTPUT_HEADS}
    names = [n for n, m in model.named_modules() if is_plain_linear(m) and n not in heads]
    if not names:
        others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear)} - {"Linear"})
        found = f" (found {', '.join(others)}: subclasses this method does not adapt)" if others else ""
        raise PeftkitError(f"{type(model).__name__} has no nn.Linear / Conv1D layers besides the output head{found}")
    return names



class DeltaWeightLayer(AdapterModule):
    """Mixin for a linear-like layer that runs with an effective weight ``W0 + delta`` computed each forward.

    Instances are the base layer's own class with the mixin in front, sharing the base tensors under their original
    keys (as `LoRALayer` does), so base checkpoints load unchanged.
    """

    _base_cls: type[nn.Module]
    weight: nn.Parameter
    bias: nn.Parameter | None
    merged: bool
    # nn.Module members of the base class, which follows the mixin in the instance's class
    _parameters: dict[str, nn.Parameter | None]
    parameters: Callable[..., Iterator[nn.Parameter]]
    buffers: Callable[..., Iterator[torch.Tensor]]

    @staticmethod
    def _class_for(mixin: type, base_cls: type[nn.Module]) -> type[DeltaWeightLayer]:
        """One class per (mixin, base class) pair, made on first use."""
        key = (mixin, base_cls)
        if key not in _CLASSES:
            _CLASSES[key] = type(f"{mixin.__name__.removesuffix('Layer')}{base_cls.__name__}", (mixin, base_cls),
                                 {"_base_cls": base_cls})
        return _CLASSES[key]

    @classmethod
    def wrap(cls, base: nn.Module) -> Any:
        """A copy of `base` (same tensors, own module dicts) with this mixin; `base` is left as it was."""
        if not is_plain_linear(base):
            raise PeftkitError(f"{cls.__name__} adapts nn.Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        layer = object.__new__(cls._class_for(cls, type(base)))
        layer.__dict__.update(base.__dict__)
        for attr in ("_parameters", "_buffers", "_modules"):
            layer.__dict__[attr] = dict(base.__dict__[attr])
        layer.__dict__["_non_persistent_buffers_set"] = set(base.__dict__["_non_persistent_buffers_set"])
        layer.merged = False
        return layer

    def delta(self) -> torch.Tensor:  # pragma: no cover - interface
        """The update, shaped like ``self.weight``."""
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        return self.weight + self.delta().to(self.weight.dtype)

    def delta_inputs(self) -> list[torch.Tensor]:
        """The tensors the update is computed from (what invalidates `_inference_weight`)."""
        return [*self.parameters(), *self.buffers()]

    def _inference_weight(self) -> torch.Tensor:
        """`effective_weight`, computed once while no gradient is taken and reused until an input changes.

        Generation calls every layer once per token; recomputing the update each time (a Fastfood transform of the
        whole weight for SAID) makes decoding hundreds of times slower. The key is the in-place version counter of
        every input (an optimizer step, `load_adapter` or `merge` bumps it). Costs one weight-sized tensor per
        layer while cached; a forward with gradients drops it.
        """
        key = tuple((id(t), t._version) for t in self.delta_inputs())
        cached = self.__dict__.get("_inference_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_inference_cache"] = (key, self.effective_weight())
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._base_cls.forward(self, x)
        if torch.is_grad_enabled():
            self.__dict__.pop("_inference_cache", None)
            w = self.effective_weight()
        else:
            w = self._inference_weight()
        if isinstance(self, Conv1D):  # GPT-2 stores the weight d_in x d_out; addmm as Conv1D.forward does
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])
        return F.linear(x, w, self.bias)

    def merge(self) -> None:
        """Fold the update into the base weight (idempotent)."""
        if not self.merged:
            with torch.no_grad():
                self.weight.copy_(self.effective_weight())
            self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the base weight (idempotent)."""
        if self.merged:
            with torch.no_grad():
                self.weight.sub_(self.delta().to(self.weight.dtype))
            self.merged = False

    def to_base(self) -> nn.Module:
        """A plain base-class layer with the update folded in."""
        self.merge()
        plain = object.__new__(self._base_cls)
        plain.__dict__.update(self.__dict__)
        plain.__dict__["_parameters"] = {k: v for k, v in self._parameters.items() if k in ("weight", "bias")}
        plain.__dict__["_buffers"] = {}
        plain.__dict__["_non_persistent_buffers_set"] = set()
        plain.__dict__.pop("merged", None)
        plain.__dict__.pop("_inference_cache", None)
        return plain


def delta_layers(model: nn.Module) -> Iterator[tuple[str, DeltaWeightLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, DeltaWeightLayer):
            yield name, module


def merge(model: nn.Module) -> None:
    """Merge every weight delta (sparse or intrinsic SAID) of `model` into its base weight (idempotent)."""
    for _, layer in delta_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Unmerge every weight delta of `model` (idempotent)."""
    for _, layer in delta_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every weight delta (sparse or intrinsic SAID) into its base weight; return the model with plain layers
    (in `dtype` if given)."""
    for name, layer in list(delta_layers(model)):
        parent, child = get_submodule_parent(model, name)
        plain = layer.to_base()
        setattr(parent, child, plain if dtype is None else plain.to(dtype))
    return model

"""Merging an adapted model, whatever its method: `merge`, `unmerge` and `merge_and_unload` read the method's
`Merging` from the registry (``model.peftkit_method``, set by `apply_method` and `load_adapter`).

A method that cannot merge (bottleneck adapters, prompt and prefix tuning: they add modules or inputs the base
model does not have) is refused with one line naming it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.core.registry import Merging, get_method
from peftkit.errors import PeftkitError

__all__ = ["merge", "merge_and_unload", "method_merging", "unmerge"]


def method_merging(name: str) -> Merging:
    """The registered `Merging` of method `name`; a method that cannot merge is an error naming it."""
    merging = get_method(name).merging
    if merging is None:
        raise PeftkitError(f"method {name!r} cannot be merged into the base weights: it adds modules or inputs the "
                           "base model does not have; keep the adapter and load it with load_adapter")
    return merging


def _merging(model: nn.Module) -> tuple[str, Merging]:
    if not hasattr(model, "peftkit_method"):
        raise PeftkitError("this model has no peftkit adapter (adapt it with apply_method or load_adapter first)")
    method: Any = model.peftkit_method  # (name, config), set by apply_method
    name = method[0]
    return name, method_merging(name)


def merge(model: nn.Module) -> None:
    """Fold the update into the base weights in place, keeping the adapter (idempotent; `unmerge` undoes it).

    Methods that train the base weights themselves (full, top-k layers, BitFit, norms) are always merged.
    """
    _, merging = _merging(model)
    if merging.merge is not None:
        merging.merge(model)


def unmerge(model: nn.Module) -> None:
    """Take a merged update back out of the base weights (idempotent)."""
    name, merging = _merging(model)
    if merging.unmerge is None:
        raise PeftkitError(f"method {name!r} trains the base weights themselves: there is no separate update to "
                           "take out")
    merging.unmerge(model)


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold the update into the base weights and return the model with plain layers and only the base tensors.

    Args:
        model: a model adapted by `apply_method` or `load_adapter`; changed in place.
        dtype: dtype of the rebuilt layers (quantized LoRA bases are dequantized to it, default fp32); None keeps
            the layers' own.
    """
    _, merging = _merging(model)
    merged = merging.merge_and_unload(model, dtype)
    del merged.peftkit_method  # a plain model now: save_adapter has nothing to save
    return merged

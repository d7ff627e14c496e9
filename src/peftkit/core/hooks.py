"""Helpers of the methods that attach a module and forward hooks to a model instead of swapping layers.

Prompt and prefix tuning rewrite each call of the model in a forward pre-hook (`split_call`, `prepend_to_mask` for
the m virtual positions placed in front, `model_geometry` to size them); they and intrinsic SAID keep their trainable
module on the model under one attribute, which `HookReport.restore` removes with the hooks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from peftkit.core.inject import InjectReport
from peftkit.errors import PeftkitError

__all__ = ["HookReport", "model_geometry", "prepend_to_mask", "split_call"]


def model_geometry(model: nn.Module) -> dict[str, int]:
    """Layers, hidden size, attention heads, key/value heads and head size from a transformers config."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        raise PeftkitError(f"{type(model).__name__} has no transformers config (num_hidden_layers, hidden_size)")
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim}


@dataclasses.dataclass
class HookReport(InjectReport):
    """An `InjectReport` for methods that add a module and hooks to the model; `restore` takes both away."""

    attribute: str = ""
    handles: list[RemovableHandle] = dataclasses.field(default_factory=list, repr=False)

    def restore(self, model: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.attribute and self.attribute in model._modules:
            delattr(model, self.attribute)
        super().restore(model)


def split_call(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments as one dict, with the cache under ``cache`` (transformers' current name)."""
    kwargs = dict(kwargs)
    if len(args) > 1:
        raise PeftkitError("call a prompt-learning model with keyword arguments (input_ids=..., attention_mask=...)")
    if args:
        kwargs["input_ids"] = args[0]
    if "past_key_values" in kwargs:
        kwargs["cache"] = kwargs.pop("past_key_values")
    return kwargs


def prepend_to_mask(mask: torch.Tensor, m: int, as_queries: bool) -> torch.Tensor:
    """Extend an attention mask so that every token sees m virtual positions placed before it.

    Args:
        mask: a 2D padding mask (batch, keys), or a 4D mask (batch, heads, queries, keys), boolean or additive
            (0 = visible), as peftkit's packed batches use.
        as_queries: the virtual positions are also queries (prompt tuning: they are real inputs, attending
            causally among themselves); False when they exist only as keys/values (prefix tuning).
    """
    if mask.dim() == 2:
        return torch.cat([torch.ones(mask.shape[0], m, dtype=mask.dtype, device=mask.device), mask], dim=1)
    visible = mask if mask.dtype == torch.bool else mask == 0
    b, h, q, k = visible.shape
    out = torch.cat([torch.ones(b, h, q, m, dtype=torch.bool, device=mask.device), visible], dim=-1)
    if as_queries:
        rows = torch.zeros(b, h, m, m + k, dtype=torch.bool, device=mask.device)
        rows[..., :m] = torch.ones(m, m, dtype=torch.bool, device=mask.device).tril()
        out = torch.cat([rows, out], dim=-2)
    return out

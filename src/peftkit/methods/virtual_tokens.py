"""Shared by prompt and prefix tuning: extending attention masks for m virtual positions in front."""

from __future__ import annotations

import torch


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

"""Attention for packed training rows: each example attends causally to itself, one example at a time.

A packed row holds several examples; the block-diagonal mask keeps them apart, but a masked attention kernel still
computes every (query, key) pair of the row. Here the row is cut at the example boundaries and each example runs
its own causal attention, so the cost is sum(n_i^2) instead of L^2, and padding costs nothing. On CPU the
per-example attention is plain matmuls + softmax (`CausalAttention`), which runs faster than PyTorch's CPU flash
kernel at these lengths and, like it, keeps no n x n weights for backward; elsewhere (CUDA) it is
``scaled_dot_product_attention(is_causal=True)`` per example.

It is a transformers attention implementation (`NAME`), switched on by `use_packed_attention` for models that
use ``sdpa`` or ``eager``. It takes the fast path only when the forward call carries the example boundaries
(``peftkit_segments``, passed by `peftkit.train.sequence_loss`); every other call (generation, evaluation, prefix
or prompt tuning, sliding-window or soft-capped models) goes to transformers' own ``sdpa`` function with the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["NAME", "CausalAttention", "PackedCausalAttention", "packed_attention", "segment_bounds",
           "use_packed_attention"]

NAME = "peftkit_packed"

# (row width, per row: (start, end) of each example, per row: the shared prefix's length); padding belongs to
# no example; a row with a shared prefix has it as its first segment, (0, prefix), which every later one reads
Segments = tuple[int, tuple[tuple[tuple[int, int], ...], ...], tuple[int, ...]]


def segment_bounds(segment_ids: torch.Tensor, prefix_lengths: torch.Tensor | None = None) -> Segments:
    """Example boundaries of a batch from its segment ids (batch, width): -1 = padding, else the example index;
    `prefix_lengths` (batch,): each row's shared prefix (`collate(share_prefix=True)`), none if not given."""
    rows = []
    for ids in segment_ids.tolist():
        bounds, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[start]:
                if ids[start] >= 0:
                    bounds.append((start, i))
                start = i
        rows.append(tuple(bounds))
    prefixes = tuple(prefix_lengths.tolist()) if prefix_lengths is not None else (0,) * len(rows)
    return segment_ids.shape[1], tuple(rows), prefixes


class CausalAttention(torch.autograd.Function):
    """softmax(q k^T * scale + causal mask) v for one example, recomputing the weights in backward.

    q is (heads, n, d); k and v are (kv_heads, m, d) with heads a multiple of kv_heads (grouped-query attention:
    query head h reads key/value head h // (heads / kv_heads)) and m >= n: the last n keys are the queries' own,
    the first m - n a shared prefix that every query sees (query i sees keys up to m - n + i). Saves q, k, v and
    the output, not the n x m weights. The softmax runs in fp32 (or fp64 for fp64 inputs).
    """

    @staticmethod
    def _weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        kv_heads, m, d = k.shape
        n = q.shape[1]
        qg = q.view(kv_heads, -1, n, d)  # (kv_heads, group, n, d): no copy
        scores = torch.matmul(qg, k.unsqueeze(1).transpose(-1, -2))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).mul_(scale)
        future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu_(1 + m - n)
        return torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1)  # (kv_heads, group, n, m)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        p = CausalAttention._weights(q, k, scale).to(v.dtype)
        return torch.matmul(p, v.unsqueeze(1)).view(q.shape[0], q.shape[1], v.shape[-1])

    @staticmethod
    def gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kv_heads, d, n = k.shape[0], k.shape[2], q.shape[1]
        p = CausalAttention._weights(q, k, scale)
        g = grad.to(v.dtype).reshape(kv_heads, -1, n, v.shape[-1])
        dv = torch.matmul(p.to(v.dtype).transpose(-1, -2), g).sum(1)
        dp = torch.matmul(g, v.unsqueeze(1).transpose(-1, -2)).to(p.dtype)
        rowdot = (g.to(p.dtype) * out.reshape(g.shape).to(p.dtype)).sum(-1, keepdim=True)  # sum_j p_ij dp_ij
        ds = p.mul_(dp.sub_(rowdot)).mul_(scale).to(q.dtype)
        dq = torch.matmul(ds, k.unsqueeze(1)).view(q.shape)
        dk = torch.matmul(ds.transpose(-1, -2), q.view(kv_heads, -1, n, d)).sum(1)
        return dq, dk, dv

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out = CausalAttention.attend(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (*CausalAttention.gradients(*ctx.saved_tensors, grad, ctx.scale), None)


class PackedCausalAttention(torch.autograd.Function):
    """`CausalAttention` for every example of a packed batch in one autograd node.

    query (batch, heads, L, d), key and value (batch, kv_heads, L, d); the output (batch, L, heads, d), the
    layout transformers expects back, is zero on padding. One node instead of one per example: autograd would
    otherwise give every example's slice of q, k and v a backward that zero-fills and adds a tensor of the whole
    batch's size (quadratic in the examples per row).
    """

    @staticmethod
    def _pieces(segments: Segments):
        """(row, start, end, prefix) per example; prefix > 0 when it reads its row's shared prefix first."""
        for r, (bounds, prefix) in enumerate(zip(segments[1], segments[2], strict=True)):
            for start, end in bounds:
                yield r, start, end, prefix if prefix and start >= prefix else 0

    @staticmethod
    def _keys(t: torch.Tensor, r: int, start: int, end: int, prefix: int) -> torch.Tensor:
        own = t[r, :, start:end]
        return torch.cat([t[r, :, :prefix], own], dim=1) if prefix else own

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                scale: float) -> torch.Tensor:
        batch, heads, length, _ = query.shape
        out = query.new_zeros(batch, length, heads, value.shape[-1])
        for r, start, end, prefix in PackedCausalAttention._pieces(segments):
            k, v = (PackedCausalAttention._keys(t, r, start, end, prefix) for t in (key, value))
            out[r, start:end] = CausalAttention.attend(query[r, :, start:end], k, v, scale).transpose(0, 1)
        ctx.save_for_backward(query, key, value, out)
        ctx.segments, ctx.scale = segments, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        query, key, value, out = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for r, start, end, prefix in PackedCausalAttention._pieces(ctx.segments):
            k, v = (PackedCausalAttention._keys(t, r, start, end, prefix) for t in (key, value))
            q_grad, k_grad, v_grad = CausalAttention.gradients(query[r, :, start:end], k, v,
                                                               out[r, start:end].transpose(0, 1),
                                                               grad[r, start:end].transpose(0, 1), ctx.scale)
            dq[r, :, start:end] = q_grad
            for total, part in ((dk, k_grad), (dv, v_grad)):
                total[r, :, start:end] += part[:, prefix:]
                if prefix:
                    total[r, :, :prefix] += part[:, :prefix]
        return dq, dk, dv, None, None


def _one_example(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: float) -> torch.Tensor:
    """One example on other devices or with dropout: ``scaled_dot_product_attention`` (autograd per example)."""
    n, m = q.shape[1], k.shape[1]
    # SDPA's is_causal aligns the mask top-left; a shared prefix (m > n) needs it bottom-right
    mask = None if m == n else torch.ones(n, m, dtype=torch.bool, device=q.device).tril_(m - n)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, dropout_p=dropout, scale=scale,
                                          is_causal=mask is None, enable_gqa=q.shape[0] != k.shape[0])[0]


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     peftkit_segments: Segments | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function: query (batch, heads, L, d) -> output (batch, L, heads, d)."""
    batch, heads, length, d = query.shape
    fast = (
        peftkit_segments is not None
        and peftkit_segments[0] == length == key.shape[2]  # no virtual tokens, no cache, no prefix
        and getattr(module, "is_causal", True)
        and all(kwargs.get(k) is None for k in ("sliding_window", "softcap", "s_aux", "position_bias"))
    )
    if not fast:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else d**-0.5
    if query.device.type == "cpu" and dropout == 0.0:
        return PackedCausalAttention.apply(query, key, value, peftkit_segments, scale), None
    rows = []
    for r, (bounds, prefix) in enumerate(zip(peftkit_segments[1], peftkit_segments[2], strict=True)):
        parts, end = [], 0
        for start, end in bounds:
            qs, ks, vs = (t[r, :, start:end] for t in (query, key, value))
            if prefix and start >= prefix:  # an example after the shared prefix reads the prefix's keys first
                ks = torch.cat([key[r, :, :prefix], ks], dim=1)
                vs = torch.cat([value[r, :, :prefix], vs], dim=1)
            parts.append(_one_example(qs, ks, vs, scale, dropout))
        if end < length:  # padding: zeros (no example reads them)
            parts.append(query.new_zeros(heads, length - end, value.shape[-1]))
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def use_packed_attention(model: nn.Module) -> bool:
    """Switch `model` to `packed_attention` if it runs ``sdpa`` or ``eager`` attention; True if switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", NAME):
        return False
    # Models that do not call attention through transformers' AttentionInterface (Falcon, for one) keep theirs.
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    if can_switch is not None and not can_switch():
        return False
    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME


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
or prompt tuning, soft-capped models) goes to transformers' own ``sdpa`` function with the mask.

Sliding windows: transformers gives a windowed layer its own mask, but a packed batch brings one ready 4D mask that
transformers hands unchanged to every layer. So the window is applied here, per layer, as `attention_windows` reads
it from the model's config: a query sees the keys of its example (and of the row's shared prefix) at most
``window - 1`` positions back, positions as the example has alone. Patterns that packed rows cannot honour (chunked,
recurrent, bidirectional layers) are named by `packing_problem`, and the trainer then trains unpacked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from peftkit.errors import PeftkitError

__all__ = ["NAME", "CausalAttention", "PackedCausalAttention", "attention_windows", "packed_attention",
           "packing_problem", "segment_bounds", "use_packed_attention"]

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


def _segment_positions(segments: Segments, device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, width): each token's position in its example as it is alone (the shared prefix first, at 0..p-1;
    the same positions `collate` gives); 0 on padding."""
    width, rows, prefixes = segments
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (bounds, prefix) in enumerate(zip(rows, prefixes, strict=True)):
        for start, end in bounds:
            first = prefix if prefix and start >= prefix else 0
            positions[r, start:end] = torch.arange(first, first + end - start)
    return positions.to(device)


def attention_windows(config) -> tuple[int | None, ...]:
    """Per layer, the sliding window of its causal attention (None = full), decided as transformers 5 builds
    its masks: ``layer_types`` when the config has them ("full_attention", or "sliding_attention" with the
    config's ``sliding_window``; Qwen2's ``use_sliding_window`` / ``max_window_layers`` are folded into them), else
    ``sliding_window`` on every layer when set (Mistral, Mixtral, Phi-3, Starcoder2) and full attention otherwise.

    Raises:
        PeftkitError: naming the pattern packed rows cannot honour (chunked, recurrent or other layer types,
            bidirectional attention, a sliding layer without a window).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = type(config).__name__
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        raise PeftkitError(f"{name} uses bidirectional attention, which packed rows (causal per example) cannot "
                           "honour")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return (window,) * getattr(config, "num_hidden_layers", 1)
    other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if other:
        raise PeftkitError(f"{name} has {', '.join(other)} layers, which packed rows cannot honour")
    if "sliding_attention" in layer_types and not (isinstance(window, int) and window > 0):
        raise PeftkitError(f"{name} has sliding_attention layers but sliding_window={window!r}")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def packing_problem(model: nn.Module) -> str | None:
    """Why packed rows would not give `model` the result each example gets alone (None when they do): an attention
    pattern packed rows cannot honour, or sliding windows without `packed_attention` switched on (the packed mask
    reaches every layer as it is, with no window)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        windows = attention_windows(config)
    except PeftkitError as e:
        return str(e)
    impl = config._attn_implementation
    if any(w is not None for w in windows) and impl != NAME:
        needs = "use_packed_attention" if impl in ("sdpa", "eager") else f"sdpa or eager attention, not {impl}"
        return f"{type(model).__name__} has sliding windows, which packed rows honour only with packed attention " \
               f"({needs})"
    return None


def _layer_window(module: nn.Module, passed: int | None) -> int | None:
    """The sliding window of the layer `module` belongs to (None = full), from the config (`attention_windows`);
    `passed` is the ``sliding_window`` the model hands its attention function, which must agree."""
    config = getattr(module, "config", None)
    if config is None:
        return passed
    windows = attention_windows(config)
    if len(set(windows)) == 1:
        window = windows[0]
    elif getattr(module, "layer_idx", None) is None:
        raise PeftkitError(f"{type(module).__name__} has no layer_idx: packed rows cannot tell its sliding window")
    else:
        window = windows[module.layer_idx]
    if passed is not None and passed != window:
        raise PeftkitError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) passes "
                           f"sliding_window={passed} but its config gives {window}: packed rows cannot tell which "
                           "applies")
    return window


def _masked(n: int, m: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(n, m) True where query i (key m - n + i) may not look: a later key, or one `window` or more back."""
    hidden = torch.ones(n, m, dtype=torch.bool, device=device).triu_(1 + m - n)
    if window is not None and m > window:  # else every key is near enough
        hidden |= torch.ones(n, m, dtype=torch.bool, device=device).tril_(m - n - window)
    return hidden


class CausalAttention(torch.autograd.Function):
    """softmax(q k^T * scale + causal mask) v for one example, recomputing the weights in backward.

    q is (heads, n, d); k and v are (kv_heads, m, d) with heads a multiple of kv_heads (grouped-query attention:
    query head h reads key/value head h // (heads / kv_heads)) and m >= n: the last n keys are the queries' own,
    the first m - n a shared prefix that every query sees (query i sees keys up to m - n + i). With a sliding
    `window`, query i sees only the keys after m - n + i - window. Saves q, k, v and the output, not the n x m
    weights. The softmax runs in fp32 (or fp64 for fp64 inputs).
    """

    @staticmethod
    def _weights(q: torch.Tensor, k: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
        kv_heads, m, d = k.shape
        n = q.shape[1]
        qg = q.view(kv_heads, -1, n, d)  # (kv_heads, group, n, d): no copy
        scores = torch.matmul(qg, k.unsqueeze(1).transpose(-1, -2))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).mul_(scale)
        hidden = _masked(n, m, window, q.device)
        return torch.softmax(scores.masked_fill_(hidden, float("-inf")), dim=-1)  # (kv_heads, group, n, m)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               window: int | None = None) -> torch.Tensor:
        p = CausalAttention._weights(q, k, scale, window).to(v.dtype)
        return torch.matmul(p, v.unsqueeze(1)).view(q.shape[0], q.shape[1], v.shape[-1])

    @staticmethod
    def gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad: torch.Tensor,
                  scale: float, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kv_heads, d, n = k.shape[0], k.shape[2], q.shape[1]
        p = CausalAttention._weights(q, k, scale, window)
        g = grad.to(v.dtype).reshape(kv_heads, -1, n, v.shape[-1])
        dv = torch.matmul(p.to(v.dtype).transpose(-1, -2), g).sum(1)
        dp = torch.matmul(g, v.unsqueeze(1).transpose(-1, -2)).to(p.dtype)
        rowdot = (g.to(p.dtype) * out.reshape(g.shape).to(p.dtype)).sum(-1, keepdim=True)  # sum_j p_ij dp_ij
        ds = p.mul_(dp.sub_(rowdot)).mul_(scale).to(q.dtype)
        dq = torch.matmul(ds, k.unsqueeze(1)).view(q.shape)
        dk = torch.matmul(ds.transpose(-1, -2), q.view(kv_heads, -1, n, d)).sum(1)
        return dq, dk, dv

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                window: int | None = None) -> torch.Tensor:
        out = CausalAttention.attend(q, k, v, scale, window)
        ctx.save_for_backward(q, k, v, out)
        ctx.scale, ctx.window = scale, window
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (*CausalAttention.gradients(*ctx.saved_tensors, grad, ctx.scale, ctx.window), None, None)


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
                scale: float, window: int | None = None) -> torch.Tensor:
        batch, heads, length, _ = query.shape
        out = query.new_zeros(batch, length, heads, value.shape[-1])
        for r, start, end, prefix in PackedCausalAttention._pieces(segments):
            k, v = (PackedCausalAttention._keys(t, r, start, end, prefix) for t in (key, value))
            out[r, start:end] = CausalAttention.attend(query[r, :, start:end], k, v, scale, window).transpose(0, 1)
        ctx.save_for_backward(query, key, value, out)
        ctx.segments, ctx.scale, ctx.window = segments, scale, window
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        query, key, value, out = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for r, start, end, prefix in PackedCausalAttention._pieces(ctx.segments):
            k, v = (PackedCausalAttention._keys(t, r, start, end, prefix) for t in (key, value))
            q_grad, k_grad, v_grad = CausalAttention.gradients(query[r, :, start:end], k, v,
                                                               out[r, start:end].transpose(0, 1),
                                                               grad[r, start:end].transpose(0, 1), ctx.scale,
                                                               ctx.window)
            dq[r, :, start:end] = q_grad
            for total, part in ((dk, k_grad), (dv, v_grad)):
                total[r, :, start:end] += part[:, prefix:]
                if prefix:
                    total[r, :, :prefix] += part[:, :prefix]
        return dq, dk, dv, None, None, None


def _one_example(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: float,
                 window: int | None) -> torch.Tensor:
    """One example on other devices or with dropout: ``scaled_dot_product_attention`` (autograd per example)."""
    n, m = q.shape[1], k.shape[1]
    # SDPA's is_causal aligns the mask top-left; a shared prefix (m > n) needs it bottom-right
    mask = None if m == n and window is None else ~_masked(n, m, window, q.device)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, dropout_p=dropout, scale=scale,
                                          is_causal=mask is None, enable_gqa=q.shape[0] != k.shape[0])[0]


def _window_mask(mask: torch.Tensor, segments: Segments, window: int, queries: int) -> torch.Tensor:
    """`mask` (batch, 1, queries, keys; boolean or additive) with keys `window` or more positions back hidden.

    The row's own tokens are the last `width` keys; keys in front of them are virtual tokens (prompt or prefix
    tuning) at positions 0..m-1, which shift the row's positions by m, as they do when an example runs alone.
    """
    keys = mask.shape[-1]
    m = keys - segments[0]
    own = _segment_positions(segments, mask.device) + m
    key_pos = torch.cat([torch.arange(m, device=mask.device).expand(own.shape[0], m), own], dim=1)
    query_pos = key_pos[:, keys - queries:]
    near = (query_pos[:, None, :, None] - key_pos[:, None, None, :]) < window  # causality: in the mask already
    if mask.dtype == torch.bool:
        return mask & near
    return mask.masked_fill(~near, torch.finfo(mask.dtype).min)


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     peftkit_segments: Segments | None = None, sliding_window: int | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function: query (batch, heads, L, d) -> output (batch, L, heads, d)."""
    batch, heads, length, d = query.shape
    if peftkit_segments is None:  # not a packed training batch: transformers' masks, windows included
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    window = _layer_window(module, sliding_window)
    fast = (
        peftkit_segments[0] == length == key.shape[2]  # no virtual tokens, no cache, no prefix
        and getattr(module, "is_causal", True)
        and all(kwargs.get(k) is None for k in ("softcap", "s_aux", "position_bias"))
    )
    if not fast:
        if window is not None and attention_mask is not None:
            attention_mask = _window_mask(attention_mask, peftkit_segments, window, length)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    scale = scaling if scaling is not None else d**-0.5
    if query.device.type == "cpu" and dropout == 0.0:
        return PackedCausalAttention.apply(query, key, value, peftkit_segments, scale, window), None
    rows = []
    for r, (bounds, prefix) in enumerate(zip(peftkit_segments[1], peftkit_segments[2], strict=True)):
        parts, end = [], 0
        for start, end in bounds:
            qs, ks, vs = (t[r, :, start:end] for t in (query, key, value))
            if prefix and start >= prefix:  # an example after the shared prefix reads the prefix's keys first
                ks = torch.cat([key[r, :, :prefix], ks], dim=1)
                vs = torch.cat([value[r, :, :prefix], vs], dim=1)
            parts.append(_one_example(qs, ks, vs, scale, dropout, window))
        if end < length:  # padding: zeros (no example reads them)
            parts.append(query.new_zeros(heads, length - end, value.shape[-1]))
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def use_packed_attention(model: nn.Module) -> bool:
    """Switch `model` to `packed_attention` if it runs ``sdpa`` or ``eager`` attention with a pattern packed rows
    can honour (`attention_windows`); True if switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", NAME):
        return False
    try:
        attention_windows(config)
    except PeftkitError:  # such a model trains unpacked (`packing_problem`), where sdpa is exact
        return False
    # Models that do not call attention through transformers' AttentionInterface (Falcon, for one) keep theirs.
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    if can_switch is not None and not can_switch():
        return False
    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME


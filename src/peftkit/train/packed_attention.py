"""Attention for packed training rows: each example attends causally to itself (and its row's shared prefix).

A packed row holds several examples; the block-diagonal mask keeps them apart, but a masked attention kernel still
computes every (query, key) pair of the row. Here the row is cut at the example boundaries and each example runs
its own causal attention, so the cost is sum(n_i^2) instead of L^2, and padding costs nothing. On CPU the examples
of a batch are gathered into a few groups of similar length, each padded to one size and attended with plain
batched matmuls + softmax (`PackedCausalAttention`): one call per product and group rather than per example (a
row of short examples made hundreds of small calls per layer). That runs faster than PyTorch's CPU flash kernel at
these lengths and, like it, keeps no n x n weights for backward. In fp32 without a window a compiled kernel
(`peftkit.train.attention_native`) replaces the groups: it visits each example's own causal pairs only. Elsewhere
(CUDA) it is ``scaled_dot_product_attention(is_causal=True)`` per example.

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

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from peftkit.errors import PeftkitError
from peftkit.train import attention_native

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


def _bias(hidden: torch.Tensor) -> torch.Tensor:
    """An additive mask from a boolean one: -inf where hidden, else 0 (fp32: exact in every dtype it meets)."""
    return torch.zeros(hidden.shape, device=hidden.device).masked_fill_(hidden, float("-inf"))


def _weights(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) in fp32 (fp64 for fp64 inputs) for a stack of attention problems.

    q is (batch, rows, d) and k (batch, m, d): batch = examples x kv_heads, rows = the query heads sharing one
    key/value head x queries. `bias` (examples, 1, 1, queries, m) is broadcast over heads.
    """
    scores = torch.bmm(q, k.transpose(1, 2))
    shape = (bias.shape[0], k.shape[0] // bias.shape[0], -1, *bias.shape[-2:])
    # one op: scaled in the wider dtype, masked (a -inf bias), as `scores.float() * scale` + mask would be
    return torch.softmax(torch.add(bias, scores.view(shape), alpha=scale), dim=-1).view(scores.shape)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """The attention output (batch, rows, d) of `_weights`'s stacked problems, in v's dtype."""
    return torch.bmm(_weights(q, k, bias, scale).to(v.dtype), v)


def _gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad: torch.Tensor,
               bias: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of `_attend` given the output gradient, the weights recomputed (never stored)."""
    p = _weights(q, k, bias, scale)
    grad = grad.to(v.dtype)
    dv = torch.bmm(p.to(v.dtype).transpose(1, 2), grad)
    dp = torch.bmm(grad, v.transpose(1, 2)).to(p.dtype)
    rowdot = (grad.to(p.dtype) * out.to(p.dtype)).sum(-1, keepdim=True)  # sum_j p_ij dp_ij
    ds = p.mul_(dp.sub_(rowdot)).mul_(scale).to(q.dtype)
    return torch.bmm(ds, k), torch.bmm(ds.transpose(1, 2), q), dv


class CausalAttention(torch.autograd.Function):
    """softmax(q k^T * scale + causal mask) v for one example, recomputing the weights in backward.

    q is (heads, n, d); k and v are (kv_heads, m, d) with heads a multiple of kv_heads (grouped-query attention:
    query head h reads key/value head h // (heads / kv_heads)) and m >= n: the last n keys are the queries' own,
    the first m - n a shared prefix that every query sees (query i sees keys up to m - n + i). With a sliding
    `window`, query i sees only the keys after m - n + i - window. Saves q, k, v and the output, not the n x m
    weights. The softmax runs in fp32 (or fp64 for fp64 inputs). The same arithmetic as `PackedCausalAttention`
    (`_attend`, `_gradients`), for a single example.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                window: int | None = None) -> torch.Tensor:
        heads, n, _ = q.shape
        bias = _bias(_masked(n, k.shape[1], window, q.device))[None, None, None]
        out = _attend(q.reshape(k.shape[0], -1, q.shape[-1]), k, v, bias, scale).view(heads, n, v.shape[-1])
        ctx.save_for_backward(q, k, v, out, bias)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, bias = ctx.saved_tensors
        rows = (k.shape[0], -1, v.shape[-1])
        dq, dk, dv = _gradients(q.reshape(k.shape[0], -1, q.shape[-1]), k, v, out.reshape(rows), grad.reshape(rows),
                                bias, ctx.scale)
        return dq.view(q.shape), dk, dv, None, None


@dataclasses.dataclass(frozen=True)
class _Group:
    """Examples of a packed batch padded to one size, attended with one batched matmul per product.

    Slots run over (example, kv head, query head of that kv head, query): `queries` is the row of the flattened
    (batch x length x heads, d) queries each slot reads (0 on padding slots, whose gradient is zeroed), `keys` the
    row of the flattened (batch x length x kv_heads, d) keys and values (0 on padding slots: masked, so their
    gradients are exact zeros). `bias` (examples, 1, 1, queries, keys) is the additive mask: causal within the
    example and its shared prefix, the window, -inf on padding keys; a padding query reads key 0 (a finite softmax).
    """

    bias: torch.Tensor
    queries: torch.Tensor
    padding: torch.Tensor  # the slots of `queries` that hold no query
    keys: torch.Tensor


# Examples join a group while its padded (query, key) pairs stay within this factor of their own pairs; a group
# holds at most this many scores (fp32: 64 MiB) unless one example alone needs more.
SLACK = 1.5
MAX_SCORES = 2**24


def _grouped(pieces: list[tuple[int, int, int, int]], heads: int) -> list[list[tuple[int, int, int, int]]]:
    """`pieces` (row, start, end, prefix) in groups of similar size, longest keys first."""
    groups: list[list[tuple[int, int, int, int]]] = []
    real = rows = 0
    for piece in sorted(pieces, key=lambda p: (p[2] - p[1] + p[3], p[2] - p[1]), reverse=True):
        n, m = piece[2] - piece[1], piece[2] - piece[1] + piece[3]
        if groups:
            first = groups[-1][0]
            padded = (len(groups[-1]) + 1) * max(rows, n) * (first[2] - first[1] + first[3])
            if padded <= SLACK * (real + n * m) and padded * heads <= MAX_SCORES:
                groups[-1].append(piece)
                real, rows = real + n * m, max(rows, n)
                continue
        groups.append([piece])
        real, rows = n * m, n
    return groups


@functools.lru_cache(maxsize=4)
def _plan(segments: Segments, heads: int, kv_heads: int, window: int | None,
          device: torch.device) -> tuple[_Group, ...]:
    """The groups of a packed batch for one layer's attention.

    Cached: every layer with the same window asks again, in forward and backward. Only the last few are kept (a
    batch under at most two windows, and the one before): the masks of one long example are large, and a later batch
    never has the same boundaries.
    """
    width = segments[0]
    group_size = heads // kv_heads
    plan = []
    for pieces in _grouped(list(PackedCausalAttention._pieces(segments)), heads):
        row, start, end, prefix = (torch.tensor(c)[:, None] for c in zip(*pieces, strict=True))
        n, p = end - start, prefix
        i, j = torch.arange(int(n.max())), torch.arange(int((n + p).max()))
        real = i < n  # (examples, queries)
        pos = p + i  # each query's position as the example has alone; key j has position j
        visible = (j <= pos[..., None]) & real[..., None]
        if window is not None:
            visible &= pos[..., None] - j < window
        visible |= ~real[..., None] & (j == 0)
        token = (row * width + start + i) * heads  # the first query head's row of each query
        head = torch.arange(heads).view(1, kv_heads, group_size, 1)
        queries = torch.where(real[:, None, None], token[:, None, None] + head, 0).flatten()
        key_token = row * width + torch.where(j < p, j, start + j - p)
        keys = torch.where(j < n + p, key_token, 0)[:, None] * kv_heads + torch.arange(kv_heads)[:, None]
        plan.append(_Group(bias=_bias(~visible)[:, None, None].to(device), queries=queries.to(device),
                           padding=(~real[:, None, None].expand(-1, kv_heads, group_size, -1)).flatten()
                           .nonzero().flatten().to(device), keys=keys.flatten().to(device)))
    return tuple(plan)


@functools.lru_cache(maxsize=4)
def _pieces(segments: Segments) -> torch.Tensor:
    """The examples of a packed batch as the kernel reads them (`attention_native.pieces_tensor`); cached as
    `_plan` is: every layer asks again, in forward and backward."""
    return attention_native.pieces_tensor(list(PackedCausalAttention._pieces(segments)))


class PackedCausalAttention(torch.autograd.Function):
    """Causal attention for every example of a packed batch in one autograd node, a few batched matmuls in all.

    query (batch, heads, L, d), key and value (batch, kv_heads, L, d); the output (batch, L, heads, d), the
    layout transformers expects back, is zero on padding. The examples are gathered into groups of similar length
    (`_plan`), each padded to one size and masked, so that a layer runs one matmul per product and group instead of
    one per example (a packed row holds many short examples: per-example calls cost more than their arithmetic). One
    node instead of one per example: autograd would otherwise give every example's slice of q, k and v a backward
    that zero-fills and adds a tensor of the whole batch's size (quadratic in the examples per row). Saves q, k, v
    and the output, never the weights (recomputed per group in backward).
    """

    @staticmethod
    def _pieces(segments: Segments):
        """(row, start, end, prefix) per example; prefix > 0 when it reads its row's shared prefix first."""
        for r, (bounds, prefix) in enumerate(zip(segments[1], segments[2], strict=True)):
            for start, end in bounds:
                yield r, start, end, prefix if prefix and start >= prefix else 0

    @staticmethod
    def _gather(group: _Group, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int):
        """The group's queries (examples x kv_heads, rows, d), keys and values (examples x kv_heads, keys, d)."""
        stack, keys = group.bias.shape[0] * kv_heads, group.bias.shape[-1]
        return (q.index_select(0, group.queries).view(stack, -1, q.shape[-1]),
                *(t.index_select(0, group.keys).view(stack, keys, t.shape[-1]) for t in (k, v)))

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                scale: float, window: int | None = None) -> torch.Tensor:
        batch, heads, length, d = query.shape
        kv_heads = key.shape[1]
        rows = [t.transpose(1, 2).reshape(-1, t.shape[-1]) for t in (query, key, value)]  # (batch x L x heads, d)
        ctx.segments, ctx.scale, ctx.window = segments, scale, window
        ctx.native = attention_native.usable(window, query, key, value)
        if ctx.native:  # fp32 on CPU: each example's own pairs by the compiled kernel
            rows = [t.contiguous() for t in rows]
            out, lse = attention_native.forward(*rows, _pieces(segments), length, heads, kv_heads, scale)
            out = out.view(batch, length, heads, d)
            ctx.save_for_backward(query, key, value, out, lse)
            return out
        out = value.new_zeros(batch * length * heads, value.shape[-1])
        for group in _plan(segments, heads, kv_heads, window, query.device):
            o = _attend(*PackedCausalAttention._gather(group, *rows, kv_heads), group.bias, scale)
            out.index_add_(0, group.queries, o.view(-1, out.shape[1]).index_fill_(0, group.padding, 0))
        out = out.view(batch, length, heads, value.shape[-1])
        ctx.save_for_backward(query, key, value, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        query, key, value, out, *lse = ctx.saved_tensors
        batch, heads, length, d = query.shape
        kv_heads = key.shape[1]
        rows = [t.transpose(1, 2).reshape(-1, t.shape[-1]) for t in (query, key, value)]
        if ctx.native:
            rows = [t.contiguous() for t in rows]
            dq, dk, dv = attention_native.backward(*rows, out.view(-1, d), grad.reshape(-1, d).contiguous(), lse[0],
                                                   _pieces(ctx.segments), length, heads, kv_heads, ctx.scale)
            return (*(t.view(batch, length, -1, d).transpose(1, 2) for t in (dq, dk, dv)), None, None, None)
        out, grad = out.view(-1, out.shape[-1]), grad.reshape(-1, out.shape[-1])
        dq, dk, dv = (torch.zeros_like(t) for t in rows)
        for group in _plan(ctx.segments, heads, kv_heads, ctx.window, query.device):
            q, k, v = PackedCausalAttention._gather(group, *rows, kv_heads)
            o = out.index_select(0, group.queries).view(q.shape[0], -1, out.shape[-1])
            g = grad.index_select(0, group.queries).index_fill_(0, group.padding, 0).view(o.shape)
            q_grad, k_grad, v_grad = _gradients(q, k, v, o, g, group.bias, ctx.scale)
            # padding slots add exact zeros (zero output gradient, masked keys); a shared prefix's keys add up
            # (under autocast q and k may be fp32 after RoPE while v is bf16: each gradient takes its input's dtype)
            dq.index_add_(0, group.queries, q_grad.view(-1, d).to(dq.dtype))
            dk.index_add_(0, group.keys, k_grad.view(-1, d).to(dk.dtype))
            dv.index_add_(0, group.keys, v_grad.view(-1, v.shape[-1]).to(dv.dtype))
        return (*(t.view(batch, length, -1, t.shape[-1]).transpose(1, 2) for t in (dq, dk, dv)), None, None, None)


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


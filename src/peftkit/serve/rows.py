"""Batch-invariant decoding: each row of a decode step computes what it computes alone, bit for bit.

A row's answer must not depend on the rows it shares a step with, their padding or when they arrived. Three kinds
of operation change with the shape of the batch on CPU (measured on AVX512-BF16 EPYC, torch 2.13):

* **matmuls, blocked by M (rows)**: in fp32, MKL computes M=1 as a matrix-vector product, M=2..3 with one kernel and
  rows in blocks of 4 with another (the rows of a partial block differ again); in bf16, oneDNN's M=1 differs from
  M>=2 for K=1536 (SmolLM2's down_proj). `padded_rows` pads a decode step to a multiple of `ROW_BLOCK` rows (idle
  rows, thrown away), so every row always goes through the same full-block kernel.
* **attention over padded lengths**: with left padding a row's keys move to other SIMD lanes and blocks, and
  PyTorch's CPU attention kernel blocks by batch x heads too (fp32 B=8 differs from B=1 even unpadded). `RowCache`
  keeps each row's keys and values in its own buffer (no padding at all) and `rows_attention` attends each row
  alone, with exactly the call it gets alone (in fp32: see `_RowKV`).
* **LoRA products of a mixed batch**: `LoRABatch` computes every decode row's adapter term per row (``bmm`` over
  the rows, M=1 each) whether the batch is mixed or not (`LoRABatch.select(..., per_row=True)`).

Reductions over a row's own features (RMSNorm, softmax over the vocabulary, sampling) and elementwise work do not
depend on the other rows. Prefill runs one request at a time (`DecodeBatch.prefill`), so a prompt's cache and
first token depend on that prompt alone.

`rows_attention` is a transformers attention implementation (`NAME`) that `per_row_attention` switches on for one
forward pass and off again; the cache it reads is the step's `RowCache.step` (a list of each row's keys per layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["NAME", "ROW_BLOCK", "RowCache", "padded_rows", "per_row_attention", "rows_attention"]

NAME = "peftkit_rows"
ROW_BLOCK = 4  # MKL's fp32 row block (see the module docstring); a multiple of it is also >= 2 for oneDNN's bf16
_GROW = 256  # a row's buffers grow by this many positions at a time


def padded_rows(n: int) -> int:
    """The rows a decode step of `n` requests runs: `n` rounded up to a multiple of `ROW_BLOCK`."""
    return -(-n // ROW_BLOCK) * ROW_BLOCK


class _RowKV:
    """One row's keys and values, per layer, in fp32 buffers of its own: (1, kv_heads, capacity, head_dim).

    Note:
        fp32 whatever the model computes in: PyTorch's CPU attention for one query takes ~140 us a call in bf16 and
        ~25 us in fp32 (2-core EPYC, 120 keys), and a decode step makes one call per row and layer. The keys and
        values are upcast exactly; a row's attention is then computed in fp32, alone or in a batch alike.
    """

    def __init__(self, cache: DynamicCache) -> None:
        self.keys = [self._buffer(layer.keys) for layer in cache.layers]
        self.values = [self._buffer(layer.values) for layer in cache.layers]
        self.length = cache.layers[0].keys.shape[2]

    @staticmethod
    def _buffer(x: torch.Tensor, extra: int = _GROW) -> torch.Tensor:
        buf = x.new_empty(x.shape[0], x.shape[1], x.shape[2] + extra, x.shape[3], dtype=torch.float32)
        buf[:, :, : x.shape[2]] = x
        return buf

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one position (key, value: kv_heads x head_dim) of `layer`; return the keys and values so far."""
        n = self.length
        if n == self.keys[layer].shape[2]:
            self.keys[layer] = self._buffer(self.keys[layer])
            self.values[layer] = self._buffer(self.values[layer])
        self.keys[layer][0, :, n] = key
        self.values[layer][0, :, n] = value
        return self.keys[layer][:, :, : n + 1], self.values[layer][:, :, : n + 1]


class RowCache:
    """The KV cache of a decode step's rows: each row's own buffers, no padding, no shared tensor."""

    def __init__(self) -> None:
        self.rows: list[_RowKV] = []

    def add(self, cache: DynamicCache) -> None:
        """A prefilled row (its cache from a forward pass of batch 1) joins at the end."""
        self.rows.append(_RowKV(cache))

    def keep(self, index: list[int]) -> None:
        """Keep the rows at `index` (in that order)."""
        self.rows = [self.rows[i] for i in index]

    def step(self) -> _Step:
        return _Step(self.rows)


class _Step:
    """What the model's attention layers see as their cache during one decode step (`update` writes each real
    row's new key and value; the idle rows of `padded_rows` are not stored)."""

    is_compileable = False

    def __init__(self, rows: list[_RowKV]) -> None:
        self.rows = rows

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_) -> tuple[list, list]:
        keys, values = [], []
        for r, row in enumerate(self.rows):
            k, v = row.append(layer_idx, key[r, :, 0], value[r, :, 0])
            keys.append(k)
            values.append(v)
        return keys, values

    def done(self) -> None:
        for row in self.rows:
            row.length += 1


def rows_attention(module: nn.Module, query: torch.Tensor, key: list[torch.Tensor], value: list[torch.Tensor],
                   attention_mask: torch.Tensor | None, scaling: float | None = None, **_) -> tuple[torch.Tensor, None]:
    """Attention of one decode step, each row alone over its own keys (fp32, `_RowKV`): the same call for a row
    whatever the batch; idle rows get zeros. Returns (batch, 1, heads, head_dim) in the query's dtype.

    Note:
        One thread: a row's attention is a few microseconds of work, and each call of PyTorch's CPU attention
        kernel opens a parallel region, whose hand-off between threads costs more than the work (milliseconds on a
        busy 2-core machine, where the other thread may not be running). Each row is computed by one thread anyway
        (the kernel splits by batch x heads), so the result is the same with any thread count.
    """
    gqa = query.shape[1] != key[0].shape[1] if key else False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the Note
    try:
        outs = [F.scaled_dot_product_attention(query[r: r + 1].float(), k, v, scale=scaling, enable_gqa=gqa)
                for r, (k, v) in enumerate(zip(key, value, strict=True))]
    finally:
        torch.set_num_threads(threads)
    out = torch.cat(outs).to(query.dtype).transpose(1, 2)
    idle = query.shape[0] - len(outs)
    if idle:
        out = torch.cat([out, out.new_zeros(idle, *out.shape[1:])])
    return out, None


AttentionInterface.register(NAME, rows_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # not used: decode passes a ready 4D mask, which skips masking


@contextlib.contextmanager
def per_row_attention(model: nn.Module) -> Iterator[None]:
    """Switch `model`'s attention to `rows_attention` for the forward passes inside, and back afterwards."""
    before = model.config._attn_implementation
    model.config._attn_implementation = NAME
    try:
        yield
    finally:
        model.config._attn_implementation = before

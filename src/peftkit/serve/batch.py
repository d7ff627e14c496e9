"""The rows decoding together: their requests, their KV cache, and the two forward passes that extend it.

Decoding is batch-invariant (`peftkit.serve.rows`): a request's tokens depend on its prompt, adapter and sampling
settings only, never on the rows it shares a step with, their lengths or when they arrived.

* `prefill`: one request's prompt alone (batch of one, no padding; in chunks of `max_tokens` when it is longer), with
  its adapter and the positions 0, 1, ...; its keys and values then join the batch's `RowCache` as a row of their own.
* `decode`: one new token for every row. For Llama-shaped models with the compiled kernels built here
  (`peftkit.serve.fast`): one compiled call runs every layer and the head for all rows (per-row products, LoRA terms
  and attention), each row's keys in a cache preallocated for its prompt and new tokens. Otherwise one forward pass
  of the model: the rows padded to a multiple of `ROW_BLOCK` (the matmuls then treat every row alike), each row with
  its own adapter (`LoRABatch`, per row) and its own attention over its own keys (`rows_attention`).
"""

from __future__ import annotations

import collections

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from peftkit.errors import PeftkitError
from peftkit.serve.fast import FastCache, FastDecode
from peftkit.serve.lora_batch import LoRABatch
from peftkit.serve.request import Generation
from peftkit.serve.rows import RowCache, padded_rows, per_row_attention

__all__ = ["DecodeBatch"]


class DecodeBatch:
    """The requests decoding together (`rows`) and their KV cache (one `RowCache` row each).

    Args:
        model: the base model; it must use a full-attention KV cache in every layer.
        lora: the adapters attached to it; each row's `slot` picks its adapter.
        pad: the token id fed to the idle rows that pad a decode step (their results are thrown away).
        stats: counters of the engine (prefills, steps, tokens, seconds).
        fast: decode with `FastDecode` where the model allows it (False: always the model's forward pass).
    """

    def __init__(self, model: nn.Module, lora: LoRABatch, pad: int, stats: collections.Counter,
                 fast: bool = True) -> None:
        self.model = model
        self.lora = lora
        self.pad = pad
        self.stats = stats
        self.device = next(model.parameters()).device
        self.rows: list[Generation] = []
        check_cache(model)
        self.fast = FastDecode.build(model, lora) if fast else None
        self._cache: RowCache | FastCache = self._new_cache()

    def _new_cache(self) -> RowCache | FastCache:
        return RowCache() if self.fast is None else FastCache()

    def prefill(self, gen: Generation, max_tokens: int) -> torch.Tensor:
        """Run the prompt of `gen` alone (in chunks of at most `max_tokens` tokens), add its row to the batch, and
        return its next-token logits (1 x vocabulary).

        The chunks depend on the prompt and `max_tokens` only, so the prompt's keys and first token are the same
        whatever else the server is doing.
        """
        ids = torch.tensor([gen.prompt_ids], device=self.device)
        self.lora.select([gen.slot])
        cache = DynamicCache(config=self.model.config)
        for start in range(0, ids.shape[1], max_tokens):
            chunk = ids[:, start: start + max_tokens]
            positions = torch.arange(start, start + chunk.shape[1], device=self.device)[None]
            out = self.model(input_ids=chunk, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
            self.stats["prefills"] += 1
        self.stats["prompt_tokens"] += ids.shape[1]
        if isinstance(self._cache, FastCache):
            self._cache.add(cache, len(gen.prompt_ids) + gen.params.max_tokens)
        else:
            self._cache.add(cache)
        self.rows.append(gen)
        gen.pos = len(gen.prompt_ids)
        return out.logits[:, -1]

    def decode(self) -> torch.Tensor:
        """Feed every row its last token (`Generation.last`) and return the next-token logits (rows x vocabulary)."""
        rows = self.rows
        if self.fast is not None and isinstance(self._cache, FastCache):
            logits = self.fast.step([g.last for g in rows], [g.pos for g in rows], [g.slot for g in rows], self._cache)
        else:
            logits = self._forward(rows)
        self.stats["steps"] += 1
        self.stats["mixed_steps"] += len({g.slot for g in rows}) > 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        for gen in rows:
            gen.pos += 1
        return logits

    def _forward(self, rows: list[Generation]) -> torch.Tensor:
        """A decode step through the model's forward pass (`peftkit.serve.rows`)."""
        idle = padded_rows(len(rows)) - len(rows)
        ids = torch.tensor([[g.last] for g in rows] + [[self.pad]] * idle, device=self.device)
        positions = torch.tensor([[g.pos] for g in rows] + [[0]] * idle, device=self.device)
        mask = torch.ones((len(ids), 1, 1, 1), dtype=torch.bool, device=self.device)  # ready 4D: no mask is built
        self.lora.select([g.slot for g in rows] + [0] * idle, per_row=True)
        assert isinstance(self._cache, RowCache)
        step = self._cache.step()
        with per_row_attention(self.model):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=step, use_cache=True)
        step.done()
        return out.logits[: len(rows), -1]

    def clear(self) -> None:
        self.rows, self._cache = [], self._new_cache()

    def keep(self, rows: list[Generation]) -> None:
        """Keep only `rows` (a subsequence of the batch) and their caches."""
        if len(rows) == len(self.rows):
            return
        index = {id(g): i for i, g in enumerate(self.rows)}
        self._cache.keep([index[id(g)] for g in rows])
        self.rows = rows


def check_cache(model: nn.Module) -> None:
    """Refuse models whose cache is not one full-attention layer per layer (sliding windows, hybrid layers)."""
    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if odd:
        raise PeftkitError(f"peftkit serve needs a full-attention KV cache in every layer; "
                           f"{type(model).__name__} uses {', '.join(sorted(odd))}")

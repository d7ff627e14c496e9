"""The rows decoding together: their requests, one KV cache, and the two forward passes that extend it.

The batch's KV cache is one `DynamicCache` whose rows are left-padded to the longest: joining a row pads the
shorter side with zeros on the left, and the attention mask masks them; each row keeps its own positions, so it
sees what it would see alone. Dropping rows also drops the columns no remaining row uses.

* `prefill`: the prompts of requests admitted together, left-padded into one forward pass (each row with its own
  adapter and the positions it has alone); their cache rows then join the batch's.
* `decode`: one new token for every row (one forward pass, each row with its own adapter, `LoRABatch`).
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from peftkit.errors import PeftkitError
from peftkit.serve.lora_batch import LoRABatch
from peftkit.serve.request import Generation

__all__ = ["DecodeBatch", "prefill_groups"]


class DecodeBatch:
    """The requests decoding together (`rows`), their KV cache and attention mask.

    Args:
        model: the base model; its cache must be left-paddable (full attention in every layer).
        lora: the adapters attached to it; each row's `slot` picks its adapter.
        pad: the token id put in padded positions (any token: they are masked).
        stats: counters of the engine (prefills, steps, tokens, seconds).
    """

    def __init__(self, model: nn.Module, lora: LoRABatch, pad: int, stats: collections.Counter) -> None:
        self.model = model
        self.lora = lora
        self.pad = pad
        self.stats = stats
        self.device = next(model.parameters()).device
        self.rows: list[Generation] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        check_cache(model)

    def prefill(self, gens: list[Generation]) -> torch.Tensor:
        """Run the prompts of `gens` in one forward pass, join their rows to the batch, and return each one's
        next-token logits.

        The prompts are left-padded to the longest, so that every row's last token is the last column; the mask
        hides the padding and each row gets the positions it has alone (0, 1, ... from its first token).
        """
        width = max(len(g.prompt_ids) for g in gens)
        ids = torch.full((len(gens), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(gens), width), dtype=torch.long)
        for i, gen in enumerate(gens):
            ids[i, width - len(gen.prompt_ids):] = torch.tensor(gen.prompt_ids)
            mask[i, width - len(gen.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.lora.select([g.slot for g in gens])
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        self.stats["prefills"] += 1
        self.stats["max_prefill_rows"] = max(self.stats["max_prefill_rows"], len(gens))
        self.stats["prompt_tokens"] += int(mask.sum())
        self._join(gens, out.cache, mask)
        for gen in gens:
            gen.pos = len(gen.prompt_ids)
        return out.logits[:, -1]

    def decode(self) -> torch.Tensor:
        """Feed every row its last token (`Generation.last`) and return the next-token logits."""
        rows = self.rows
        ids = torch.tensor([[g.last] for g in rows], device=self.device)
        positions = torch.tensor([[g.pos] for g in rows], device=self.device)
        mask = F.pad(self._mask, (0, 1), value=1)
        self.lora.select([g.slot for g in rows])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._cache,
                         use_cache=True)
        self._mask = mask
        self.stats["steps"] += 1
        self.stats["mixed_steps"] += len({g.slot for g in rows}) > 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        for gen in rows:
            gen.pos += 1
        return out.logits[:, -1]

    def clear(self) -> None:
        self.rows, self._cache, self._mask = [], None, None

    def _join(self, gens: list[Generation], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add the prefilled rows of `gens` (their cache and mask) to the batch, left-padding the batch or the new
        rows to the longer one."""
        if not self.rows:
            self._cache, self._mask, self.rows = cache, mask, list(gens)
            return
        width, length = self._mask.shape[1], mask.shape[1]
        pad_batch, pad_new = max(length - width, 0), max(width - length, 0)
        for mine, new in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, pad_batch, 0)), F.pad(new.keys, (0, 0, pad_new, 0))])
            mine.values = torch.cat([F.pad(mine.values, (0, 0, pad_batch, 0)),
                                     F.pad(new.values, (0, 0, pad_new, 0))])
        self._mask = torch.cat([F.pad(self._mask, (pad_batch, 0)), F.pad(mask, (pad_new, 0))])
        self.rows.extend(gens)

    def keep(self, rows: list[Generation]) -> None:
        """Keep only `rows` (a subsequence of the batch) and the cache columns they use."""
        if len(rows) == len(self.rows):
            return
        if not rows:
            self.clear()
            return
        index = {id(g): i for i, g in enumerate(self.rows)}
        keep = torch.tensor([index[id(g)] for g in rows], device=self.device)
        mask = self._mask.index_select(0, keep)
        first = int(mask.any(0).long().argmax())  # leading columns that are padding in every kept row
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, keep)[:, :, first:]
            layer.values = layer.values.index_select(0, keep)[:, :, first:]
        self.rows = rows


def check_cache(model: nn.Module) -> None:
    """Refuse models whose cache cannot be left-padded and joined (sliding windows, hybrid layers)."""
    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if odd:
        raise PeftkitError(f"peftkit serve needs a full-attention KV cache in every layer; "
                           f"{type(model).__name__} uses {', '.join(sorted(odd))}")


def prefill_groups(gens: list[Generation], budget: int) -> list[list[Generation]]:
    """`gens` in groups of rows x longest prompt <= `budget` tokens (a longer prompt alone), shortest prompts first:
    prompts of similar lengths go together, with little padding."""
    groups: list[list[Generation]] = []
    for gen in sorted(gens, key=lambda g: len(g.prompt_ids)):
        if groups and (len(groups[-1]) + 1) * len(gen.prompt_ids) <= budget:
            groups[-1].append(gen)
        else:
            groups.append([gen])
    return groups

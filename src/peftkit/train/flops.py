"""Model FLOPs of a training step, for the achieved FLOP/s and MFU the trainer reports.

Counted as in PaLM's MFU (Chowdhery et al. 2022, appendix B), for matmuls only and without recomputation
(gradient checkpointing does not raise it), adapted to parameter-efficient training:

* forward: 2 FLOPs per weight entry per token for every matrix in the decoder blocks (a 4-bit weight counts as
  the d_out x d_in matrix it stands for), and ``4 * d_attn`` per attended (query, key) pair per layer (QK^T and
  attention x V; causal, within each packed example and its shared prefix; on a sliding-window layer only the
  keys within its window, `peftkit.train.packed_attention.attention_windows`);
* backward, input gradients: as much again, from the lowest block that holds a trainable parameter upwards
  (below it autograd stops: nothing there needs a gradient). Autograd also skips the input gradients of that
  block's projections that read only its input (q, k, v when the first trainable weights are inside them); they
  are counted, an overestimate of 1 / (2 x layers) of the backward at most (under 2% on a 30-layer model);
* backward, weight gradients: 2 per *trainable* weight entry per token (frozen weights get none; this is what makes
  LoRA's backward cheap);
* the output head runs only on the positions that predict a target (`sequence_loss`): ``2 * V * d`` forward and
  as much for its input gradient per target token, and once more if it is trainable.

Embedding lookups, norms and element-wise work are not FLOPs here, as in PaLM's count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.quant import QuantLinear
from peftkit.train.packed_attention import attention_windows

__all__ = ["FlopCount", "attention_pairs"]


def _matrix_entries(module: nn.Module, trainable: bool | None = None) -> int:
    """Matrix entries (2D weights, 4-bit weights as their full size) in `module`; `trainable` filters them."""
    total = 0
    for p in module.parameters():
        if p.ndim == 2 and p.is_floating_point() and (trainable is None or p.requires_grad == trainable):
            total += p.numel()
    if trainable is not True:
        total += sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, QuantLinear))
    return total


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no list of decoder blocks found")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _windows(config, layers: int) -> tuple[int | None, ...]:
    """Each block's sliding window (None = full); full everywhere for patterns packed rows cannot honour (those
    train unpacked: a chunked layer counted as full is an overestimate) and where the config's layer count is not
    the blocks' (one window then holds for all, if the config has one)."""
    try:
        windows = attention_windows(config)
    except PeftkitError:
        return (None,) * layers
    if len(windows) != layers:
        return (windows[0] if len(set(windows)) == 1 else None,) * layers
    return windows


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Per-token and per-pair FLOPs of one model as adapted; `step` turns a batch's counts into FLOPs.

    `per_pair` holds, per sliding window (None = full attention), the FLOPs of one attended pair in all the
    layers with that window.
    """

    per_token: float
    per_target: float
    per_pair: tuple[tuple[int | None, float], ...]

    @classmethod
    def of(cls, model: nn.Module) -> FlopCount:
        core = getattr(model, "module", model)
        blocks = _blocks(core)
        in_blocks = {id(p) for p in blocks.parameters()}
        head = core.get_output_embeddings()  # type: ignore[operator]  # a transformers model
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        # A trainable parameter outside the blocks and the head needs gradients through every block (embeddings,
        # virtual tokens, a prefix), unless it sits after the blocks (the final norm: registered after the block
        # list, in forward order, by transformers' models).
        parent = next(m for m in core.modules() if any(c is blocks for c in m.children()))
        siblings = list(parent.children())
        above = {id(p) for c in siblings[siblings.index(blocks) + 1:] for p in c.parameters()}
        outside = in_blocks | head_ids | above
        below = any(p.requires_grad and id(p) not in outside for p in core.parameters())
        first = 0 if below else next(
            (i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())), len(blocks))
        forward = sum(_matrix_entries(b) for b in blocks)
        backward_input = sum(_matrix_entries(b) for b in list(blocks)[first:])
        weight_grads = sum(_matrix_entries(b, trainable=True) for b in blocks)
        cfg = core.config
        heads = getattr(cfg, "num_attention_heads", 0)
        head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // max(heads, 1)
        per_pair: dict[int | None, float] = {}
        for i, window in enumerate(_windows(cfg, len(blocks))):  # forward, and twice that with a backward
            per_pair[window] = per_pair.get(window, 0.0) + 4 * heads * head_dim * (1 + 2 * (i >= first))
        head_entries = head.weight.numel() if head is not None else 0
        head_trainable = head is not None and head.weight.requires_grad
        per_target = 2 * head_entries * (2 + head_trainable) if first < len(blocks) or head_trainable else 0
        return cls(per_token=2.0 * (forward + backward_input + weight_grads), per_target=float(per_target),
                   per_pair=tuple(per_pair.items()))

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(window for window, _ in self.per_pair)

    def pairs(self, segment_ids: torch.Tensor, prefix_lengths: torch.Tensor | None = None) -> dict[int | None, int]:
        """A batch's attended pairs per layer under each of the model's windows (`attention_pairs`)."""
        return {window: attention_pairs(segment_ids, prefix_lengths, window) for window in self.windows}

    def step(self, tokens: int, targets: int, pairs: int | Mapping[int | None, int]) -> float:
        """FLOPs of a batch of `tokens` positions and `targets` predicted tokens; `pairs`: its attended pairs per
        layer under each window (`pairs`), or one number for every layer."""
        if not isinstance(pairs, Mapping):
            pairs = dict.fromkeys(self.windows, pairs)
        return (self.per_token * tokens + self.per_target * targets
                + sum(cost * pairs[window] for window, cost in self.per_pair))


def attention_pairs(segment_ids: torch.Tensor, prefix_lengths: torch.Tensor | None = None,
                    window: int | None = None) -> int:
    """Causal (query, key) pairs within each example of a batch (``segment_ids``: -1 = padding), and between
    each example and its row's shared prefix (``prefix_lengths``, see `peftkit.data.sequences.collate`); with a
    sliding `window`, a query pairs only with the keys less than `window` positions back (itself included),
    positions as the example has alone (the prefix first)."""
    batch = segment_ids.shape[0]
    real = segment_ids >= 0
    slots = int(segment_ids.max()) + 1 if real.any() else 1
    rows = torch.arange(batch).unsqueeze(1).expand_as(segment_ids)
    lengths = torch.bincount(rows[real] * slots + segment_ids[real], minlength=batch * slots).view(batch, slots)
    # segment 0 of a row with a shared prefix is the prefix; every later one reads it first
    read = torch.zeros(batch, 1, dtype=torch.long) if prefix_lengths is None else prefix_lengths.view(-1, 1).long()
    read = torch.where(torch.arange(slots) > 0, read, 0)

    def upto(k: torch.Tensor) -> torch.Tensor:  # pairs of the first k queries of a sequence: sum min(t + 1, window)
        full = k * (k + 1) // 2
        if window is None:
            return full
        return torch.where(k <= window, full, window * (window + 1) // 2 + (k - window) * window)

    return int((upto(read + lengths) - upto(read)).sum())

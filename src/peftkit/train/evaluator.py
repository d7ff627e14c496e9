"""The one evaluation-loss loop: mean cross-entropy per target token of a model over rows of examples.

Used by training (held-out loss during and after a run), by the forgetting probe (`peftkit.eval.forgetting`) and
by `peftkit merge` (the loss before and after merging).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from peftkit.data.sequences import Example, collate
from peftkit.train.loss import sequence_loss

__all__ = ["evaluation_loss"]


@torch.no_grad()
def evaluation_loss(model: nn.Module, rows: Sequence[Sequence[Example]], pad_id: int, batch_size: int = 8,
                    autocast: Callable[[], Any] = contextlib.nullcontext, share_prefix: bool = False) -> float:
    """Mean target-token loss of `model` over `rows` (each a list of examples: one, or several packed), in
    batches of `batch_size` rows, under `autocast()`. The model runs in eval mode (no dropout) and is put back
    in the mode it was in. Rows without a target give 0.0."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size], pad_id, share_prefix=share_prefix)
            with autocast():
                loss, n = sequence_loss(model, batch)
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return total / max(count, 1)

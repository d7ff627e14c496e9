"""Elastic weight consolidation against forgetting: the diagonal Fisher and the anchor's penalty."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from peftkit.data.sequences import Example, collate
from peftkit.train.loss import sequence_loss

__all__ = ["EWCAnchor", "diagonal_fisher"]


def diagonal_fisher(model: nn.Module, params: dict[str, nn.Parameter], rows: Sequence[Sequence[Example]],
                    pad_id: int, autocast: Any = contextlib.nullcontext,
                    share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of `params`: the mean over rows of the squared gradient of the row's mean
    target-token loss, ``F_i = 1/N sum_n (d loss_n / d theta_i)^2``.

    Note:
        One backward per row (a packed row holds several examples and counts as one sample): squaring per-row
        gradients keeps the curvature that squaring a batch-mean gradient would average away. This is the
        *empirical* Fisher (the data's labels, not labels sampled from the model), as EWC implementations use.
    """
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the curvature of the model as it is
    for row in rows:
        batch = collate([row], pad_id, share_prefix=share_prefix)
        with autocast():
            loss_sum, n = sequence_loss(model, batch)
        grads = torch.autograd.grad(loss_sum / max(n, 1), list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                fisher[name] += g.float().pow(2)
    model.train(was_training)
    return {n: f / max(len(rows), 1) for n, f in fisher.items()}


@dataclasses.dataclass
class EWCAnchor:
    """Elastic weight consolidation (Kirkpatrick et al. 2017, https://arxiv.org/abs/1612.00796).

    ``penalty = lambda / 2 * sum_i Fn_i * (theta_i - theta*_i)^2`` with ``Fn = F / mean(F)``, theta* the trainable
    parameters at the start and F their diagonal Fisher (:func:`diagonal_fisher`).

    Note:
        Normalisation: F is divided by its mean over all trainable entries, so that lambda does not depend on
        the scale of the gradients (which changes with the data and the loss normalisation); an entry of average
        sensitivity moved by delta costs ``lambda / 2 * delta^2``. The penalty is a sum over entries (not a mean),
        and it is added once per optimizer step to the task loss, which is the mean CE per target token.
        With Adam, a large lambda at a high learning rate makes the pull stiff: Adam's per-entry normalisation turns
        the penalty's gradient into steps of about lr that overshoot the anchor and oscillate around it, which can
        do more harm than no penalty. Lower lambda or lr if the logged ``ewc_penalty`` does not stay small.
    """

    lam: float
    fisher: dict[str, torch.Tensor]
    start: dict[str, torch.Tensor]

    @classmethod
    def from_fisher(cls, lam: float, fisher: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> EWCAnchor:
        mean = sum(float(f.sum()) for f in fisher.values()) / max(sum(f.numel() for f in fisher.values()), 1)
        scale = 1.0 / mean if mean > 0 else 0.0
        return cls(lam, {n: f * scale for n, f in fisher.items()},
                   {n: p.detach().float().clone() for n, p in params.items()})

    def penalty(self, params: dict[str, nn.Parameter]) -> torch.Tensor:
        total = sum(((p.float() - self.start[n]).pow(2) * self.fisher[n]).sum() for n, p in params.items())
        return cast(torch.Tensor, 0.5 * self.lam * total)  # a tensor: `params` is never empty

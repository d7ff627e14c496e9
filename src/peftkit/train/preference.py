"""Preference tuning: DPO (Rafailov et al., 2023) and ORPO (Hong et al., 2024) losses over pairs of answers.

For a pair (prompt x, chosen y_w, rejected y_l), with per-sequence log-probabilities ``log p(y | x)`` summed over
the answer's tokens (TRL's convention) under the policy (the adapted model) and the reference (the same model with
its adapter off, `peftkit.core.disable`), and ``d = (log p_w - log ref_w) - (log p_l - log ref_l)``:

    sigmoid   -(1 - eps) log sigma(beta d) - eps log sigma(-beta d)     (eps = label_smoothing: conservative DPO)
    robust    (-(1 - eps) log sigma(beta d) + eps log sigma(-beta d)) / (1 - 2 eps)     (Chowdhury et al., 2024)
    hinge     max(0, 1 - beta d)                                        (SLiC)
    ipo       (d' - 1 / (2 beta))^2, d' with each log-ratio divided by its answer's length      (Azar et al., 2023)

rewards/chosen = beta (log p_w - log ref_w), rewards/rejected likewise, margins their difference, accuracies the
share of pairs whose chosen reward is the larger (TRL's names and definitions). Names and formulas follow TRL 1.16's
``DPOTrainer`` (``sigmoid`` with label smoothing is TRL 0.x's cDPO; TRL 1.x ignores it there).

ORPO needs no reference: with mean log-probabilities ``a = log p / |y|`` and ``log odds(y) = a - log(1 - e^a)``,

    loss = NLL(chosen answer tokens) - beta log sigma(log odds(y_w) - log odds(y_l))

(``beta`` is the paper's lambda, as TRL's ``ORPOConfig`` names it); rewards = beta a.

Note:
    The log-probabilities come from the target hidden states only (`peftkit.train.loss.target_hidden_states`).
    With a plain frozen output head (every adapter method), `HeadLogProbs` runs the head and the log-softmax a chunk
    of rows at a time and, while the chunk's softmax is at hand, also the gradient of each picked log-probability
    with respect to its hidden state: nothing vocabulary-wide is kept for backward and the softmax is computed once
    (on the bundled model, 4 pairs of the orders task: 50 MiB of fp32 logits no longer held from forward to
    backward, at the same speed). Other heads go
    through `TargetLogProbs`, which never holds more than a chunk of vocabulary-wide rows in fp32.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.matmul import frozen_product, onednn_linear_enabled
from peftkit.data.sequences import IGNORE
from peftkit.train.loss import head_logits, target_hidden_states

__all__ = ["DPO_LOSS_TYPES", "OBJECTIVES", "HeadLogProbs", "TargetLogProbs", "dpo_loss", "orpo_loss",
           "sequence_logps"]

OBJECTIVES = ("sft", "dpo", "orpo")
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


class TargetLogProbs(torch.autograd.Function):
    """``log_softmax(logits)[i, targets[i]]`` per row, in row chunks: forward keeps only the picked values,
    backward recomputes each chunk's softmax and writes ``grad_i (onehot - softmax)`` (fp32 logits become their
    gradient in place; they are the caller's own tensor)."""

    CHUNK = 16

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(logits.device.type, enabled=False):
            picked = torch.cat([torch.log_softmax(c, -1, dtype=wide).gather(1, t[:, None])[:, 0]
                                for c, t in zip(logits.split(TargetLogProbs.CHUNK), targets.split(TargetLogProbs.CHUNK),
                                                strict=True)]) if len(targets) else logits.new_zeros(0, dtype=wide)
        ctx.save_for_backward(logits, targets)
        return picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets = ctx.saved_tensors
        wide = torch.promote_types(logits.dtype, torch.float32)
        out = logits if logits.dtype == wide else torch.empty_like(logits)
        rows = torch.arange(TargetLogProbs.CHUNK, device=logits.device)
        n = TargetLogProbs.CHUNK
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, len(targets), n):
                c, t, g = logits[start:start + n], targets[start:start + n], grad[start:start + n, None]
                p = torch.softmax(c, -1, dtype=wide)
                p[rows[:len(t)], t] -= 1.0
                torch.mul(p, -g.to(wide), out=out[start:start + n])
        return out, None


class HeadLogProbs(torch.autograd.Function):
    """``log_softmax(hidden W^T)[i, targets[i]]`` per row for a frozen, bias-free head weight W, in row chunks.

    Note:
        ``d picked_i / d hidden_i = (onehot(t_i) - softmax_i) W``: forward computes it from the chunk's softmax
        and saves that (rows x hidden size) instead of the logits (rows x vocabulary); backward only scales it by
        each row's incoming gradient. Under autocast the product runs in the autocast dtype, as the head would;
        the log-softmax in fp32 (or wider).
    """

    CHUNK = 128  # rows: a 128 x vocabulary fp32 chunk (25 MiB at 49,152 words) keeps the head product efficient

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, onednn: bool) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        wide = torch.promote_types(dtype, torch.float32)
        grad = ctx.needs_input_grad[0]
        picked, slopes = [], []
        with torch.autocast(device, enabled=False):
            for c, t in zip(h.split(HeadLogProbs.CHUNK), targets.split(HeadLogProbs.CHUNK), strict=True):
                logp = torch.log_softmax(frozen_product(c, w, None, onednn), -1, dtype=wide)
                picked.append(logp.gather(1, t[:, None])[:, 0])
                if grad:  # (softmax - onehot) W, negated below
                    p = logp.exp_()
                    p[torch.arange(len(t), device=p.device), t] -= 1.0
                    slopes.append(p.to(dtype) @ w)
        ctx.in_dtype = hidden.dtype
        ctx.save_for_backward(torch.cat(slopes).neg_() if grad and slopes else None)
        return torch.cat(picked) if picked else hidden.new_zeros(0, dtype=wide)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slopes,) = ctx.saved_tensors
        if slopes is None:
            return None, None, None, None
        return (slopes * grad[:, None].to(slopes.dtype)).to(ctx.in_dtype), None, None, None


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head where `HeadLogProbs` computes what the model would: a bias-free ``nn.Linear`` with a
    frozen weight, its own forward, and no logit scaling in the config (`peftkit.train.loss.head_logits`)."""
    head = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad or "forward" in head.__dict__:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, k, None) for k in ("logit_scale", "logits_scaling", "final_logit_softcapping")):
        return None
    return head


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the summed log-probabilities of the chosen and rejected answers (pairs x 2, fp32) and their token
    counts, from one forward of `batch` (`peftkit.data.preference.collate_pairs`)."""
    core = getattr(model, "module", model)
    inputs = {k: v for k, v in batch.items() if k != "sequence_ids"}
    hidden, targets = target_hidden_states(model, inputs)
    if (head := _plain_head(core)) is not None:
        onednn = onednn_linear_enabled(hidden, head.weight.dtype) and not torch.is_autocast_enabled(hidden.device.type)
        picked = HeadLogProbs.apply(hidden, head.weight, targets, onednn)
    else:
        logits = head_logits(core, hidden)
        low = logits.dtype in (torch.bfloat16, torch.float16)
        picked = TargetLogProbs.apply(logits if low else logits.float(), targets)
    device = picked.device
    labels = batch["labels"][:, 1:].to(device)
    rows, cols = labels.ne(IGNORE).nonzero(as_tuple=True)
    owner = batch["sequence_ids"].to(device)[rows, cols + 1]
    n = 2 * _pairs(batch)
    sums = torch.zeros(n, dtype=picked.dtype, device=device).index_add(0, owner, picked)
    counts = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, owner, torch.ones_like(owner))
    return sums.view(-1, 2), counts.view(-1, 2)


def _pairs(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["sequence_ids"].max()) // 2 + 1


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and rewards (pairs x 2: chosen, rejected) from summed log-probabilities (pairs x 2)."""
    ratios = policy - reference
    rewards = beta * ratios.detach()
    delta = ratios[:, 0] - ratios[:, 1]
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        mean = ratios / counts.clamp(min=1)
        losses = (mean[:, 0] - mean[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    return losses, rewards


def orpo_loss(policy: torch.Tensor, counts: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ORPO odds-ratio terms ``-beta log sigma(log odds ratio)`` and rewards (beta x mean log-probability);
    the NLL of the chosen answers is added by the caller, normalised by their tokens."""
    mean = policy / counts.clamp(min=1)
    log_odds = mean - _log1mexp(mean)
    ratio = F.logsigmoid(log_odds[:, 0] - log_odds[:, 1])
    return -beta * ratio, beta * mean.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0 without cancellation (branch at -ln 2, Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

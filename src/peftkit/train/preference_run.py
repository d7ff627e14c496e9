"""Preference tuning inside the one training loop: the pairs of a run (`PreferenceData`, dealt as `TrainData` deals
SFT rows, so resume positions work the same) and one optimizer step's losses and metrics (`PreferenceObjective`).

A micro-batch of pairs is one packed row per pair (the prompt once, both answers attending to it,
`peftkit.data.preference.collate_pairs`). The policy runs with gradients; for DPO the reference runs on the same batch
under ``no_grad`` with the adapter off (`peftkit.core.disable.adapter_disabled`). Losses are averaged over the pairs
of the whole step (all micro-batches and processes), ORPO's NLL over the chosen answers' tokens of the step.
Metrics use TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected`` (and ORPO's ``nll_loss``).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.core.disable import adapter_disabled, check_disable
from peftkit.core.inject import InjectReport
from peftkit.data.formats import ReadStats
from peftkit.data.preference import collate_pairs, read_pairs, tokenize_pairs
from peftkit.data.sequences import Example, TokenizeStats
from peftkit.errors import PeftkitError
from peftkit.train.config import TrainConfig
from peftkit.train.packed_attention import packing_problem
from peftkit.train.pipeline import Batch, TrainData
from peftkit.train.preference import dpo_loss, orpo_loss, sequence_logps

__all__ = ["PreferenceData", "PreferenceObjective"]

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


class PreferenceData(TrainData):
    """The pairs of a run as rows ``[chosen, rejected]``; the rest as `TrainData` (shuffling, micro-batches, resume
    positions, processes). `eval_pairs` are the held-out pairs (``eval_data`` or ``eval_fraction``)."""

    def __init__(self, cfg: TrainConfig, tokenizer: Any, model: nn.Module, world: int = 1, rank: int = 0,
                 log: bool = True) -> None:
        if not cfg.data:
            raise PeftkitError("no training data: set data to a file, folder or Hub dataset of preference pairs")
        self.cfg, self.tokenizer, self.world, self.rank = cfg, tokenizer, world, rank
        self.read_stats = ReadStats()
        pairs = read_pairs(cfg.data, cfg.skip_bad_rows, self.read_stats, cfg.limit_examples or None)
        order = list(range(len(pairs)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = 0 if cfg.eval_data else int(len(pairs) * cfg.eval_fraction)
        held_out, train = order[:n_eval], order[n_eval:]
        self.tok_stats = TokenizeStats()
        rows = tokenize_pairs(tokenizer, [pairs[i] for i in train], cfg.max_length, cfg.template, cfg.overlong,
                              self.tok_stats, lambda j: self.read_stats.where(train[j]))
        if not rows:
            raise PeftkitError(f"{cfg.data}: no pair fits max_length={cfg.max_length} tokens with an answer token "
                               "left; raise max_length")
        if cfg.eval_data:
            eval_stats = ReadStats()
            eval_rows = read_pairs(cfg.eval_data, cfg.skip_bad_rows, eval_stats)
            where: Callable[[int], str] = eval_stats.where
        else:
            eval_rows = [pairs[i] for i in held_out]
            where = lambda j: self.read_stats.where(held_out[j])  # noqa: E731
        eval_pairs = tokenize_pairs(tokenizer, eval_rows, cfg.max_length, cfg.template, cfg.overlong, where=where)
        self.eval_pairs = [p.row() for p in eval_pairs]
        self.eval_examples = [e for row in self.eval_pairs for e in row]
        self.eval_conversations = []
        self.packing = not (problem := packing_problem(model))
        if not self.packing and log:
            print(f"peftkit: pairs unpacked (chosen and rejected in rows of their own): {problem}", file=sys.stderr)
        self.share_prefix = False  # the pair's prompt is shared by `collate_pairs` itself
        self.rows = [p.row() for p in rows]
        self.replay_rows, self.replay_per_batch = [], 0
        self.micro_per_epoch = len(self.rows) // (cfg.batch_size * world)
        self._check_one_step()
        self.steps_per_epoch = self.micro_per_epoch // cfg.grad_accum
        self.seen_rows = []
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))

    def collate(self, rows: list[list[Example]]) -> Batch:
        return collate_pairs(rows, self.pad_id, self.packing)

    def eval_rows(self) -> list[list[Example]]:
        return self.eval_pairs


def _pairs(batch: Batch) -> int:
    return int(batch["sequence_ids"].max()) // 2 + 1


def _chosen_targets(batch: Batch) -> int:
    labels, owner = batch["labels"][:, 1:], batch["sequence_ids"][:, 1:]
    return int((labels.ne(-100) & owner.ge(0) & owner.remainder(2).eq(0)).sum())


class PreferenceObjective:
    """DPO or ORPO losses of micro-batches of pairs, and the step's metrics (see the module notes).

    Args:
        cfg: the run's configuration (objective, beta, label_smoothing, loss_type).
        model: the adapted model (not a DDP wrapper): DPO's reference is it with the adapter off.
        report: what the method's `apply` did (which layers to swap back for the reference).

    Raises:
        PeftkitError: DPO with a method that trains the base weights (`peftkit.core.disable.check_disable`).
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, report: InjectReport) -> None:
        self.cfg, self.model, self.report = cfg, model, report
        self.dpo = cfg.objective == "dpo"
        if self.dpo:
            try:
                check_disable(model, report)
            except PeftkitError as e:
                raise PeftkitError(f"objective=dpo needs a reference model: {e}; or use objective=orpo (no "
                                   "reference)") from None

    def losses(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
        """Per-pair losses, rewards (pairs x 2), policy log-probabilities (pairs x 2) and answer token counts.

        DPO's reference runs first: its forward's temporaries then come and go before the policy's activations are
        held, instead of on top of them (the step's peak is the policy's graph alone).
        """
        if not self.dpo:
            policy, counts = sequence_logps(model, batch)
            losses, rewards = orpo_loss(policy, counts, self.cfg.beta)
            return losses, rewards, policy, counts
        with torch.no_grad(), adapter_disabled(self.model, self.report):
            reference, _ = sequence_logps(self.model, batch)
        policy, counts = sequence_logps(model, batch)
        losses, rewards = dpo_loss(policy, reference, counts, self.cfg.beta, self.cfg.label_smoothing,
                                   self.cfg.loss_type)
        return losses, rewards, policy, counts

    def accumulate(self, step: Any, state: Any, batches: list[Batch]) -> tuple[int, float, float, dict[str, Any]]:
        """Forward and backward of each micro-batch of one optimizer step (`peftkit.train.step.TrainStep`'s
        accelerator, autocast and sums across processes); (answer tokens, step loss, model FLOPs, metrics)."""
        acc, world = step.accelerator, step.world
        n_pairs = step.global_sum(sum(_pairs(b) for b in batches))
        n_chosen = step.global_sum(sum(_chosen_targets(b) for b in batches)) if not self.dpo else 0.0
        sums = dict.fromkeys((*METRICS, "loss", "nll_loss"), 0.0)
        targets, flops = 0, 0.0
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else acc.no_sync(state.model)
            with sync, step.autocast():
                losses, rewards, policy, counts = self.losses(state.model, batch)
                loss = losses.sum() / n_pairs
                if not self.dpo:  # ORPO: + the NLL of the chosen answers
                    nll = -policy[:, 0].sum()
                    loss = loss + nll / max(n_chosen, 1.0)
                    sums["nll_loss"] += nll.item()
                acc.backward(state.scaler.scale(loss * world))  # DDP averages over processes
            sums["loss"] += loss.item()
            _add_metrics(sums, rewards, policy.detach())
            real, n = int(batch["segment_ids"].ge(0).sum()), int(counts.sum())
            state.tokens, targets = state.tokens + real, targets + n
            cost = step.flops.step(real, n, step.flops.pairs(batch["segment_ids"], batch.get("prefix_lengths")))
            flops += cost * (4 / 3 if self.dpo else 1.0)  # the reference: a forward, a third of forward + backward
        totals = {k: step.global_sum(v) for k, v in sums.items()}
        metrics = {k: round(totals[k] / n_pairs, 6) for k in METRICS}
        if not self.dpo:
            metrics["nll_loss"] = round(totals["nll_loss"] / max(n_chosen, 1.0), 6)
        return targets, totals["loss"], flops, metrics

    @torch.no_grad()
    def evaluate(self, model: nn.Module, rows: list[list[Example]], pad_id: int, packed: bool, batch_size: int,
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
        """``eval_loss`` (the training loss over all of `rows`: the mean pair loss, + for ORPO the NLL per chosen
        answer token) and ``eval_rewards/...`` over held-out pairs, in eval mode (put back as it was)."""
        was_training = model.training
        model.eval()
        sums = dict.fromkeys((*METRICS, "loss", "nll", "chosen"), 0.0)
        try:
            for i in range(0, len(rows), batch_size):
                with autocast():
                    losses, rewards, policy, counts = self.losses(model, collate_pairs(rows[i:i + batch_size],
                                                                                       pad_id, packed))
                sums["loss"] += float(losses.sum())
                sums["nll"] -= float(policy[:, 0].sum())
                sums["chosen"] += float(counts[:, 0].sum())
                _add_metrics(sums, rewards, policy)
        finally:
            model.train(was_training)
        n = max(len(rows), 1)
        loss = sums["loss"] / n + (0.0 if self.dpo else sums["nll"] / max(sums["chosen"], 1.0))
        return {"eval_loss": loss, **{f"eval_{k}": sums[k] / n for k in METRICS}}


def _add_metrics(sums: dict[str, float], rewards: torch.Tensor, policy: torch.Tensor) -> None:
    """Add a micro-batch's sums of TRL's metrics (means are taken over the step's pairs)."""
    chosen, rejected = rewards[:, 0].float(), rewards[:, 1].float()
    sums["rewards/chosen"] += float(chosen.sum())
    sums["rewards/rejected"] += float(rejected.sum())
    sums["rewards/margins"] += float((chosen - rejected).sum())
    sums["rewards/accuracies"] += float((chosen > rejected).sum())
    sums["logps/chosen"] += float(policy[:, 0].sum())
    sums["logps/rejected"] += float(policy[:, 1].sum())

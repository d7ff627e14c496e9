"""One optimizer step: gather `grad_accum` micro-batches, normalise the loss by the target tokens of all of them
(across processes too), add the EWC penalty once, backward, clip, ask the divergence guard, step.

`RunState` is what a run carries from step to step; `TrainStep` advances it by one step and returns the step's
metrics record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from peftkit.data.sequences import IGNORE
from peftkit.optim import build_optimizer
from peftkit.train.config import TrainConfig
from peftkit.train.ewc import EWCAnchor
from peftkit.train.flops import FlopCount
from peftkit.train.guard import DivergenceGuard
from peftkit.train.logs import significant
from peftkit.train.loss import sequence_loss
from peftkit.train.sharding import all_finite, global_norm

__all__ = ["RunState", "TrainStep", "make_optimizer", "make_scheduler"]


def make_optimizer(cfg: TrainConfig, params: Sequence[nn.Parameter], model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over `params`; a method may ask for its own parameter groups (LoRA+: B at ratio x lr)."""
    method_config = getattr(model, "peftkit_method", (None, None))[1]
    groups = getattr(method_config, "optimizer_groups", lambda *_: None)(model, cfg.lr, cfg.weight_decay)
    return build_optimizer(cfg.optimizer, groups or params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           betas=(cfg.adam_beta1, cfg.adam_beta2), page_budget_bytes=cfg.page_budget_bytes)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_ratio`` of the steps, then constant or cosine down to zero."""
    warmup = int(cfg.warmup_ratio * total_steps)
    cosine = cfg.scheduler == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclasses.dataclass
class RunState:
    """What one training run carries from step to step: built by `Trainer`, advanced by `TrainStep`."""

    model: nn.Module  # as prepared by Accelerate (DDP-wrapped with several processes)
    optimizer: Any
    scheduler: Any
    scaler: torch.amp.GradScaler
    trainable: dict[str, nn.Parameter]
    ewc: EWCAnchor | None
    guard: DivergenceGuard
    batches: Iterator[tuple[int, int, dict[str, torch.Tensor]]]
    step: int  # optimizer steps taken
    epoch: int  # data position: the next micro-batch is number `micro` of `epoch`
    micro: int
    history: list[dict[str, Any]]
    best: dict[str, Any] | None  # the save_best metric's best evaluation so far
    peak: float | None
    t_start: float
    tokens: int = 0
    target_tokens: int = 0
    loss_value: float = float("nan")
    total_flops: float = 0.0
    eval_loss: float | None = None
    eval_seconds: float = 0.0  # time spent evaluating is not training time (throughput, MFU)


class TrainStep:
    """Advances a `RunState` by one optimizer step (see the module's docstring)."""

    def __init__(self, cfg: TrainConfig, accelerator: Any, autocast: Callable[[], Any], flops: FlopCount,
                 objective: Any = None) -> None:
        self.cfg, self.accelerator, self.autocast, self.flops = cfg, accelerator, autocast, flops
        self.world = accelerator.num_processes
        # DDP averages the ranks' gradients, so each rank's loss is scaled by the world; sharded runs sum them
        self.loss_scale = self.world if cfg.sharding == "none" else 1
        # preference tuning (`peftkit.train.preference_run.PreferenceObjective`): its own losses over pairs
        self.objective = objective

    def __call__(self, state: RunState) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; the step's metrics record."""
        t0 = time.perf_counter()
        group = [next(state.batches) for _ in range(self.cfg.grad_accum)]
        state.epoch, state.micro = group[-1][0], group[-1][1] + 1
        extra: dict[str, Any] = {}
        if self.objective is not None:
            n_targets, step_loss, step_flops, extra = self.objective.accumulate(self, state, [b for _, _, b in group])
            n_targets, penalty = int(self.global_sum(n_targets)), None
        else:
            n_targets = int(self.global_sum(sum(int(b["labels"][:, 1:].ne(IGNORE).sum()) for _, _, b in group)))
            step_loss, penalty, step_flops = self._accumulate(state, [b for _, _, b in group], n_targets)
            step_loss = self.global_sum(step_loss) / max(n_targets, 1)  # the task loss, without the penalty
        grad_norm, fault = self._update(state, step_loss)
        state.step += 1
        state.target_tokens += n_targets
        state.loss_value = step_loss
        dt = time.perf_counter() - t0
        step_flops = self.global_sum(step_flops)
        state.total_flops += step_flops
        record = {"step": state.step, "loss": round(step_loss, 6), "lr": state.scheduler.get_last_lr()[0],
                  "grad_norm": round(grad_norm, 4) if math.isfinite(grad_norm) else str(grad_norm),
                  "target_tokens_per_s": round(n_targets / dt, 1), "epoch": state.epoch,
                  "model_flops_per_s": significant(step_flops / dt)}
        if state.peak:
            record["mfu"] = significant(step_flops / dt / (state.peak * self.world))
        record.update(extra)
        if penalty is not None:
            record["ewc_penalty"] = round(penalty, 6)
        if fault == "skip":
            record["skipped"] = True
        state.history.append({"step": state.step, "loss": step_loss})
        return record

    def _accumulate(self, state: RunState, batches: list[dict[str, torch.Tensor]],
                    n_targets: int) -> tuple[float, float | None, float]:
        """Forward and backward of each micro-batch; (summed loss, EWC penalty, model FLOPs) on this process."""
        acc, step_loss, penalty_value, step_flops = self.accelerator, 0.0, None, 0.0
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last else acc.no_sync(state.model)
            with sync, self.autocast():
                loss_sum, _ = sequence_loss(state.model, batch)
                # sum over this micro-batch / targets in the whole step (x world where DDP averages over ranks)
                loss = loss_sum * (self.loss_scale / max(n_targets, 1))
                if state.ewc is not None and last:  # once per step, on every rank (the DDP average keeps it whole)
                    penalty = state.ewc.penalty(state.trainable)
                    loss = loss + penalty
                    penalty_value = penalty.item()
                acc.backward(state.scaler.scale(loss))
            step_loss += loss_sum.item()
            real = int(batch["segment_ids"].ge(0).sum())
            state.tokens += real
            step_flops += self.flops.step(real, int(batch["labels"][:, 1:].ne(IGNORE).sum()),
                                          self.flops.pairs(batch["segment_ids"], batch.get("prefix_lengths")))
        return step_loss, penalty_value, step_flops

    def _update(self, state: RunState, step_loss: float) -> tuple[float, str | None]:
        """Clip, ask the guard, step (or drop the step); the gradient norm before clipping and the guard's word."""
        optimizer, scheduler, scaler, trainable = state.optimizer, state.scheduler, state.scaler, state.trainable
        scaler.unscale_(optimizer)
        # the norm before clipping (clipping to inf only measures it)
        grad_norm = float(global_norm(self.accelerator.clip_grad_norm_(list(trainable.values()),
                                                                       self.cfg.max_grad_norm or math.inf)))
        fault = state.guard.check(state.step + 1, step_loss, grad_norm, scaler.is_enabled())
        if fault == "skip":
            optimizer.zero_grad(set_to_none=True)  # this step's update is dropped: weights and state untouched
            return grad_norm, fault
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped by the fp16 scaler when a gradient overflowed
        scaler.update()
        if scaler.get_scale() >= scale:  # the scaler lowers its scale exactly when it skipped the step
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not all_finite(trainable.values()):
            state.guard.stop(state.step + 1, "an update made trainable weights non-finite (the learning rate "
                                             "is far too high)")
        return grad_norm, fault

    def global_sum(self, value: float) -> float:
        """`value` summed over the processes (float64: exact for the integer counts too)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

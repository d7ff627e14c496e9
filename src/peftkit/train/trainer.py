"""The one training loop, for every method, on CPU, one GPU or many (HF Accelerate / torchrun, DDP).

Reads top to bottom: build model and data, then for each optimizer step gather `grad_accum` micro-batches,
normalise the loss by the number of target tokens in all of them (across processes too), add the EWC penalty
when asked, backward, clip, step, log, checkpoint. Logits are computed only at the positions that predict a
target token, which for instruction data (short answers after long prompts) saves most of the memory and time of
the output head.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import functools
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import gather_object
from torch import nn

from peftkit.core.adapter_io import apply_method, save_adapter, trainable_state_dict, writing
from peftkit.core.context import Quantization, TrainingContext, fingerprint
from peftkit.core.matmul import frozen_linear
from peftkit.core.registry import get_method
from peftkit.data.formats import Conversation, ReadStats, read_conversations
from peftkit.data.sequences import (
    IGNORE,
    Example,
    TokenizeStats,
    collate,
    is_template_text,
    make_rows,
    template_text,
    tokenize_conversations,
)
from peftkit.errors import PeftkitError
from peftkit.hardware import Precision, matmul_peak, resolve_precision, warn_if_slow
from peftkit.optim import build_optimizer
from peftkit.quant import QuantLinear
from peftkit.train.checkpoint import (
    RunFolder,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    write_text_atomic,
)
from peftkit.train.config import TrainConfig
from peftkit.train.evaluation import generation_scores, lower_is_better, resolve_metric
from peftkit.train.flops import FlopCount
from peftkit.train.packed_attention import NAME as PACKED_ATTENTION
from peftkit.train.packed_attention import packing_problem, segment_bounds, use_packed_attention
from peftkit.train.tracking import Tracking

__all__ = ["EWCAnchor", "SummedCrossEntropy", "TrainResult", "Trainer", "count_parameters", "diagonal_fisher",
           "replay_rows_per_batch", "sequence_loss"]


def count_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable / total parameter counts (shared tensors counted once) and the trainable percentage.

    A 4-bit weight is a buffer, not a parameter; it counts as the weight it stands for (d_out x d_in).
    """
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    total = sum(p.numel() for p in seen.values()) + quantized
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def sequence_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over target tokens, and their count.

    Only the hidden states that predict a target go through the output head: a pre-hook on the head gathers
    them, row by row, before the vocabulary projection (for instruction data, answers are a fraction of each
    row). With `packed_attention` switched on, the example boundaries go along so that attention runs per example.

    Raises:
        PeftkitError: for packed rows (a 4D mask) that would not give the model each example's own result
            (`packing_problem`: a sliding window without packed attention, a chunked or recurrent layer).
    """
    core = getattr(model, "module", model)  # under DDP, hooks and config live on the wrapped model
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4 and (problem := packing_problem(core)):
        raise PeftkitError(f"packed rows: {problem}; collate one example per row")
    device = next(core.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "segment_ids", "prefix_lengths")}
    targets = batch["labels"][:, 1:].to(device)
    rows, cols = targets.ne(IGNORE).nonzero(as_tuple=True)
    tgt = targets[rows, cols]
    if "segment_ids" in batch and getattr(core.config, "_attn_implementation", None) == PACKED_ATTENTION:
        inputs["peftkit_segments"] = segment_bounds(batch["segment_ids"], batch.get("prefix_lengths"))
    width = targets.shape[1] + 1

    def gather(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        offset = hidden.shape[1] - width  # prompt tuning puts its virtual tokens first
        return (hidden[rows, cols + offset].unsqueeze(0), *args[1:])

    head = core.get_output_embeddings()
    if head is None:
        raise PeftkitError(f"{type(core).__name__} has no output head (get_output_embeddings): not a causal LM")
    handle = head.register_forward_pre_hook(gather)
    # a frozen plain head (every method but full fine-tuning): its product by `frozen_linear` (oneDNN on CPU fp32)
    # (not over a forward set on the instance, e.g. accelerate's device hooks)
    fast_head = (type(head).forward is nn.Linear.forward and "forward" not in head.__dict__
                 and not head.weight.requires_grad)
    if fast_head:
        head.forward = functools.partial(_frozen_head, head)
    try:
        logits = model(**inputs, use_cache=False).logits.flatten(0, 1)  # a view: no batch-sized zeros in backward
    finally:
        handle.remove()
        if fast_head:
            del head.forward
    # 16-bit logits go in as they are (the loss widens them a chunk at a time); others as an fp32 copy
    low = logits.dtype in (torch.bfloat16, torch.float16)
    return SummedCrossEntropy.apply(logits if low else logits.float(), tgt), tgt.numel()


def _frozen_head(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return frozen_linear(hidden, head.weight, head.bias)


class SummedCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits, targets, reduction="sum")`` without vocabulary-sized temporaries.

    Row chunks of `CHUNK` rows: each chunk's fp32 softmax is small enough to stay in cache between its passes
    (3 MiB for the bundled model's 49,152 words), forward keeps only each row's log-probability of its target, and
    backward recomputes the chunk's softmax and writes ``(softmax - onehot) * grad`` straight into the gradient.
    fp32 (or fp64) logits, the caller's own copy, become their gradient in place; 16-bit logits are saved as they are
    and get a 16-bit gradient, rounded once from fp32 (as autograd's cast back would). Against PyTorch's log_softmax +
    nll_loss this saves three (targets x vocabulary) fp32 buffers per step (the bundled model: 194 MB each for 1,000
    targets), and for 16-bit logits the fp32 copy and its cast back too. The logits are consumed: the backward runs
    once (no ``retain_graph``).
    """

    CHUNK = 16

    @staticmethod
    def _chunks(*tensors: torch.Tensor):
        return zip(*(t.split(SummedCrossEntropy.CHUNK) for t in tensors), strict=True)

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            wide = torch.promote_types(logits.dtype, torch.float32)
            picked = torch.cat([torch.log_softmax(c, -1, dtype=wide).gather(1, t[:, None])
                                for c, t in SummedCrossEntropy._chunks(logits, targets)])
        ctx.save_for_backward(logits, targets)
        return -picked.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets = ctx.saved_tensors
        wide = torch.promote_types(logits.dtype, torch.float32)
        out = logits if logits.dtype == wide else torch.empty_like(logits)
        rows = torch.arange(SummedCrossEntropy.CHUNK, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for c, t, o in SummedCrossEntropy._chunks(logits, targets, out):
                p = torch.softmax(c, -1, dtype=wide)
                p[rows[:len(t)], t] -= 1.0
                torch.mul(p, grad, out=o)
        return out, None


def replay_rows_per_batch(batch_size: int, fraction: float) -> int:
    """Replay rows to add to `batch_size` task rows so that they are `fraction` of the micro-batch.

    ``n / (batch_size + n) = fraction``, rounded to the nearest row, at least one when ``fraction > 0``
    (e.g. batch 8: fraction 0.2 -> 2 rows, 0.25 -> 3 rows (27%), 0.5 -> 8 rows).
    """
    if fraction <= 0:
        return 0
    return max(1, round(batch_size * fraction / (1.0 - fraction)))


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
        return 0.5 * self.lam * total


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None
    steps: int
    train_loss: float
    eval_loss: float | None
    train_seconds: float
    target_tokens: int
    tokens: int
    params: dict[str, float]
    precision: str = "fp32"
    model_flops: float = 0.0
    matmul_peak: float | None = None  # FLOP/s per process in the compute dtype (CPU runs)
    processes: int = 1

    @property
    def target_tokens_per_s(self) -> float:
        return self.target_tokens / max(self.train_seconds, 1e-9)

    @property
    def mfu(self) -> float | None:
        """Achieved model FLOP/s over the measured matmul peak (`peftkit.train.flops`, `peftkit.hardware`)."""
        if not self.matmul_peak:
            return None
        return self.model_flops / max(self.train_seconds, 1e-9) / (self.matmul_peak * self.processes)


def _read(cfg: TrainConfig, path: str) -> tuple[list[Conversation], ReadStats]:
    read_stats = ReadStats()
    convs = read_conversations(path, cfg.field_map or None, cfg.skip_bad_rows, read_stats, cfg.limit_examples or None)
    return convs, read_stats


def _tokenize(cfg: TrainConfig, tokenizer, convs: list[Conversation], stats: TokenizeStats,
              where: Callable[[int], str] | None = None) -> list[Example]:
    """`convs` tokenized as `cfg` says; `where(i)` names conversation i in errors (its file and row)."""
    return tokenize_conversations(tokenizer, convs, cfg.max_length, cfg.template, cfg.overlong, stats, where=where,
                                  skip_rejected=cfg.skip_bad_rows)


def _check_some_left(examples: list[Example], stats: TokenizeStats, cfg: TrainConfig, path: str) -> None:
    """The real reason when tokenizing left no example of `path`."""
    if examples:
        return
    n, m, k = stats.dropped, cfg.max_length, stats.shortest_dropped
    if cfg.overlong == "drop":
        raise PeftkitError(f"{path}: all {n} examples are longer than max_length={m} tokens (shortest: {k}); "
                           "raise max_length or set overlong=truncate")
    raise PeftkitError(f"{path}: all {n} examples lose their whole answer when truncated to max_length={m} "
                       f"tokens (shortest prompt: {k} tokens); raise max_length or shorten the prompts")


def _with_prompt(context: TrainingContext, cfg: TrainConfig, tokenizer, stats: ReadStats) -> TrainingContext:
    """The context completed with what the training data looked like: chat template, system message,
    shared instruction."""
    if cfg.template in (None, "", "model"):
        name = "model"  # the tokenizer's own
    else:
        name = None if is_template_text(cfg.template) else cfg.template  # None: given as Jinja text
    text = template_text(tokenizer, cfg.template)  # a tokenizer may hold a dict of templates: not recorded then
    return dataclasses.replace(context, template=name, template_text=text if isinstance(text, str) else None,
                               system=stats.system, instruction=stats.instruction)


def prepare_model(cfg: TrainConfig, model: nn.Module | None = None, tokenizer=None,
                  precision: Precision | None = None):
    """Load (or take) the model, quantize it if asked, adapt it with the method, set dtypes."""
    precision = precision or resolve_precision(cfg.precision)
    if model is None:
        from peftkit.models import load_model

        model, tokenizer = load_model(cfg.model, dtype=precision.weight_dtype)
    quantization = None
    if cfg.quantize != "none":
        source = next((m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)), torch.float32)
        quantization = Quantization(cfg.quantize, cfg.quant_block_size, cfg.double_quant,
                                    str(source).removeprefix("torch."))
    # what the adapter will remember of its base (before quantization and adaptation change the weights)
    context = TrainingContext(base=cfg.model, fingerprint=fingerprint(model), quantization=quantization)
    if quantization is not None:
        # the dequantized weight is in the compute dtype: bf16 (QLoRA as published), fp16, or fp32 activations
        quantization.apply(model, compute_dtype=precision.compute_dtype)
    report = apply_method(model, cfg.method, cfg.method_settings())
    model.peftkit_context = context  # completed with the template and prompt by `Trainer`; save_adapter writes it
    # Frozen weights in 16 bits (bf16 / fp16) halve memory and run 16-bit matmuls; trainable weights are fp32
    # masters in every precision.
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if p.requires_grad else precision.weight_dtype)
    use_packed_attention(model)  # per-example attention in packed training batches (other calls: sdpa, unchanged)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer, report


class DivergenceGuard:
    """Decides, before each optimizer step, whether the step may update the weights, and stops a run that has
    diverged or died, naming the cause and the last checkpoint.

    A step with a non-finite loss or gradient is skipped (up to `allowed` of them) or stops the run; with the fp16
    gradient scaler, an overflowing gradient is the scaler's to skip (it lowers its scale), unless it keeps
    overflowing. A run stops as dead when its gradient norm is exactly zero for `PATIENCE` steps in a row (nothing
    can learn: e.g. an output saturated by a huge update), and as diverged when its loss stays above
    ``max(2 x start, start + 2)`` for `PATIENCE` steps (start: the mean loss of the first `PATIENCE` steps).
    """

    PATIENCE = 3
    SCALER_PATIENCE = 20

    def __init__(self, allowed: int, output_dir: Path, precision: str, history: list[dict[str, Any]]) -> None:
        self.allowed, self.output_dir, self.precision = allowed, output_dir, precision
        self.skipped = self.zero = self.high = self.overflows = 0
        self.start_losses = [h["loss"] for h in history[:self.PATIENCE]]

    def check(self, step: int, loss: float, grad_norm: float, scaler: bool) -> str | None:
        """None (take the step) or "skip"; raises `PeftkitError` to stop the run."""
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            if scaler and math.isfinite(loss):
                self.overflows += 1
                if self.overflows < self.SCALER_PATIENCE:
                    return None  # the fp16 scaler skips this step and lowers its scale
                self.stop(step, f"fp16 gradients overflowed {self.overflows} steps in a row")
            self.skipped += 1
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
            if self.skipped > self.allowed:
                self.stop(step, f"{what} (non-finite){self._skips()}")
            print(f"peftkit: step {step} skipped: {what} ({self.skipped} of {self.allowed} allowed)", file=sys.stderr)
            return "skip"
        self.overflows = 0
        self.zero = self.zero + 1 if grad_norm == 0.0 else 0
        if self.zero >= self.PATIENCE:
            self.stop(step, f"the gradients were exactly zero for {self.zero} steps (a dead run: loss {loss:.4f})")
        if len(self.start_losses) < self.PATIENCE:
            self.start_losses.append(loss)
            return None
        start = sum(self.start_losses) / len(self.start_losses)
        self.high = self.high + 1 if loss > max(2 * start, start + 2) else 0
        if self.high >= self.PATIENCE:
            self.stop(step, f"the loss diverged: {loss:.4f} against {start:.4f} at the start")
        return None

    def _skips(self) -> str:
        return f", after {self.skipped - 1} skipped step(s)" if self.skipped > 1 else ""

    def stop(self, step: int, cause: str) -> None:
        last = latest_checkpoint(self.output_dir)
        advice = "try a lower lr" + (" or precision fp32" if self.precision != "fp32" else "")
        raise PeftkitError(f"training stopped at step {step}: {cause}. Last checkpoint (finite weights, verified when "
                           f"saved): {last or 'none (set save_every)'}; {advice}.")


@dataclasses.dataclass
class _RunState:
    """What one training run carries from step to step: built by `Trainer._start`, advanced by `Trainer._step`."""

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
    log_path: Path
    peak: float | None
    progress: Any
    t_start: float
    tokens: int = 0
    target_tokens: int = 0
    loss_value: float = float("nan")
    total_flops: float = 0.0
    eval_loss: float | None = None
    eval_seconds: float = 0.0  # time spent evaluating is not training time (throughput, MFU)


class Trainer:
    """Fine-tune a model with one method, as `cfg` says.

    Args:
        cfg: the run's configuration.
        model, tokenizer: use these instead of loading `cfg.model` (tests, notebooks).
        resume: continue from the newest checkpoint in `cfg.output_dir` (an error if there is none).
        overwrite: replace a run already in `cfg.output_dir` (without it, or `resume`, that is an error).
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module | None = None, tokenizer=None, resume: bool = False,
                 overwrite: bool = False):
        self.cfg = cfg
        self.resume, self.overwrite = resume, overwrite
        self.output_dir = Path(cfg.output_dir)
        self.tracking = Tracking(cfg.report_to, self.output_dir)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            # Autocast is ours (below), not Accelerate's: its mixed-precision setting is process-global and cannot
            # change between two trainers in one process (a comparison, a notebook, the test suite).
            mixed_precision="no",
            **self.tracking.accelerator_kwargs(),
            # a rank that died or hangs ends the job within this (torch's defaults: 10 min NCCL, 30 min gloo)
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist_timeout))],
        )
        device = self.accelerator.device
        self.precision = resolve_precision(cfg.precision, device)
        warn_if_slow(self.precision)
        self.autocast = functools.partial(torch.autocast, device.type, dtype=self.precision.compute_dtype,
                                          enabled=self.precision.autocast)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model, self.tokenizer, self.report = prepare_model(cfg, model, tokenizer, self.precision)
        self.params = count_parameters(self.model)
        self.flops = FlopCount.of(self.model)
        self.final_scores: dict[str, float] = {}  # eval loss and eval_metric scores at the end of training
        self._prepare_data()

    # ---------------------------------------------------------------- data
    def _prepare_data(self) -> None:
        cfg = self.cfg
        if not cfg.data:
            raise PeftkitError("no training data: set data to a JSON, JSONL, CSV or Parquet file, a folder or a "
                               "Hub dataset id")
        convs, self.read_stats = _read(cfg, cfg.data)
        order = list(range(len(convs)))  # shuffled; with eval_fraction, the first ones are held out
        random.Random(cfg.seed).shuffle(order)
        n_eval = 0 if cfg.eval_data else int(len(convs) * cfg.eval_fraction)
        held_out, train = order[:n_eval], order[n_eval:]
        self.tok_stats = TokenizeStats()
        examples = _tokenize(cfg, self.tokenizer, [convs[i] for i in train], self.tok_stats,
                             lambda j: self.read_stats.where(train[j]))
        _check_some_left(examples, self.tok_stats, cfg, cfg.data)
        self.model.peftkit_context = self.context = _with_prompt(self.model.peftkit_context, cfg, self.tokenizer,
                                                                 self.read_stats)
        if cfg.eval_data:
            self.eval_conversations, eval_stats = _read(cfg, cfg.eval_data)
            where = eval_stats.where
        else:
            self.eval_conversations = [convs[i] for i in held_out]
            where = lambda j: self.read_stats.where(held_out[j])  # noqa: E731
        self.eval_examples = _tokenize(cfg, self.tokenizer, self.eval_conversations, TokenizeStats(), where)
        self.packing = cfg.packing
        if cfg.packing and (problem := packing_problem(self.model)):  # train unpacked rather than wrong
            if self.is_main:
                print(f"peftkit: packing off: {problem}", file=sys.stderr)
            self.packing = False
        self.share_prefix = self.packing and cfg.share_prefix
        self.rows = make_rows(examples, cfg.max_length, self.packing, self.share_prefix)
        # Replay (against forgetting): general rows mixed into every micro-batch, on top of the task rows.
        self.replay_rows: list[list[Example]] = []
        if cfg.replay_data:
            replay, replay_stats = _read(cfg, cfg.replay_data)
            replay_examples = _tokenize(cfg, self.tokenizer, replay, TokenizeStats(), replay_stats.where)
            random.Random(cfg.seed + 1).shuffle(replay_examples)
            self.replay_rows = make_rows(replay_examples, cfg.max_length, self.packing, self.share_prefix)
        self.replay_per_batch = replay_rows_per_batch(cfg.batch_size, cfg.replay_fraction)
        rows_per_step = cfg.batch_size * cfg.grad_accum * self.world
        self.micro_per_epoch = len(self.rows) // (cfg.batch_size * self.world)
        if self.micro_per_epoch < cfg.grad_accum:
            dropped = self.tok_stats.dropped
            why = (f" ({dropped} examples were dropped as longer than max_length={cfg.max_length} tokens: raise "
                   "max_length to keep them)") if dropped else ""
            raise PeftkitError(f"{len(self.rows)} training rows cannot fill one step of {rows_per_step} rows "
                               f"(batch_size x grad_accum x processes); lower batch_size or grad_accum{why}")
        self.steps_per_epoch = self.micro_per_epoch // cfg.grad_accum
        self.seen_rows: list[int] = []  # row indices this process trained on, in order
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))

    def _micro_batches(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """This process's micro-batches of `epoch`, after skipping `skip` (resume)."""
        order = list(range(len(self.rows)))
        random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        per_micro = self.cfg.batch_size * self.world
        for m in range(skip, self.micro_per_epoch):
            chunk = order[m * per_micro:(m + 1) * per_micro]
            mine = chunk[self.rank * self.cfg.batch_size:(self.rank + 1) * self.cfg.batch_size]
            self.seen_rows.extend(mine)
            rows = [self.rows[i] for i in mine] + self._replay_for(epoch * self.micro_per_epoch + m)
            yield collate(rows, pad_id=self.tokenizer.pad_token_id, share_prefix=self.share_prefix)

    def _replay_for(self, micro: int) -> list[list[Example]]:
        """The replay rows of this process's micro-batch number `micro` (counted from the start of training).

        Replay rows cycle through one seeded permutation, each process and micro-batch taking the next ones, so a
        resumed run sees the same replay rows as an uninterrupted one.
        """
        n = self.replay_per_batch
        if not n:
            return []
        order = list(range(len(self.replay_rows)))
        random.Random(self.cfg.seed * 1_000_003 + 7).shuffle(order)
        first = (micro * self.world + self.rank) * n
        return [self.replay_rows[order[(first + j) % len(order)]] for j in range(n)]

    def _batches(self, epoch: int, micro: int) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """(epoch, micro-batch index, batch) forever, starting at a data position."""
        while True:
            for batch in self._micro_batches(epoch, micro):
                yield epoch, micro, batch
                micro += 1
            epoch, micro = epoch + 1, 0

    # ---------------------------------------------------------------- optimisation
    def _optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.cfg
        method_config = self.model.peftkit_method[1]  # a method may ask for its own groups (LoRA+: B at ratio x lr)
        groups = getattr(method_config, "optimizer_groups", lambda *_: None)(self.model, cfg.lr, cfg.weight_decay)
        return build_optimizer(cfg.optimizer, groups or params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               betas=(cfg.adam_beta1, cfg.adam_beta2), page_budget_bytes=cfg.page_budget_bytes)

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        warmup = int(self.cfg.warmup_ratio * self.total_steps)
        total, cosine = self.total_steps, self.cfg.scheduler == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if not cosine:
                return 1.0
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _global_sum(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.accelerator.device)
        return int(self.accelerator.reduce(t, reduction="sum").item())

    @torch.no_grad()
    def evaluate(self, max_rows: int | None = None) -> float | None:
        """Mean target-token loss on the eval examples (None without eval data)."""
        if not self.eval_examples:
            return None
        model = self.model
        was_training = model.training
        model.eval()
        rows = make_rows(self.eval_examples, self.cfg.max_length, self.packing, self.share_prefix)[:max_rows]
        total, count = 0.0, 0
        for i in range(0, len(rows), self.cfg.batch_size):
            batch = collate(rows[i:i + self.cfg.batch_size], self.tokenizer.pad_token_id, 8, self.share_prefix)
            with self.autocast():
                loss, n = sequence_loss(model, batch)
            total, count = total + loss.item(), count + n
        model.train(was_training)
        return total / max(count, 1)

    def evaluate_generation(self) -> dict[str, float]:
        """``eval_<name>`` scores of greedy answers to the first `eval_samples` held-out prompts (`eval_metric`);
        empty without a metric. Runs on the main process only (the others get an empty mapping)."""
        cfg = self.cfg
        if not cfg.eval_metric or not self.eval_conversations or not self.is_main:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        with self.autocast():
            return generation_scores(model, self.tokenizer, self.eval_conversations[:cfg.eval_samples],
                                     resolve_metric(cfg.eval_metric), cfg.template, cfg.eval_max_new_tokens,
                                     batch_size=max(cfg.batch_size, 16))

    def _keep_best(self, best: dict[str, Any] | None, scores: dict[str, float], step: int) -> dict[str, Any] | None:
        """Save the adapter to ``best/`` when the `save_best` metric improved; the best so far (main process)."""
        name = "eval_" + self.cfg.save_best.removeprefix("eval_")
        if name not in scores:
            raise PeftkitError(f"save_best: {self.cfg.save_best!r} is not among the evaluation's results "
                               f"({', '.join(sorted(scores))})")
        value = scores[name]
        better = best is None or best.get("metric") != name or (
            value < best["value"] if lower_is_better(name) else value > best["value"])
        if not better:
            return best
        best = {"metric": name, "value": value, "step": step}
        save_adapter(self.accelerator.unwrap_model(self.model), self.output_dir / "best")
        (self.output_dir / "best.json").write_text(json.dumps(best, indent=2) + "\n")
        return best

    def run(self, until_step: int | None = None) -> TrainResult:
        """Train to the end (or until `until_step`, as if interrupted there), then save the adapter."""
        folder = RunFolder(self.output_dir, self.resume, self.overwrite) if self.is_main else None
        try:
            return self._run(until_step)
        except RuntimeError as e:
            if self.world > 1 and _is_distributed_failure(e):
                raise PeftkitError(self._distributed_failure(e)) from None
            raise
        finally:
            if folder is not None:
                folder.release()

    def _distributed_failure(self, error: BaseException) -> str:
        text = str(error)
        if "Timed out" in text or "timeout" in text.lower():
            what = (f"no answer from another process within dist_timeout={self.cfg.dist_timeout:g} s (it hangs or "
                    "died: its log says why)")
        elif "Connection" in text or "closed" in text or "reset" in text:
            what = "lost the connection to another process (it died: its log says why)"
        else:
            what = f"a collective operation failed ({text.splitlines()[0][:160] if text else type(error).__name__})"
        last = latest_checkpoint(self.output_dir)
        return (f"rank {self.rank} of {self.world}: {what}. Last checkpoint: {last or 'none (set save_every)'}; fix "
                "the cause and train again with --resume")

    def _run(self, until_step: int | None) -> TrainResult:
        state = self._start()
        stop = min(until_step or self.total_steps, self.total_steps)
        while state.step < stop:
            record = self._step(state)
            if self.cfg.eval_every and state.step % self.cfg.eval_every == 0:
                self._evaluate_during(state, record)
            self._log(state, record)
            if self.cfg.save_every and state.step % self.cfg.save_every == 0:
                self._save_checkpoint(state)
            self.accelerator.wait_for_everyone()
        return self._finish(state)

    def _start(self) -> _RunState:
        """Optimizer, scheduler and scaler; calibration and the EWC anchor; on resume, the checkpoint's weights,
        optimizer state and data position. Then the model is prepared for (distributed) training."""
        cfg, acc = self.cfg, self.accelerator
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not trainable:
            raise PeftkitError(f"method {cfg.method!r} left no trainable parameters")
        optimizer = self._optimizer(list(trainable.values()))
        scheduler = self._scheduler(optimizer)
        # fp16 gradients are scaled against underflow (a pass-through in every other precision)
        scaler = torch.amp.GradScaler(acc.device.type, enabled=self.precision.grad_scaler)
        calibrate = get_method(cfg.method).calibrate
        step, epoch, micro = 0, 0, 0
        history: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        if calibrate is not None:  # before resuming too: same batches + untouched base = same selection
            calibrate(self.model, cfg.method_settings(), list(itertools.islice(self._micro_batches(0, 0), 4)))
        ewc = None
        if cfg.ewc_lambda > 0:  # anchored at the start values, so computed before a checkpoint is loaded
            source = self.replay_rows or self.rows
            fisher_rows = source[:cfg.ewc_batches * cfg.batch_size]
            fisher = diagonal_fisher(self.model, trainable, fisher_rows, self.tokenizer.pad_token_id, self.autocast,
                                     self.share_prefix)
            ewc = EWCAnchor.from_fisher(cfg.ewc_lambda, fisher, trainable)
        if self.resume:
            ckpt = latest_checkpoint(self.output_dir)
            if ckpt is None:  # the other processes (the main one checked it when it claimed the folder)
                raise PeftkitError(f"--resume: {self.output_dir} has no checkpoint to resume from")
            self._check_resumed_config(ckpt)  # before loading: a changed r would otherwise fail on shapes
            saved = load_checkpoint(ckpt, trainable, optimizer, scheduler, self.rank)
            step, epoch, micro = saved["step"], saved["epoch"], saved["micro"]
            history = saved.get("history", [])
            best = saved.get("best")
            # the restored schedule keeps its step; lr and the schedule's shape come from this run's config
            scheduler.base_lrs = [cfg.lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
            groups = optimizer.param_groups
            for group, base, value in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                group["initial_lr"], group["lr"] = base, base * value(scheduler.last_epoch)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
            if "grad_scaler" in saved:
                scaler.load_state_dict(saved["grad_scaler"])
            if self.is_main:
                print(f"peftkit: resumed from {ckpt} at step {step}", file=sys.stderr)
        model, optimizer = acc.prepare(self.model, optimizer)
        model.train()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.output_dir / "metrics.jsonl"
        if self.is_main:
            _cut_log(log_path, step)
        peak = self._peak_flops()
        if self.is_main:
            self._write_run_info(peak)
        self.tracking.start(acc, cfg.to_dict())
        return _RunState(
            model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, trainable=trainable, ewc=ewc,
            guard=DivergenceGuard(cfg.skip_bad_steps, self.output_dir, self.precision.name, history),
            batches=self._batches(epoch, micro), step=step, epoch=epoch, micro=micro, history=history, best=best,
            log_path=log_path, peak=peak, progress=_progress(self.total_steps, step, cfg.progress and self.is_main),
            t_start=time.perf_counter())

    def _step(self, state: _RunState) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; the step's metrics record."""
        cfg, acc = self.cfg, self.accelerator
        optimizer, scheduler, scaler, trainable = state.optimizer, state.scheduler, state.scaler, state.trainable
        t0 = time.perf_counter()
        group = [next(state.batches) for _ in range(cfg.grad_accum)]
        state.epoch, state.micro = group[-1][0], group[-1][1] + 1
        n_targets = self._global_sum(sum(int(b["labels"][:, 1:].ne(IGNORE).sum()) for _, _, b in group))
        step_loss, penalty_value, step_flops = 0.0, None, 0.0
        for i, (_, _, batch) in enumerate(group):
            last = i == len(group) - 1
            sync = contextlib.nullcontext() if last else acc.no_sync(state.model)
            with sync, self.autocast():
                loss_sum, _ = sequence_loss(state.model, batch)
                # sum over this micro-batch / targets in the whole step, x world: DDP averages over ranks
                loss = loss_sum * (self.world / max(n_targets, 1))
                if state.ewc is not None and last:  # once per step, on every rank (the DDP average keeps it whole)
                    penalty = state.ewc.penalty(trainable)
                    loss = loss + penalty
                    penalty_value = penalty.item()
                acc.backward(scaler.scale(loss))
            step_loss += loss_sum.item()
            real = int(batch["segment_ids"].ge(0).sum())
            state.tokens += real
            step_flops += self.flops.step(real, int(batch["labels"][:, 1:].ne(IGNORE).sum()),
                                          self.flops.pairs(batch["segment_ids"], batch.get("prefix_lengths")))
        step_loss = self._global_sum_float(step_loss) / max(n_targets, 1)  # the task loss, without the penalty
        scaler.unscale_(optimizer)
        # the norm before clipping (clipping to inf only measures it)
        grad_norm = float(acc.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm or math.inf))
        fault = state.guard.check(state.step + 1, step_loss, grad_norm, scaler.is_enabled())
        if fault == "skip":
            optimizer.zero_grad(set_to_none=True)  # this step's update is dropped: weights and state untouched
        else:
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skipped by the fp16 scaler when a gradient overflowed
            scaler.update()
            if scaler.get_scale() >= scale:  # the scaler lowers its scale exactly when it skipped the step
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not all(bool(torch.isfinite(p).all()) for p in trainable.values()):
                state.guard.stop(state.step + 1, "an update made trainable weights non-finite (the learning rate "
                                                 "is far too high)")
        state.step += 1
        state.target_tokens += n_targets
        state.loss_value = step_loss
        dt = time.perf_counter() - t0
        step_flops = self._global_sum_float(step_flops)
        state.total_flops += step_flops
        flops_per_s = step_flops / dt
        record = {"step": state.step, "loss": round(step_loss, 6), "lr": scheduler.get_last_lr()[0],
                  "grad_norm": round(grad_norm, 4) if math.isfinite(grad_norm) else str(grad_norm),
                  "target_tokens_per_s": round(n_targets / dt, 1), "epoch": state.epoch,
                  "model_flops_per_s": _significant(flops_per_s)}
        if state.peak:
            record["mfu"] = _significant(flops_per_s / (state.peak * self.world))
        if penalty_value is not None:
            record["ewc_penalty"] = round(penalty_value, 6)
        if fault == "skip":
            record["skipped"] = True
        state.history.append({"step": state.step, "loss": step_loss})
        return record

    def _evaluate_during(self, state: _RunState, record: dict[str, Any]) -> None:
        """Eval loss and `eval_metric` scores into the record and the history; the best adapter with `save_best`."""
        t_eval = time.perf_counter()
        state.eval_loss = self.evaluate()
        scores = {"eval_loss": state.eval_loss, **self.evaluate_generation()}
        record.update(scores)
        state.history[-1].update(scores)
        if self.cfg.save_best and state.eval_loss is not None and self.is_main:
            state.best = self._keep_best(state.best, scores, state.step)
        state.eval_seconds += time.perf_counter() - t_eval

    def _log(self, state: _RunState, record: dict[str, Any]) -> None:
        """The record to ``metrics.jsonl`` (every `log_every` steps), the trackers and the progress bar."""
        if self.is_main and state.step % self.cfg.log_every == 0:
            with writing(state.log_path), state.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.tracking.log(record, state.step)
        state.progress.update(1)
        postfix = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['target_tokens_per_s']:.0f}",
                   "GFLOP/s": f"{record['model_flops_per_s'] / 1e9:.0f}"}
        if state.peak:
            postfix["mfu"] = f"{record['mfu']:.0%}"
        state.progress.set_postfix(postfix)

    def _save_checkpoint(self, state: _RunState) -> None:
        """Trainable weights, optimizer, scheduler, every rank's RNG and the data position (main process writes)."""
        weights = trainable_state_dict(self.accelerator.unwrap_model(state.model))
        if not all(bool(torch.isfinite(t).all()) for t in weights.values()):  # never save a broken state
            state.guard.stop(state.step, "trainable weights are non-finite")  # on every rank: the weights are equal
        # every rank's generators (dropout draws differ with each rank's batch shapes), gathered to rank 0
        rng = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        if self.is_main:
            position = {"epoch": state.epoch, "micro": state.micro, "rank": self.rank, "world": self.world,
                        "history": state.history, "config": self.cfg.to_dict(), "best": state.best}
            if state.scaler.is_enabled():
                position["grad_scaler"] = state.scaler.state_dict()
            save_checkpoint(self.output_dir, state.step, weights, state.optimizer, state.scheduler, position,
                            self.cfg.keep_checkpoints, rng)

    def _finish(self, state: _RunState) -> TrainResult:
        """At the end of training: final evaluation, the adapter, the loss plot; then free the optimizer."""
        acc = self.accelerator
        state.progress.close()
        train_seconds = time.perf_counter() - state.t_start - state.eval_seconds
        self.history = state.history
        adapter_dir = None
        if state.step >= self.total_steps:
            state.eval_loss = self.evaluate()
            final = {"eval_loss": state.eval_loss, **self.evaluate_generation()} if state.eval_loss is not None else {}
            self.final_scores = final
            if self.is_main:
                adapter_dir = save_adapter(acc.unwrap_model(state.model), self.output_dir / "adapter")
                _plot_loss(state.history, self.output_dir / "loss.png")
                self.tracking.log({f"final/{k}": v for k, v in final.items()}, state.step)
                self.tracking.log_plot(self.output_dir / "loss.png", state.step)
            acc.wait_for_everyone()
        self.tracking.finish()
        state.optimizer = state.scheduler = state.ewc = None
        acc.free_memory()  # the accelerator's references to the optimizer, then gc
        _trim_host_memory()
        return TrainResult(self.output_dir, adapter_dir, state.step, state.loss_value, state.eval_loss, train_seconds,
                           state.target_tokens, state.tokens, self.params, self.precision.name, state.total_flops,
                           state.peak, self.world)

    RESUME_MAY_CHANGE = frozenset({"lr", "scheduler", "warmup_ratio", "max_steps", "epochs", "eval_data",
                                   "eval_every", "eval_metric", "eval_samples", "eval_max_new_tokens", "save_best",
                                   "save_every", "keep_checkpoints", "log_every", "progress", "skip_bad_steps",
                                   "report_to", "output_dir", "dist_timeout"})
    """Keys a resumed run may change (they then take effect); any other change is refused."""

    def _check_resumed_config(self, ckpt: Path) -> None:
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            saved, world = state.get("config"), state.get("world", self.world)
        except (OSError, ValueError, AttributeError) as e:
            raise PeftkitError(f"checkpoint {ckpt} is unreadable: {e}") from None
        if saved is None:
            return  # a checkpoint without its run's config: nothing to compare
        if world != self.world:
            raise PeftkitError(f"cannot resume {ckpt}: the run had {world} process(es), this one has {self.world} "
                               "(the data order, the batch and each rank's random state depend on it); resume with "
                               f"{world}, or start a new run")
        now = self.cfg.to_dict()
        changed = [k for k in now if k not in self.RESUME_MAY_CHANGE and saved.get(k, now[k]) != now[k]]
        if changed:
            listed = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
            raise PeftkitError(f"cannot resume {ckpt}: the run's settings changed ({listed}). Only "
                               f"{', '.join(sorted(self.RESUME_MAY_CHANGE - {'output_dir'}))} may change on resume; "
                               "start a new run (--overwrite or another output_dir) to change the others")

    def _peak_flops(self) -> float | None:
        """This machine's measured matmul rate in the run's compute dtype (per process; CPU runs only)."""
        if self.accelerator.device.type != "cpu":
            return None
        return matmul_peak(self.precision.compute_dtype)

    def _write_run_info(self, peak: float | None) -> None:
        """``run.json``: the precision the run uses and why, and the hardware it ran on."""
        from peftkit import hardware

        info = {"precision": self.precision.name, "precision_requested": self.precision.requested,
                "precision_reason": self.precision.reason, "hardware": hardware.describe(self.accelerator.device),
                "processes": self.world, "threads": torch.get_num_threads(),
                "matmul_peak_flops_per_s": None if peak is None else _significant(peak),
                "model_flops": dataclasses.asdict(self.flops)}
        with writing(self.output_dir / "run.json"):
            (self.output_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    def _global_sum_float(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())


def _is_distributed_failure(error: BaseException) -> bool:
    """A collective operation that failed because another process died, hung past the timeout or lost its link."""
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(error)
    return any(word in text for word in ("gloo", "NCCL", "Timed out", "Connection reset", "Connection closed"))


def _cut_log(path: Path, step: int) -> None:
    """Keep the rows of steps up to `step` (a resumed run redoes the later ones; a row cut short by a kill goes)."""
    kept = []
    if step and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))  # a full disk then keeps the old log whole


def _significant(x: float) -> float:
    return float(f"{x:.4g}")


def _trim_host_memory() -> None:
    """Hand freed heap pages back to the OS.

    glibc keeps what training freed, and later allocations (generation after training) then grow the process
    instead of reusing it: +0.6 GB of peak RSS measured on the bundled model, none after trimming.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def _plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, label="train loss")
    evals = [h for h in history if h.get("eval_loss") is not None]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", lw=1, ms=3, label="eval loss")
        ax.legend(loc="upper left")
        names = sorted({k for h in evals for k in h} - {"step", "loss", "eval_loss"})
        if names:  # generation metrics (eval_metric) on their own axis
            right = ax.twinx()
            for i, name in enumerate(names):
                points = [h for h in evals if h.get(name) is not None]
                right.plot([h["step"] for h in points], [h[name] for h in points], "s--", lw=1, ms=3,
                           color=f"C{i + 2}", label=name.removeprefix("eval_"))  # C0, C1: the losses
            right.set_ylabel("eval metric")
            right.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (target tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with writing(path):
            fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)

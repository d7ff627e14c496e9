"""The data pipeline of a training run: read, tokenize, hold out, pack into rows, and deal micro-batches.

`TrainData` is built once per run. Its micro-batches depend only on the recipe, the epoch, the position in it and
the process's rank, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from peftkit.core.context import TrainingContext
from peftkit.data.formats import Conversation, ReadStats, check_source, read_conversations
from peftkit.data.sequences import (
    Example,
    TokenizeStats,
    collate,
    is_template_text,
    make_rows,
    template_text,
    tokenize_conversations,
)
from peftkit.errors import PeftkitError
from peftkit.train.config import TrainConfig
from peftkit.train.packed_attention import packing_problem

__all__ = ["DataSummary", "TrainData", "replay_rows_per_batch", "with_prompt"]

Batch = dict[str, torch.Tensor]


def replay_rows_per_batch(batch_size: int, fraction: float) -> int:
    """Replay rows to add to `batch_size` task rows so that they are `fraction` of the micro-batch.

    ``n / (batch_size + n) = fraction``, rounded to the nearest row, at least one when ``fraction > 0``
    (e.g. batch 8: fraction 0.2 -> 2 rows, 0.25 -> 3 rows (27%), 0.5 -> 8 rows).
    """
    if fraction <= 0:
        return 0
    return max(1, round(batch_size * fraction / (1.0 - fraction)))


@dataclasses.dataclass(frozen=True)
class DataSummary:
    """What the training data came to, before the run starts (the CLI prints it)."""

    examples: int
    target_tokens: int
    prompt_tokens: int
    truncated: int
    dropped: int
    bad_rows_skipped: int
    skipped_reasons: tuple[str, ...]
    rows: int
    total_steps: int


class TrainData:
    """Training rows, held-out examples and replay rows of one run, and its micro-batches.

    Args:
        cfg: the run's configuration.
        tokenizer: the model's tokenizer.
        model: the adapted model (asked whether packed rows would give each example its own result).
        world, rank: processes in the run and this one's index (each takes its share of every micro-batch).
        log: whether this process reports (the main one).
    """

    def __init__(self, cfg: TrainConfig, tokenizer: Any, model: torch.nn.Module, world: int = 1, rank: int = 0,
                 log: bool = True) -> None:
        if not cfg.data:
            raise PeftkitError("no training data: set data to a JSON, JSONL, CSV or Parquet file, a folder or a "
                               "Hub dataset id")
        self.cfg, self.tokenizer, self.world, self.rank = cfg, tokenizer, world, rank
        convs, self.read_stats = _read(cfg, cfg.data)
        order = list(range(len(convs)))  # shuffled; with eval_fraction, the first ones are held out
        random.Random(cfg.seed).shuffle(order)
        n_eval = 0 if cfg.eval_data else int(len(convs) * cfg.eval_fraction)
        held_out, train = order[:n_eval], order[n_eval:]
        self.tok_stats = TokenizeStats()
        examples = _tokenize(cfg, tokenizer, [convs[i] for i in train], self.tok_stats,
                             lambda j: self.read_stats.where(train[j]))
        _check_some_left(examples, self.tok_stats, cfg, cfg.data)
        where: Callable[[int], str]
        if cfg.eval_data:
            self.eval_conversations, eval_stats = _read(cfg, cfg.eval_data)
            where = eval_stats.where
        else:
            self.eval_conversations = [convs[i] for i in held_out]
            where = lambda j: self.read_stats.where(held_out[j])  # noqa: E731
        self.eval_examples = _tokenize(cfg, tokenizer, self.eval_conversations, TokenizeStats(), where)
        self.packing = cfg.packing
        if cfg.packing and (problem := packing_problem(model)):  # train unpacked rather than wrong
            if log:
                print(f"peftkit: packing off: {problem}", file=sys.stderr)
            self.packing = False
        self.share_prefix = self.packing and cfg.share_prefix
        self.rows = make_rows(examples, cfg.max_length, self.packing, self.share_prefix)
        self.replay_rows = self._replay_rows()
        self.replay_per_batch = replay_rows_per_batch(cfg.batch_size, cfg.replay_fraction)
        self.micro_per_epoch = len(self.rows) // (cfg.batch_size * world)
        self._check_one_step()
        self.steps_per_epoch = self.micro_per_epoch // cfg.grad_accum
        self.seen_rows: list[int] = []  # row indices this process trained on, in order
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))

    def _replay_rows(self) -> list[list[Example]]:
        """Replay (against forgetting): general rows mixed into every micro-batch, on top of the task rows."""
        cfg = self.cfg
        if not cfg.replay_data:
            return []
        replay, replay_stats = _read(cfg, cfg.replay_data)
        replay_examples = _tokenize(cfg, self.tokenizer, replay, TokenizeStats(), replay_stats.where)
        random.Random(cfg.seed + 1).shuffle(replay_examples)
        return make_rows(replay_examples, cfg.max_length, self.packing, self.share_prefix)

    def _check_one_step(self) -> None:
        cfg = self.cfg
        if self.micro_per_epoch >= cfg.grad_accum:
            return
        rows_per_step = cfg.batch_size * cfg.grad_accum * self.world
        dropped = self.tok_stats.dropped
        why = (f" ({dropped} examples were dropped as longer than max_length={cfg.max_length} tokens: raise "
               "max_length to keep them)") if dropped else ""
        raise PeftkitError(f"{len(self.rows)} training rows cannot fill one step of {rows_per_step} rows "
                           f"(batch_size x grad_accum x processes); lower batch_size or grad_accum{why}")

    def summary(self) -> DataSummary:
        s = self.tok_stats
        return DataSummary(s.examples, s.target_tokens, s.prompt_tokens, s.truncated, s.dropped,
                           self.read_stats.skipped + s.rejected, tuple(self.read_stats.reasons), len(self.rows),
                           self.total_steps)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def micro_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        """This process's micro-batches of `epoch`, after skipping `skip` (resume)."""
        cfg = self.cfg
        order = list(range(len(self.rows)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        per_micro = cfg.batch_size * self.world
        for m in range(skip, self.micro_per_epoch):
            chunk = order[m * per_micro:(m + 1) * per_micro]
            mine = chunk[self.rank * cfg.batch_size:(self.rank + 1) * cfg.batch_size]
            self.seen_rows.extend(mine)
            rows = [self.rows[i] for i in mine] + self.replay_for(epoch * self.micro_per_epoch + m)
            yield self.collate(rows)

    def collate(self, rows: list[list[Example]]) -> Batch:
        """One micro-batch of `rows` (`peftkit.data.sequences.collate`)."""
        return collate(rows, pad_id=self.pad_id, share_prefix=self.share_prefix)

    def replay_for(self, micro: int) -> list[list[Example]]:
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

    def batches(self, epoch: int, micro: int) -> Iterator[tuple[int, int, Batch]]:
        """(epoch, micro-batch index, batch) forever, starting at a data position."""
        while True:
            for batch in self.micro_batches(epoch, micro):
                yield epoch, micro, batch
                micro += 1
            epoch, micro = epoch + 1, 0

    def eval_rows(self) -> list[list[Example]]:
        return make_rows(self.eval_examples, self.cfg.max_length, self.packing, self.share_prefix)


def check_data(cfg: TrainConfig) -> None:
    """Every data source of `cfg` exists and is readable: run before the model loads, so that a wrong path fails
    at once, not after the model has loaded (`peftkit.data.formats.check_source`)."""
    for key in ("data", "eval_data", "replay_data"):
        value = getattr(cfg, key)
        if value:
            try:
                check_source(value)
            except PeftkitError as e:
                raise PeftkitError(f"{key}: {e} (a recipe's relative paths are read from the recipe's folder, "
                                   "then from the current directory)") from None


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


def with_prompt(context: TrainingContext, cfg: TrainConfig, tokenizer, stats: ReadStats) -> TrainingContext:
    """The context completed with what the training data looked like: chat template, system message,
    shared instruction."""
    name: str | None
    if cfg.template in (None, "", "model"):
        name = "model"  # the tokenizer's own
    else:
        name = None if is_template_text(cfg.template) else cfg.template  # None: given as Jinja text
    text = template_text(tokenizer, cfg.template)  # a tokenizer may hold a dict of templates: not recorded then
    return dataclasses.replace(context, template=name, template_text=text if isinstance(text, str) else None,
                               system=stats.system, instruction=stats.instruction)

"""Preference data: rows of a prompt, a chosen and a rejected answer, as TRL reads them.

Two layouts (TRL's), each row one of them:

* standard: ``prompt``, ``chosen`` and ``rejected`` are strings; the prompt becomes one user message and each answer
  one assistant message;
* conversational: ``prompt`` is a list of messages (``{"role", "content"}``; it may end with earlier assistant
  turns), ``chosen`` and ``rejected`` are lists of assistant messages. Without a ``prompt`` key (TRL's implicit
  prompt), ``chosen`` and ``rejected`` are whole conversations and the prompt is the messages they begin with in
  common.

Rows come from every source instruction data comes from (`peftkit.data.formats.iter_rows`: JSON, JSONL, CSV,
Parquet, folders, Hub datasets), bad rows named by file and line. A pair is rendered with the chat template as an
SFT row is (`peftkit.data.sequences`): both sequences begin with the same prompt tokens, and only the answer's
tokens (to its end-of-turn token) are targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from peftkit.data.formats import Conversation, ReadStats, parse_rows
from peftkit.data.sequences import IGNORE, Example, TokenizeStats, collate, conversation_tokens, resolve_template
from peftkit.errors import PeftkitError

__all__ = ["PreferencePair", "PreferenceRow", "collate_pairs", "read_pairs", "row_to_pair", "tokenize_pairs"]

_KEYS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    """One preference row as messages: the prompt, and the answers (assistant messages) that follow it."""

    prompt: Conversation
    chosen: Conversation
    rejected: Conversation


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A tokenized pair: two examples that begin with the same `prompt_length` prompt tokens."""

    chosen: Example
    rejected: Example
    prompt_length: int

    def row(self) -> list[Example]:
        """``[chosen, rejected]``: the row `collate_pairs` packs."""
        return [self.chosen, self.rejected]

    def __post_init__(self) -> None:
        p = self.prompt_length
        if self.chosen.input_ids[:p] != self.rejected.input_ids[:p]:  # the template rendered the prompt twice
            raise PeftkitError("the chat template renders the prompt differently before the two answers")


def _messages(value: Any, key: str, roles: tuple[str, ...]) -> Conversation:
    if not isinstance(value, list) or not value:
        raise TypeError(f"{key!r} must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
            raise TypeError(f"{key}[{i}] is not a message with a string 'content'")
        if m.get("role") not in roles:
            raise ValueError(f"{key}[{i}]: role {m.get('role')!r} not allowed here (allowed: {', '.join(roles)})")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def _split_implicit(chosen: Conversation, rejected: Conversation) -> PreferenceRow:
    """TRL's implicit prompt: the messages both conversations begin with; the rest are the answers."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ValueError("'chosen' and 'rejected' share no leading messages and there is no 'prompt'")
    return PreferenceRow(chosen[:n], chosen[n:], rejected[n:])


def row_to_pair(row: Any) -> PreferenceRow:
    """One row (standard or conversational layout) as messages; KeyError / TypeError / ValueError name the key."""
    if not isinstance(row, Mapping):
        raise TypeError(f"row is a {type(row).__name__}, not an object")
    missing = [k for k in _KEYS[1:] if row.get(k) is None]
    if missing:
        raise KeyError(f"missing key {missing[0]!r} (a preference row has prompt, chosen, rejected; fields present: "
                       f"{', '.join(map(str, row))})")
    prompt = row.get("prompt")
    if prompt is None and all(isinstance(row[k], list) for k in _KEYS[1:]):
        roles = ("system", "user", "assistant")
        return _split_implicit(_messages(row["chosen"], "chosen", roles), _messages(row["rejected"], "rejected", roles))
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty 'prompt'")
        for key in _KEYS[1:]:
            if not isinstance(row[key], str):
                raise TypeError(f"{key!r} is a {type(row[key]).__name__}; with a string prompt it must be a string")
        return PreferenceRow([{"role": "user", "content": prompt}], [{"role": "assistant", "content": row["chosen"]}],
                             [{"role": "assistant", "content": row["rejected"]}])
    if prompt is None:
        raise KeyError("missing key 'prompt' (needed unless chosen and rejected are whole conversations)")
    messages = _messages(prompt, "prompt", ("system", "user", "assistant"))
    if messages[-1]["role"] == "assistant":
        raise ValueError("'prompt' ends with an assistant message: the answer to prefer goes in 'chosen'")
    return PreferenceRow(messages, _messages(row["chosen"], "chosen", ("assistant",)),
                         _messages(row["rejected"], "rejected", ("assistant",)))


def read_pairs(source: str | Path | Any, skip_bad_rows: bool = False, stats: ReadStats | None = None,
               limit: int | None = None) -> list[PreferenceRow]:
    """Read a data source of preference rows (see the module notes).

    A bad row is an error naming the source, the row (a JSONL file's line) and the key, or, with `skip_bad_rows`,
    skipped and counted in `stats` (whose `where` names the kept rows for later errors).
    """
    return parse_rows(source, row_to_pair, skip_bad_rows, stats, limit, "preference rows")


def _fit(example: Example, max_length: int) -> Example:
    return Example(example.input_ids[:max_length], example.labels[:max_length])


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[PreferenceRow],
    max_length: int,
    template: str | None = None,
    overlong: str = "truncate",
    stats: TokenizeStats | None = None,
    where: Callable[[int], str] | None = None,
) -> list[PreferencePair]:
    """Tokenize preference rows: ``prompt + chosen`` and ``prompt + rejected`` rendered as SFT conversations, the
    targets only the answers' tokens (an assistant turn inside the prompt is context).

    A sequence longer than `max_length` is cut at its end (``overlong="truncate"``, TRL's ``keep_start``) or the pair
    dropped (``"drop"``); a pair whose answer lost every token is dropped either way (counted in `stats`).
    """
    tmpl = resolve_template(tokenizer, template)
    stats = stats if stats is not None else TokenizeStats()
    where = where or (lambda i: f"pair {i + 1}")
    out = []
    for n, row in enumerate(rows):
        try:
            chosen, rejected = (Example(*conversation_tokens(tokenizer, row.prompt + answer, tmpl, len(row.prompt)))
                                for answer in (row.chosen, row.rejected))
            prompt_length = next(i for i, label in enumerate(chosen.labels) if label != IGNORE)
            pair = PreferencePair(chosen, rejected, prompt_length)
        except TemplateError as e:
            raise PeftkitError(f"{where(n)}: the chat template rejects this pair: {e}") from None
        except (PeftkitError, StopIteration) as e:
            raise PeftkitError(f"{where(n)}: {e or 'the chosen answer has no tokens'}") from None
        longest = max(len(chosen.input_ids), len(rejected.input_ids))
        if longest > max_length:
            if overlong == "drop" or prompt_length >= max_length:
                stats.drop(longest if overlong == "drop" else prompt_length)
                continue
            stats.truncated += 1
            pair = PreferencePair(_fit(chosen, max_length), _fit(rejected, max_length), prompt_length)
        if pair.rejected.num_targets == 0:
            stats.drop(prompt_length)
            continue
        stats.examples += 1
        stats.target_tokens += pair.chosen.num_targets + pair.rejected.num_targets
        stats.prompt_tokens += prompt_length
        out.append(pair)
    return out


def collate_pairs(pairs: Sequence[Sequence[Example]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """A batch of pairs, each ``[chosen, rejected]`` (`PreferencePair.row`): `peftkit.data.sequences.collate`'s keys
    and ``sequence_ids``: for every token, ``2 p`` in pair p's chosen sequence, ``2 p + 1`` in its rejected one, -1
    in the shared prompt and padding.

    Packed: one row per pair, its prompt stored once (the shared prefix: both sequences begin with the prompt's
    tokens) and both answers attending to it, each at its own positions. Unpacked (for a model packed rows cannot
    run): two rows per pair, chosen then rejected.
    """
    if not packed:
        batch = collate([[e] for pair in pairs for e in pair], pad_id=pad_id)
        rows = torch.arange(len(pairs) * 2)[:, None].expand_as(batch["segment_ids"])
        batch["sequence_ids"] = torch.where(batch["segment_ids"] >= 0, rows, -1)
        return batch
    batch = collate(pairs, pad_id=pad_id, share_prefix=True)
    segment = batch["segment_ids"]
    prefix = batch.get("prefix_lengths", torch.zeros(len(pairs), dtype=torch.long))
    choice = segment - (prefix > 0).long()[:, None]  # 0: chosen, 1: rejected (the shared prompt: -1)
    first = 2 * torch.arange(len(pairs))[:, None]
    batch["sequence_ids"] = torch.where((segment >= 0) & (choice >= 0), first + choice, -1)
    return batch

"""From conversations to training batches: chat template, loss mask, truncation, packing or padding.

The loss covers only the assistant tokens. Each conversation is rendered with the model's chat template (or a
named one) and cut into segments at the turn boundaries: the text up to and including the generation prompt is
the prompt (label -100), the rest of the turn up to the end-of-turn token is the target. Segments are
tokenized separately, so a prompt is tokenized exactly as it is at inference time.

Packing puts several examples in one row; each keeps its own positions (restarting at 0) and a block-diagonal
causal mask so that no token attends across examples. Padding puts one example per row.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from peftkit.data.formats import Conversation
from peftkit.errors import PeftkitError

__all__ = [
    "TEMPLATES",
    "Example",
    "TokenizeStats",
    "collate",
    "make_rows",
    "prompt_text",
    "tokenize_conversations",
]

IGNORE = -100

# Named templates for models without one (Jinja, as Hugging Face chat templates).
TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclasses.dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    prompt_tokens: int = 0
    target_tokens: int = 0


def _template(tokenizer: PreTrainedTokenizerBase, template: str | None) -> str | None:
    if template in (None, "", "model"):
        if not tokenizer.chat_template:
            raise PeftkitError(
                "the tokenizer has no chat template; set template to one of: " + ", ".join(TEMPLATES)
            )
        return None
    if template not in TEMPLATES:
        raise PeftkitError(f"unknown template {template!r}; known: model, {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def _render(tokenizer, messages: Conversation, template: str | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def prompt_text(tokenizer: PreTrainedTokenizerBase, messages: Conversation, template: str | None = None) -> str:
    """The text a model sees before its answer (chat template + generation prompt)."""
    return _render(tokenizer, messages, _template(tokenizer, template), True)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Conversation],
    max_length: int,
    template: str | None = None,
    overlong: str = "truncate",
    stats: TokenizeStats | None = None,
) -> list[Example]:
    """Tokenize conversations with the loss on assistant turns only.

    Args:
        overlong: ``"truncate"`` (cut at `max_length`) or ``"drop"`` examples longer than `max_length`.
    """
    if overlong not in ("truncate", "drop"):
        raise PeftkitError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    tmpl = _template(tokenizer, template)
    stats = stats if stats is not None else TokenizeStats()
    out = []
    for conv in conversations:
        ids: list[int] = []
        labels: list[int] = []
        done = ""
        for i, message in enumerate(conv):
            if message["role"] != "assistant":
                continue
            prefix = _render(tokenizer, conv[:i], tmpl, True)
            full = _render(tokenizer, conv[: i + 1], tmpl, False)
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise PeftkitError("the chat template does not render conversations as growing prefixes")
            prompt_ids, answer_ids = _encode(tokenizer, prefix[len(done):]), _encode(tokenizer, full[len(prefix):])
            ids += prompt_ids + answer_ids
            labels += [IGNORE] * len(prompt_ids) + answer_ids
            done = full
        if len(ids) > max_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        example = Example(ids, labels)
        if example.num_targets == 0:  # truncation ate the answer: nothing to learn from
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.target_tokens += example.num_targets
        stats.prompt_tokens += len(ids) - example.num_targets
        out.append(example)
    return out


def make_rows(examples: Sequence[Example], max_length: int, packing: bool) -> list[list[Example]]:
    """Group examples into rows: greedy in order when packing (up to `max_length` tokens), else one per row."""
    if not packing:
        return [[e] for e in examples]
    rows: list[list[Example]] = []
    current: list[Example] = []
    used = 0
    for e in examples:
        if current and used + len(e.input_ids) > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(e)
        used += len(e.input_ids)
    if current:
        rows.append(current)
    return rows


def collate(rows: Sequence[Sequence[Example]], pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Build a batch: input_ids, labels, position_ids, segment_ids and the attention mask.

    One example per row gives a 2D padding mask; packed rows give a 4D block-diagonal causal mask
    (batch, 1, seq, seq) so that examples in a row never see each other. ``segment_ids`` numbers the examples of
    each row (-1 = padding); `sequence_loss` turns it into example boundaries for packed attention.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s, e in enumerate(row):
            end = start + len(e.input_ids)
            input_ids[r, start:end] = torch.tensor(e.input_ids)
            labels[r, start:end] = torch.tensor(e.labels)
            position_ids[r, start:end] = torch.arange(end - start)
            segment[r, start:end] = s
            start = end
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                             "segment_ids": segment}
    if any(len(row) > 1 for row in rows):
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
        mask = same & causal
        mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves: no all-masked softmax
        batch["attention_mask"] = mask[:, None]
    else:
        batch["attention_mask"] = (segment >= 0).long()
    return batch


def iterate_rows(rows: Sequence[list[Example]], seed: int, epoch: int, shuffle: bool = True) -> Iterator[list[Example]]:
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    for i in order:
        yield rows[i]

"""From conversations to training batches: chat template, loss mask, truncation, packing or padding.

The loss covers only the assistant tokens, of every assistant turn. Each conversation is rendered with the
model's chat template (or a named one) and cut into segments at the turn boundaries: the text up to and including
the generation prompt is the prompt (label -100), the rest of the turn up to and including the end-of-turn token is
the target. Segments are tokenized separately, so a prompt is tokenized exactly as it is at inference time; the
whitespace after an end-of-turn token goes with the next prompt, so that on the shipped templates the segments
together are exactly the tokens of the whole rendered conversation.

Packing puts several examples in one row; each keeps its own positions (restarting at 0) and a block-diagonal
causal mask so that no token attends across examples. Padding puts one example per row.

Shared prefixes: instruction data usually starts every example with the same tokens (system prompt, instruction).
With ``share_prefix``, a packed row stores the tokens that all its examples begin with once, at its start, and
every example attends to that copy and then to itself, at the positions it would have alone. The forward pass is
the same function of each example as without sharing (causal attention: the prefix's hidden states do not depend
on what follows it), and the gradient is the same sum, so the loss and the gradients are unchanged while the
prefix is computed once per row instead of once per example (the demo task: 109 tokens per example, of which 50
are shared; `shared_prefix` says which tokens qualify).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from peftkit.data.formats import Conversation
from peftkit.errors import PeftkitError

__all__ = [
    "TEMPLATES",
    "Example",
    "TokenizeStats",
    "collate",
    "conversation_tokens",
    "is_template_text",
    "make_rows",
    "prompt_text",
    "resolve_template",
    "row_length",
    "shared_prefix",
    "template_text",
    "tokenize_conversations",
    "turn_end",
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
    """What tokenizing did. `dropped` examples were longer than `max_length` (``overlong="drop"``) or lost every
    answer token to truncation; `shortest_dropped` is the length in tokens of the shortest of them (with
    truncation: of its prompt, the part that did not fit)."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    prompt_tokens: int = 0
    target_tokens: int = 0
    rejected: int = 0
    shortest_dropped: int | None = None

    def drop(self, length: int) -> None:
        self.dropped += 1
        self.shortest_dropped = length if self.shortest_dropped is None else min(self.shortest_dropped, length)


def is_template_text(template: str) -> bool:
    """Whether `template` is a Jinja chat template itself rather than a template's name."""
    return "{{" in template or "{%" in template


def _template(tokenizer: PreTrainedTokenizerBase, template: str | None) -> str | None:
    """The Jinja text to render with: None for the tokenizer's own, a named template's text, or `template` itself
    when it is a Jinja text (an adapter's recorded template)."""
    if template is not None and is_template_text(template):
        return template
    if template in (None, "", "model"):
        if not tokenizer.chat_template:
            raise PeftkitError(
                "the tokenizer has no chat template; set template to one of: " + ", ".join(TEMPLATES)
            )
        return None
    if template not in TEMPLATES:
        raise PeftkitError(f"unknown template {template!r}; known: model, {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def template_text(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> str | None:
    """The Jinja text that conversations are rendered with: `template` (a name or a text), else the tokenizer's own
    (which may be a dict of several templates, or None)."""
    return _template(tokenizer, template) or tokenizer.chat_template


def _render(tokenizer, messages: Conversation, template: str | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def prompt_text(tokenizer: PreTrainedTokenizerBase, messages: Conversation, template: str | None = None) -> str:
    """The text a model sees before its answer (chat template + generation prompt)."""
    return _render(tokenizer, messages, _template(tokenizer, template), True)


def turn_end(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> str:
    """The text the chat template puts after an assistant's answer (chatml's ``<|im_end|>``, alpaca's EOS),
    whitespace stripped; "" when it puts none. It need not be one token: chatml on a tokenizer without ChatML
    tokens spells ``<|im_end|>`` in several."""
    answer = "\x1fanswer\x1f"  # a unit separator no template writes
    conv = [{"role": "user", "content": "question"}, {"role": "assistant", "content": answer}]
    text = _render(tokenizer, conv, _template(tokenizer, template), False)
    return text[text.rindex(answer) + len(answer):].strip() if answer in text else ""


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Conversation],
    max_length: int,
    template: str | None = None,
    overlong: str = "truncate",
    stats: TokenizeStats | None = None,
    where: Callable[[int], str] | None = None,
    skip_rejected: bool = False,
) -> list[Example]:
    """Tokenize conversations with the loss on every assistant turn and on nothing else.

    A turn's target is its rendering up to the template's end-of-turn token; the whitespace the template puts
    after it (chatml's newline) belongs to the next prompt, so that the concatenated segments tokenize exactly as
    the whole rendered conversation does (``apply_chat_template(messages, tokenize=True)``) while each prompt
    still tokenizes as it does alone at inference time. (The one difference: an answer that opens with
    whitespace the tokenizer would merge with the prompt's last token; the prompt keeps its inference tokens.)
    Turns after the last assistant turn carry no target and are left out.

    Args:
        overlong: ``"truncate"`` (cut at `max_length`) or ``"drop"`` examples longer than `max_length`.
        where: names conversation ``i`` in errors (`ReadStats.where`: ``"data.jsonl: row 7"``).
        skip_rejected: a conversation the chat template rejects (e.g. two user turns in a row where the template
            requires alternation) is skipped and counted in ``stats.rejected`` instead of being an error.
    """
    if overlong not in ("truncate", "drop"):
        raise PeftkitError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    tmpl = _template(tokenizer, template)
    stats = stats if stats is not None else TokenizeStats()
    where = where or (lambda i: f"conversation {i + 1}")
    out = []
    for n, conv in enumerate(conversations):
        try:
            ids, labels = _segments(tokenizer, conv, tmpl)
        except TemplateError as e:
            if not skip_rejected:
                raise PeftkitError(f"{where(n)}: the chat template rejects this conversation: {e}") from None
            stats.rejected += 1
            continue
        except PeftkitError as e:
            raise PeftkitError(f"{where(n)}: {e}") from None
        full_labels = labels
        if len(ids) > max_length:
            if overlong == "drop":
                stats.drop(len(ids))
                continue
            stats.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        example = Example(ids, labels)
        if example.num_targets == 0:  # truncation ate the answer: nothing to learn from (counted by its prompt)
            stats.drop(next((i for i, label in enumerate(full_labels) if label != IGNORE), len(full_labels)))
            continue
        stats.examples += 1
        stats.target_tokens += example.num_targets
        stats.prompt_tokens += len(ids) - example.num_targets
        out.append(example)
    return out


def resolve_template(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> str | None:
    """The Jinja text to render with (None: the tokenizer's own); an unknown name or a missing template is an
    error naming the choices."""
    return _template(tokenizer, template)


def conversation_tokens(tokenizer: PreTrainedTokenizerBase, conv: Conversation, tmpl: str | None,
                        first_target: int = 0) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation rendered with `tmpl` (`resolve_template`), exactly as SFT rows are;
    assistant turns before message `first_target` are context (label -100), as in a preference row's prompt."""
    return _segments(tokenizer, conv, tmpl, first_target)


def _segments(tokenizer, conv: Conversation, tmpl: str | None, first_target: int = 0) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: prompt segments (label -100) and assistant targets (from message
    `first_target` on)."""
    ids: list[int] = []
    labels: list[int] = []
    done = full = ""  # `done`: the rendered text tokenized so far
    for i, message in enumerate(conv):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, conv[:i], tmpl, True)
        full = _render(tokenizer, conv[: i + 1], tmpl, False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise PeftkitError("the chat template does not render conversations as growing prefixes")
        answer = full[len(prefix):]
        answer = answer[: len(answer.rstrip())]
        prompt_ids, answer_ids = _encode(tokenizer, prefix[len(done):]), _encode(tokenizer, answer)
        ids += prompt_ids + answer_ids
        labels += [IGNORE] * len(prompt_ids) + (answer_ids if i >= first_target else [IGNORE] * len(answer_ids))
        done = prefix + answer
    tail = _encode(tokenizer, full[len(done):])  # the whitespace after the last end-of-turn
    return ids + tail, labels + [IGNORE] * len(tail)


def _prefix_cap(e: Example) -> int:
    """How many leading tokens of `e` may be shared: prompt tokens only, and the token after the prefix must be a
    prompt token too (in a packed row the prefix's last position predicts the first example's next token only)."""
    first_target = next((i for i, label in enumerate(e.labels) if label != IGNORE), len(e.labels))
    return max(0, min(len(e.input_ids), first_target) - 1)


def _common(a: Example, b: Example, cap: int) -> int:
    n, cap = 0, min(cap, _prefix_cap(b))
    while n < cap and a.input_ids[n] == b.input_ids[n]:
        n += 1
    return n


def shared_prefix(row: Sequence[Example]) -> int:
    """Length of the prefix that every example of a packed row shares (0 for a single example): the longest
    common run of leading tokens, within every example's `_prefix_cap`."""
    if len(row) < 2:
        return 0
    cap = _prefix_cap(row[0])
    for e in row[1:]:
        cap = _common(row[0], e, cap)
    return cap


def row_length(row: Sequence[Example]) -> int:
    """Tokens a row takes (its shared prefix once)."""
    p = shared_prefix(row)
    return p + sum(len(e.input_ids) - p for e in row)


def make_rows(examples: Sequence[Example], max_length: int, packing: bool,
              share_prefix: bool = False) -> list[list[Example]]:
    """Group examples into rows: greedy in order when packing (up to `max_length` tokens), else one per row.

    With `share_prefix`, a row's common prefix counts once (see the module notes), so more examples fit.
    """
    if not packing:
        return [[e] for e in examples]
    rows: list[list[Example]] = []
    current: list[Example] = []
    used = prefix = 0
    for e in examples:
        if current:
            p = _common(current[0], e, prefix if len(current) > 1 else _prefix_cap(current[0])) if share_prefix else 0
            total = used + len(e.input_ids)  # every example in full
            if total - p * len(current) <= max_length:  # the prefix stored once instead of len(current) + 1 times
                current.append(e)
                used, prefix = total, p
                continue
            rows.append(current)
        current, used, prefix = [e], len(e.input_ids), 0
    if current:
        rows.append(current)
    return rows


def collate(rows: Sequence[Sequence[Example]], pad_id: int, pad_to_multiple: int = 8,
            share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """Build a batch: input_ids, labels, position_ids, segment_ids and the attention mask.

    One example per row gives a 2D padding mask; packed rows give a 4D block-diagonal causal mask
    (batch, 1, seq, seq) so that examples in a row never see each other. ``segment_ids`` numbers the examples of
    each row (-1 = padding); `sequence_loss` turns it into example boundaries for packed attention. With
    `share_prefix`, a row's shared prefix comes first as segment 0 (``prefix_lengths`` per row), each example
    after it holds only its own tokens at its own positions, and the mask lets every example see the prefix.
    """
    prefixes = [shared_prefix(row) if share_prefix else 0 for row in rows]
    width = max(p + sum(len(e.input_ids) - p for e in row) for p, row in zip(prefixes, rows, strict=True))
    width = -(-width // pad_to_multiple) * pad_to_multiple
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)
    for r, (p, row) in enumerate(zip(prefixes, rows, strict=True)):
        pieces = [(row[0].input_ids[:p], row[0].labels[:p], 0)] if p else []
        pieces += [(e.input_ids[p:], e.labels[p:], p) for e in row]
        start = 0
        for s, (ids, labs, first) in enumerate(pieces):
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start:end] = torch.tensor(labs)
            position_ids[r, start:end] = torch.arange(first, first + end - start)
            segment[r, start:end] = s
            start = end
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                             "segment_ids": segment}
    if any(len(row) > 1 for row in rows):
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
        prefix = torch.tensor(prefixes)
        if prefix.any():
            batch["prefix_lengths"] = prefix
            same |= (torch.arange(width)[None, None, :] < prefix[:, None, None]) & (segment[:, :, None] >= 0)
        mask = same & causal
        mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves: no all-masked softmax
        batch["attention_mask"] = mask[:, None]
    else:
        batch["attention_mask"] = (segment >= 0).long()
    return batch

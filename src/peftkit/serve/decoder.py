"""From logits to text: the next token of every row (`sample`), and each request's answer as text (`TextStream`).

Text is decoded incrementally (`IncrementalDetokenizer`, the scheme of vLLM's ``detokenize_incrementally``): each
new token costs one decode of a short window of tokens, not of the whole answer (which made a long answer
quadratic). A token that ends inside a character (byte-level BPE splits a multi-byte character over tokens,
SentencePiece's byte-fallback tokens ``<0xE2>``) decodes to a trailing U+FFFD; such text is held back until the
character completes. The window starts one committed stretch back, so the text added is the text the whole answer
decodes to there (SentencePiece drops the space of a window's first token: both sides of the window drop it alike).

Note:
    The streamed text equals ``tokenizer.decode(tokens, skip_special_tokens=True)`` when decoding is
    prefix-stable (the text of some tokens starts the text of more), as it is for byte-level BPE, SentencePiece
    and their byte fallback on valid UTF-8. Two cases are not: WordPiece's ``clean_up_tokenization_spaces``
    (``do n`` + ``'t`` -> ``don't``; transformers 5 leaves it off for the tokenizers causal models use), and
    byte-fallback tokens that never form a character: ``ByteFallback`` turns the whole run of byte tokens into
    U+FFFD then, including characters of that run already sent. Each new token costs O(window) decoding, plus
    appending to the answer's text.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from peftkit.serve.request import Generation

__all__ = ["IncrementalDetokenizer", "TextStream", "sample"]

_PARTIAL = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


class IncrementalDetokenizer:
    """Token ids in, text out, decoding only a short window per token.

    After every `push`, ``text + pending`` is the decode of all the tokens pushed: `text` is final (it only grows),
    `pending` the text of the last tokens, which may still change (it ends inside a character).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self.pending = ""
        self._prefix = 0  # the window starts here: the tokens before `_read`, decoded again for context
        self._read = 0  # tokens before this one are in `text`
        self._prefix_text = ""  # the decode of ids[_prefix:_read]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(self._prefix_text) and not window.endswith(_PARTIAL):
            self.text += window[len(self._prefix_text):]
            self.pending = ""
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self._decode(self.ids[self._prefix:self._read])
        else:
            self.pending = window[len(self._prefix_text):]


class TextStream:
    """One request's answer as text: tokens in, the deltas its client may see out, ended by a stop string.

    A delta never ends inside a character, nor with text that could be the start of a stop string; `rest` gives
    what was held back when the request finishes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...] = ()) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = stops
        self._overlap = max((len(s) for s in stops), default=1) - 1  # a stop may start this far back
        self._cut: int | None = None  # where the first stop string starts, once one appeared
        self.sent = 0  # characters of the answer already handed out as deltas

    @property
    def stopped(self) -> bool:
        return self._cut is not None

    @property
    def text(self) -> str:
        """The answer so far (all of it decoded, up to the first stop string)."""
        whole = self.detokenizer.text + self.detokenizer.pending
        return whole if self._cut is None else whole[:self._cut]

    def push(self, token: int) -> None:
        """Add one token; `stopped` tells whether a stop string appeared."""
        det = self.detokenizer
        start = max(len(det.text) - self._overlap, 0)  # what earlier pushes searched, minus a stop's overlap
        det.push(token)
        if not self.stops:
            return
        tail = det.text[start:] + det.pending
        cut = min((i for i in (tail.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._cut = start + cut

    def delta(self) -> str:
        """The text that may go to the client now (and is marked sent)."""
        if self.stopped:
            return ""
        text = self.detokenizer.text
        end = _safe_end(text, self.stops)
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent:end], end
        return out

    def rest(self) -> str:
        """At the end: the text not sent yet (held back, or pending)."""
        text = self.text
        out, self.sent = text[self.sent:], len(text)
        return out


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent: not a trailing partial character, nor the start of a stop string."""
    end = len(text.rstrip(_PARTIAL))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                end = min(end, len(text) - k)
                break
    return end


def sample(logits: torch.Tensor, rows: list[Generation]) -> list[int]:
    """The next token of every row: the argmax, or a draw from the row's own generator when it samples."""
    tokens = logits.argmax(-1).tolist()
    for i, gen in enumerate(rows):
        p = gen.params
        if p.temperature > 0:
            probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                outside = sorted_p.cumsum(0) - sorted_p > p.top_p  # the most likely token always stays
                probs = probs.scatter(0, order[outside], 0.0)
            tokens[i] = int(torch.multinomial(probs, 1, generator=gen.sampler))
    return tokens

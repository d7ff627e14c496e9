"""What a request is inside the server: its sampling settings, its state while it decodes, and the events it sends.

The engine talks to callers through `Event` callbacks, made from the engine thread: `Delta` (new text), then one
`Finished` or `Failed`. Callers in an event loop pass a callback that hands the event over thread-safely.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.serve.decoder import TextStream

__all__ = ["Delta", "Event", "Failed", "Finished", "Generation", "SamplingParams", "ServeError"]


class ServeError(PeftkitError):
    """A request the server refuses; `status` is its HTTP status, `code` the OpenAI error code."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status or self.status
        self.code = code or self.code
        self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request decodes.

    Attributes:
        max_tokens: new tokens at most (the end-of-sequence token counts).
        temperature: 0 is greedy; above 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling: keep the most likely tokens whose probabilities sum to `top_p`.
        seed: seed of this request's sampler (sampling only).
        stop: strings that end the answer (not included in it).
        stop_token_ids: tokens that end the answer like the end-of-sequence token (a chat template's end of turn).
        ignore_eos: keep going past the end-of-sequence token and `stop_token_ids` (benchmarks).
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False


@dataclasses.dataclass
class Delta:
    text: str


@dataclasses.dataclass
class Finished:
    reason: str  # "stop", "length" or "cancelled"
    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class Failed:
    message: str
    status: int = 500


Event = Delta | Finished | Failed
_ids = itertools.count()


class Generation:
    """One request inside the engine: its prompt and settings, and what it has produced so far.

    Its text lives in `output` (a `TextStream`: incremental detokenizer, stop strings, deltas not yet sent).
    """

    def __init__(self, model: str, prompt_ids: list[int], params: SamplingParams,
                 emit: Callable[[Event], None], deltas: bool, output: TextStream) -> None:
        self.id = next(_ids)
        self.model = model
        self.prompt_ids = prompt_ids
        self.params = params
        self.emit = emit
        self.deltas = deltas
        self.output = output
        self.cancelled = False
        self.finish_reason: str | None = None
        self.generated = 0  # new tokens, the end-of-sequence token included
        self.slot = 0
        self.pos = 0  # position of the next token fed to the model
        self.last = 0  # the token fed at the next decode step
        self.sampler = None
        if params.temperature > 0:
            self.sampler = torch.Generator()
            if params.seed is None:
                self.sampler.seed()  # a fresh random seed for this request only
            else:
                self.sampler.manual_seed(params.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

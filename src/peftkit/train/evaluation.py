"""Generation metrics during training: answers to held-out prompts, scored against their references.

`eval_metric` (a TrainConfig key) names the metric: a registered one (`METRICS`, `register_metric`) or a user
function given by import path (``package.module:function``), called as ``fn(predictions, references)`` with two
lists of strings and returning a number or a mapping of names to numbers. Every name it returns is logged
(``eval_<name>``) and can be tracked with ``save_best``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from peftkit.data.formats import Conversation
from peftkit.errors import PeftkitError

__all__ = ["METRICS", "generation_scores", "lower_is_better", "register_metric", "resolve_metric"]

Metric = Callable[[list[str], list[str]], dict[str, float]]


def _exact_match(predictions: list[str], references: list[str]) -> dict[str, float]:
    hits = sum(" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references, strict=True))
    return {"exact_match": hits / max(len(references), 1)}


METRICS: dict[str, tuple[Metric, tuple[str, ...]]] = {}
"""Registered metrics and the names each returns. Built in: whitespace-normalised exact match (here), BLEU
(mteval-13a, one reference) and ROUGE-L (`peftkit.eval.metrics`), the demo's order-extraction scores (``orders``:
exact match, field accuracy, valid JSON; `peftkit.demo`). The layers above train register theirs on import
(`register_metric`): training never imports them."""


def register_metric(name: str, metric: Metric, names: tuple[str, ...]) -> Metric:
    """Make `metric` available as ``eval_metric: <name>``; `names` are the keys it returns (checked by
    ``save_best``). Registering a name twice is an error."""
    if name in METRICS:
        raise RuntimeError(f"metric {name!r} registered twice")
    METRICS[name] = (metric, names)
    return metric


register_metric("exact_match", _exact_match, ("exact_match",))


def resolve_metric(name: str) -> Metric:
    """The metric function `name` names: a key of `METRICS`, or ``module:function``."""
    if name in METRICS:
        return METRICS[name][0]
    if ":" not in name:
        raise PeftkitError(f"eval_metric: unknown metric {name!r} (registered: {', '.join(METRICS)}; or a function "
                           "given as package.module:function)")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PeftkitError(f"eval_metric: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PeftkitError(f"eval_metric: {module_name!r} has no function {attr!r}")

    def metric(predictions: list[str], references: list[str]) -> dict[str, float]:
        value = fn(predictions, references)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {attr: float(value)}
        if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            return {str(k): float(v) for k, v in value.items()}
        raise PeftkitError(f"eval_metric {name}: returned {type(value).__name__}, expected a number or a mapping "
                           "of names to numbers")

    return metric


def lower_is_better(name: str) -> bool:
    """Whether a smaller value of the tracked metric `name` is better (losses, perplexities, error rates)."""
    return name.endswith(("loss", "perplexity", "error", "ppl"))


def generation_scores(model: Any, tokenizer: Any, conversations: Sequence[Conversation], metric: Metric,
                      template: str | None, max_new_tokens: int, batch_size: int) -> dict[str, float]:
    """Greedy answers of `model` to each conversation's prompt (all turns but the last), scored by `metric`
    against the last turn's content. Keys are prefixed ``eval_``."""
    from peftkit.generation import generate

    prompts = [list(conv[:-1]) for conv in conversations]
    references = [conv[-1]["content"] for conv in conversations]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       template=template)
    return {f"eval_{k}": v for k, v in metric(answers, references).items()}

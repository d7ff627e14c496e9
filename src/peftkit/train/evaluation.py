"""Generation metrics during training: answers to held-out prompts, scored against their references.

`eval_metric` (a TrainConfig key) names the metric: a built-in one (`METRICS`) or a user function given by import
path (``package.module:function``), called as ``fn(predictions, references)`` with two lists of strings and
returning a number or a mapping of names to numbers. Every name it returns is logged (``eval_<name>``) and can be
tracked with ``save_best``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from peftkit.data.formats import Conversation
from peftkit.errors import PeftkitError

__all__ = ["METRICS", "generation_scores", "lower_is_better", "resolve_metric"]

Metric = Callable[[list[str], list[str]], dict[str, float]]


def _exact_match(predictions: list[str], references: list[str]) -> dict[str, float]:
    hits = sum(" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references, strict=True))
    return {"exact_match": hits / max(len(references), 1)}


def _bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    from peftkit.eval.metrics import bleu

    return {"bleu": bleu(predictions, [[r] for r in references])}


def _rouge_l(predictions: list[str], references: list[str]) -> dict[str, float]:
    from peftkit.eval.metrics import rouge_l

    return {"rouge_l": rouge_l(predictions, [[r] for r in references])}


def _orders(predictions: list[str], references: list[str]) -> dict[str, float]:
    from peftkit.demo import score_orders

    return score_orders(predictions, references)


METRICS: dict[str, tuple[Metric, tuple[str, ...]]] = {
    "exact_match": (_exact_match, ("exact_match",)),
    "bleu": (_bleu, ("bleu",)),
    "rouge_l": (_rouge_l, ("rouge_l",)),
    "orders": (_orders, ("exact_match", "field_accuracy", "valid_json")),
}
"""Built-in metrics and the names each returns: whitespace-normalised exact match, BLEU (mteval-13a, one reference),
ROUGE-L, and the demo's order-extraction scores (exact match, field accuracy, valid JSON)."""


def resolve_metric(name: str) -> Metric:
    """The metric function `name` names: a key of `METRICS`, or ``module:function``."""
    if name in METRICS:
        return METRICS[name][0]
    if ":" not in name:
        raise PeftkitError(f"eval_metric: unknown metric {name!r} (built-in: {', '.join(METRICS)}; or a function "
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
    from peftkit.eval.generate import generate

    prompts = [list(conv[:-1]) for conv in conversations]
    references = [conv[-1]["content"] for conv in conversations]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       template=template)
    return {f"eval_{k}": v for k, v in metric(answers, references).items()}

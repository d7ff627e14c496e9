"""In-context learning (ICL): the no-training baseline every fine-tuning method has to beat.

k-shot prompting (Brown et al. 2020, https://arxiv.org/abs/2005.14165): k solved examples from the training set
are put before the query as earlier user/assistant turns of the conversation, the chat template is applied, and
the model answers the last user turn. No weight changes; decoding and metrics are the ones the fine-tuned models
get (:func:`peftkit.generation.generate`, :func:`peftkit.eval.metrics.e2e_metrics`).

ICL results depend on which examples are shown and in which order (Zhao et al. 2021,
https://arxiv.org/abs/2102.09690; Lu et al. 2022, https://arxiv.org/abs/2104.08786), so :func:`run_icl` scores
several *draws* of examples, each in several *orders*, and reports the spread (mean, std, min, max) next to each
single run. It also reports the price: prompt tokens per prediction, against the zero-shot prompt a fine-tuned
model gets.

Leakage: an example is never the query itself. A candidate whose input equals the query's input, or whose
answer is one of the query's references, is skipped for that query and the next candidate of the draw is used.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from peftkit.data.formats import Conversation
from peftkit.data.sequences import prompt_text
from peftkit.errors import PeftkitError

__all__ = [
    "ICLExample",
    "ICLResult",
    "ICLRun",
    "draw_order",
    "icl_conversation",
    "pick_examples",
    "prompt_tokens",
    "run_icl",
    "spread",
]


@dataclasses.dataclass(frozen=True)
class ICLExample:
    """One solved example: the user message and the answer."""

    prompt: str
    answer: str


@dataclasses.dataclass
class ICLRun:
    """One (draw, order) run: the scores, the answers, and the mean prompt length in tokens."""

    draw: int
    order: int
    scores: dict[str, float]
    predictions: list[str]
    prompt_tokens: float


@dataclasses.dataclass
class ICLResult:
    """All runs of :func:`run_icl` and their summary.

    Attributes:
        k: examples per prompt.
        runs: one entry per (draw, order).
        summary: metric -> ``{"mean", "std", "min", "max"}`` over the runs (see :func:`spread`).
        prompt_tokens: mean prompt tokens per prediction with the k examples.
        zero_shot_prompt_tokens: mean prompt tokens per prediction without examples (what a fine-tuned model reads).
    """

    k: int
    runs: list[ICLRun]
    summary: dict[str, dict[str, float]]
    prompt_tokens: float
    zero_shot_prompt_tokens: float

    @property
    def token_cost_ratio(self) -> float:
        """How many times more prompt tokens ICL reads per prediction than a fine-tuned (zero-shot) model."""
        return self.prompt_tokens / max(self.zero_shot_prompt_tokens, 1e-9)

    def table(self) -> str:
        """A Markdown table: one row per run, then mean / std / min / max."""
        metrics = list(self.summary)
        lines = ["| draw | order | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for r in self.runs:
            lines.append(f"| {r.draw} | {r.order} | " + " | ".join(f"{r.scores[m]:.4f}" for m in metrics) + " |")
        for stat in ("mean", "std", "min", "max"):
            lines.append(f"| **{stat}** | | " + " | ".join(f"{self.summary[m][stat]:.4f}" for m in metrics) + " |")
        return "\n".join(lines)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (n - 1 in the denominator; 0 for one value), min and max.

    Raises:
        ValueError: `values` is empty.
    """
    if not values:
        raise ValueError("spread of no values")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def icl_conversation(examples: Sequence[ICLExample], query: str) -> Conversation:
    """The conversation of a k-shot prompt: each example as a user turn and an assistant turn, then the query."""
    conv: Conversation = []
    for ex in examples:
        conv += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}]
    conv.append({"role": "user", "content": query})
    return conv


def draw_order(pool_size: int, draw: int, seed: int = 0) -> list[int]:
    """The candidate order of one draw: a permutation of the pool, the same for every query of the draw."""
    order = list(range(pool_size))
    random.Random(seed * 1_000_003 + draw).shuffle(order)
    return order


def pick_examples(
    pool: Sequence[ICLExample],
    candidates: Sequence[int],
    k: int,
    query: str,
    references: Sequence[str] = (),
) -> list[ICLExample]:
    """The first k candidates that do not leak the query.

    Args:
        pool: the training examples.
        candidates: pool indices in the draw's order (:func:`draw_order`).
        query: the query's user message; an example with the same prompt is skipped.
        references: the query's references; an example whose answer is one of them is skipped.

    Raises:
        PeftkitError: fewer than k usable examples.
    """
    if k == 0:
        return []
    refs = {r.strip() for r in references}
    picked: list[ICLExample] = []
    for i in candidates:
        ex = pool[i]
        if ex.prompt.strip() == query.strip() or ex.answer.strip() in refs:
            continue
        picked.append(ex)
        if len(picked) == k:
            return picked
    raise PeftkitError(f"only {len(picked)} of the {len(pool)} pool examples can serve as ICL examples; need k={k}")


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation],
                  template: str | None = None) -> float:
    """Mean number of prompt tokens (chat template and generation prompt included) per conversation."""
    if not conversations:
        return 0.0
    total = sum(len(tokenizer(prompt_text(tokenizer, list(c), template), add_special_tokens=False)["input_ids"])
                for c in conversations)
    return total / len(conversations)


def run_icl(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    pool: Sequence[ICLExample],
    queries: Sequence[str],
    references: Sequence[Sequence[str]],
    k: int = 3,
    draws: int = 3,
    orders: int = 2,
    seed: int = 0,
    score: Callable[[list[str], Sequence[Sequence[str]]], dict[str, float]] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    template: str | None = None,
    progress: Callable[[str], None] | None = None,
    on_run: Callable[[ICLRun], None] | None = None,
) -> ICLResult:
    """Score k-shot prompting over `draws` example sets, each in `orders` orders.

    Draw d picks, per query, the first k non-leaking examples of a permutation of `pool` (the same permutation
    for every query, so the examples are shared unless one of them leaks). Order 0 shows them as drawn; order
    o > 0 shows a fixed permutation of the k positions (the same for every query of the run).

    Args:
        pool: training examples to draw from.
        queries: user messages to answer; `references`: their references (one list per query).
        score: ``score(predictions, references) -> {metric: value}``; default :func:`e2e_metrics`.
        progress: called with one line per finished run.
        on_run: called with each finished run (e.g. to save it: a long evaluation that is stopped keeps its runs).
    """
    from peftkit.generation import generate

    _check_runs(k, draws, orders, queries, references)
    if score is None:
        from peftkit.eval.metrics import e2e_metrics

        score = e2e_metrics
    zero_shot = prompt_tokens(tokenizer, [icl_conversation([], q) for q in queries], template)
    runs: list[ICLRun] = []
    for d in range(draws):
        candidates = draw_order(len(pool), d, seed)
        shown = [pick_examples(pool, candidates, k, q, refs) for q, refs in zip(queries, references, strict=True)]
        for o in range(orders):
            perm = _permutation(k, d, o, seed)
            convs = [icl_conversation([exs[i] for i in perm], q) for exs, q in zip(shown, queries, strict=True)]
            predictions = generate(model, tokenizer, convs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   template=template)
            run = ICLRun(d, o, score(predictions, references), predictions, prompt_tokens(tokenizer, convs, template))
            runs.append(run)
            if on_run is not None:
                on_run(run)
            if progress is not None:
                progress(f"icl k={k} draw {d} order {o}: " + ", ".join(f"{m} {v:.4f}" for m, v in run.scores.items()))
            if k <= 1:
                break  # one example has one order
    metrics = list(runs[0].scores)
    summary = {m: spread([r.scores[m] for r in runs]) for m in metrics}
    mean_prompt = sum(r.prompt_tokens for r in runs) / len(runs)
    return ICLResult(k, runs, summary, mean_prompt, zero_shot)


def _check_runs(k: int, draws: int, orders: int, queries: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if k < 0 or draws < 1 or orders < 1:
        raise PeftkitError(f"need k >= 0, draws >= 1, orders >= 1; got k={k}, draws={draws}, orders={orders}")
    if len(queries) != len(references):
        raise PeftkitError(f"{len(queries)} queries but {len(references)} reference lists")


def _permutation(k: int, draw: int, order: int, seed: int) -> list[int]:
    """The positions of the `k` drawn examples in run (`draw`, `order`): as drawn for order 0, else a fixed
    shuffle of them (never the drawn order again)."""
    perm = list(range(k))
    if order > 0:
        rng = random.Random(seed * 1_000_003 + draw * 1_009 + order)
        while perm == list(range(k)) and k > 1:
            rng.shuffle(perm)
    return perm

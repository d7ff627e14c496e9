"""Forgetting: how much fine-tuning on a task changes what the model does on everything else.

The probe is independent of the task: ~50 short general questions shipped with peftkit
(``peftkit/eval/probe_prompts.json``) and the *base model's own* greedy answers to them. Two numbers per method:

* **probe loss**: the mean cross-entropy per answer token of the base model's answers, under the model
  (``sum of -log p(answer token) / answer tokens``, chat template applied, loss on the answer text only: the
  end-of-turn token is not scored, because answers cut at the length limit never produced one). Before
  fine-tuning it is low (the model wrote those answers); the rise after fine-tuning measures how far the model
  moved away from its own behaviour. This is the probe of ``SPECS.md`` section 6.
* **agreement**: a task-free metric of the fine-tuned model's greedy answers against the base answers:
  ROUGE-L (LCS F-measure, beta 1.2, on lowercased word tokens) and the share of identical answers.

Mitigations besides PEFT itself live in the trainer (``TrainConfig.replay_data`` / ``replay_fraction`` and
``ewc_lambda``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.data.sequences import IGNORE, tokenize_conversations

__all__ = [
    "ForgettingReport",
    "Probe",
    "answer_agreement",
    "build_probe",
    "load_probe_prompts",
    "measure_forgetting",
    "probe_loss",
]

_WORD = re.compile(r"\w+|[^\w\s]")


def load_probe_prompts(path: str | Path | None = None) -> list[str]:
    """The general questions of the probe: the shipped 50, or a JSON list of strings at `path`."""
    if path is None:
        text = (resources.files("peftkit.eval") / "probe_prompts.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    prompts = json.loads(text)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("a probe file is a JSON list of strings")
    return prompts


@dataclasses.dataclass
class Probe:
    """The probe set: prompts, the base model's greedy answers, and the base model's loss on them."""

    prompts: list[str]
    answers: list[str]
    base_loss: float

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        return cls(**json.loads(Path(path).read_text()))


@dataclasses.dataclass
class ForgettingReport:
    """Probe numbers of a fine-tuned model against its base.

    Attributes:
        loss_before / loss_after: mean CE per token of the base answers, base model / fine-tuned model.
        rouge_l: ROUGE-L of the fine-tuned model's greedy answers against the base answers (1 = unchanged).
        exact: share of probe prompts answered exactly as the base model did.
    """

    loss_before: float
    loss_after: float
    rouge_l: float
    exact: float
    answers: list[str] = dataclasses.field(default_factory=list, repr=False)

    @property
    def loss_increase(self) -> float:
        return self.loss_after - self.loss_before

    def as_dict(self) -> dict[str, Any]:
        return {"probe_loss_before": self.loss_before, "probe_loss_after": self.loss_after,
                "probe_loss_increase": self.loss_increase, "probe_rouge_l": self.rouge_l, "probe_exact": self.exact}


@torch.no_grad()
def probe_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 8,
    template: str | None = None,
    max_length: int = 1024,
) -> float:
    """Mean cross-entropy per answer token of `answers` given `prompts` (chat template, loss on answers only).

    Runs in bf16 autocast when the model has bf16 weights (as generation does), else in the model's dtype.
    """
    import contextlib
    import functools

    from peftkit.train.evaluator import evaluation_loss

    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
             for p, a in zip(prompts, answers, strict=True)]
    examples = tokenize_conversations(tokenizer, convs, max_length, template)
    for ex, answer in zip(examples, answers, strict=True):
        _score_answer_text_only(ex, len(tokenizer(answer, add_special_tokens=False)["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    autocast = (functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext)
    return evaluation_loss(model, [[e] for e in examples], pad, batch_size, autocast)


def _score_answer_text_only(example: Any, n_answer: int) -> None:
    """Keep the labels of the first `n_answer` target tokens (the answer text), drop the rest (end of turn).

    Note:
        The target segment is the answer followed by the template's end-of-turn text; the answer is tokenized
        on its own in both cases (the end-of-turn marker is a special token, which splits the text), so its
        first `n_answer` target tokens are the answer's tokens.
    """
    kept = 0
    for i, label in enumerate(example.labels):
        if label == IGNORE:
            continue
        if kept >= n_answer:
            example.labels[i] = IGNORE
        kept += 1


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def answer_agreement(answers: Sequence[str], base_answers: Sequence[str], beta: float = 1.2) -> dict[str, float]:
    """ROUGE-L (LCS F-measure, `beta` 1.2 as coco-caption) and exact-match share of `answers` vs `base_answers`.

    Tokens are lowercased words and punctuation marks; two empty answers agree fully.
    """
    if len(answers) != len(base_answers):
        raise ValueError(f"{len(answers)} answers but {len(base_answers)} base answers")
    if not answers:
        raise ValueError("no answers to compare")
    scores, exact = [], 0
    for a, b in zip(answers, base_answers, strict=True):
        wa, wb = _words(a), _words(b)
        exact += a.strip() == b.strip()
        if not wa and not wb:
            scores.append(1.0)
            continue
        lcs = _lcs(wa, wb)
        if lcs == 0:
            scores.append(0.0)
            continue
        precision, recall = lcs / len(wa), lcs / len(wb)
        scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return {"rouge_l": sum(scores) / len(scores), "exact": exact / len(answers)}


def build_probe(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    template: str | None = None,
) -> Probe:
    """The base model's greedy answers to the probe prompts (default: the shipped 50) and its loss on them."""
    from peftkit.generation import generate

    prompts = list(prompts) if prompts is not None else load_probe_prompts()
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       template=template)
    return Probe(prompts, answers, probe_loss(model, tokenizer, prompts, answers, template=template))


def measure_forgetting(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    probe: Probe,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    template: str | None = None,
    generate_answers: bool = True,
) -> ForgettingReport:
    """Probe loss and answer agreement of a (fine-tuned) model against the base model's `probe`.

    Args:
        generate_answers: also decode the model's answers for the agreement metric (the slow part);
            without it, ``rouge_l`` and ``exact`` are NaN.
    """
    from peftkit.generation import generate

    loss = probe_loss(model, tokenizer, probe.prompts, probe.answers, template=template)
    if not generate_answers:
        return ForgettingReport(probe.base_loss, loss, float("nan"), float("nan"))
    answers = generate(model, tokenizer, probe.prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       template=template)
    agree = answer_agreement(answers, probe.answers)
    return ForgettingReport(probe.base_loss, loss, agree["rouge_l"], agree["exact"], answers)

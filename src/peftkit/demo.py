"""The demo: teach the bundled SmolLM2-135M-Instruct to extract orders from customer messages into JSON.

The task ships with peftkit (``peftkit/data/tasks/orders_*.jsonl``, written by ``tools/make_demo_task.py``).
Held-out messages use names, cities, items, colours and two phrasings never seen in training. The demo scores
the base model, fine-tunes with QLoRA (LoRA on an NF4 base; any method by override), scores again and prints a
before/after table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from peftkit.data.formats import read_conversations
from peftkit.generation import generate
from peftkit.hardware import resolve_precision, warn_if_slow
from peftkit.models import BUNDLED_NAME, load_model
from peftkit.train import TrainConfig, Trainer
from peftkit.train.evaluation import register_metric

__all__ = ["DEMO_CONFIG", "run_demo", "score_orders", "task_file"]

FIELDS = ("name", "item", "quantity", "color", "city")

# The recipe recipes/demo_qlora.yaml holds the same settings for `peftkit train`.
DEMO_CONFIG: dict[str, Any] = {
    "model": BUNDLED_NAME,
    "method": "lora",
    "method_config": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "quantize": "nf4",  # QLoRA: NF4 + double-quantized frozen base
    "precision": "auto",  # bf16 where the hardware computes it natively, else fp32 (peftkit.hardware)
    "packing": True,
    "max_length": 512,
    "batch_size": 2,  # 2 packed rows x 512 tokens: 41 steps for the 570 training examples
    "lr": 1e-3,
    "epochs": 1.0,
    "warmup_ratio": 0.05,
    "output_dir": "runs/demo",
    "eval_fraction": 0.05,
}


def task_file(split: str) -> Path:
    """Path of the shipped demo task split (``train`` or ``test``)."""
    return Path(str(resources.files("peftkit.data") / "tasks" / f"orders_{split}.jsonl"))


def _parse(text: str) -> dict[str, Any] | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        value = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def score_orders(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (all five fields right, nothing else), field accuracy, and share of valid JSON."""
    exact = fields = valid = 0
    for pred, ref in zip(predictions, references, strict=True):
        got, want = _parse(pred), json.loads(ref)
        if got is None:
            continue
        valid += 1
        exact += got == want
        fields += sum(str(got.get(k)).lower() == str(want[k]).lower() for k in FIELDS)
    n = max(len(references), 1)
    return {"exact_match": exact / n, "field_accuracy": fields / (n * len(FIELDS)), "valid_json": valid / n}


# `eval_metric: orders` while training (README: the demo recipe with save_best=exact_match)
register_metric("orders", score_orders, ("exact_match", "field_accuracy", "valid_json"))


@dataclass
class _Eval:
    scores: dict[str, float]
    answers: list[str]
    seconds: float


def _evaluate(model, tokenizer, prompts, references) -> _Eval:
    t0 = time.perf_counter()
    # one batch: decoding reads every weight once per step, whatever the batch (memory-bound on CPU)
    answers = generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=64, progress=True)
    return _Eval(score_orders(answers, references), answers, time.perf_counter() - t0)


def run_demo(n_test: int = 60, overrides: dict[str, Any] | None = None, show: int = 3) -> dict[str, Any]:
    """Score, fine-tune, score again; print the before/after table. Returns the numbers."""
    t_start = time.perf_counter()
    config = TrainConfig.from_dict({**DEMO_CONFIG, "data": str(task_file("train")), **(overrides or {})})
    precision = resolve_precision(config.precision)
    print(precision.line())
    warn_if_slow(precision)
    # the frozen weights' dtype: generation runs in it; the trainer keeps the trainable weights in fp32
    model, tokenizer = load_model(config.model, dtype=precision.weight_dtype)
    test = read_conversations(task_file("test"))[:n_test]
    prompts = [conv[:-1] for conv in test]
    references = [conv[-1]["content"] for conv in test]

    print(f"\n[1/3] Scoring the base model {config.model} on {len(test)} held-out messages")
    before = _evaluate(model, tokenizer, prompts, references)

    base = f" on a {config.quantize.upper()}{' + double-quant' if config.double_quant else ''} base" \
        if config.quantize != "none" else ""
    print(f"\n[2/3] Fine-tuning with {config.method}{base} ({config.method_settings()})")
    trainer = Trainer(config, model=model, tokenizer=tokenizer, overwrite=True)  # the demo replaces its last run
    p = trainer.params
    print(f"      trainable parameters: {p['trainable']:,} of {p['total']:,} ({p['percent']:.2f}%)")
    result = trainer.run()

    print("\n[3/3] Scoring the fine-tuned model")
    after = _evaluate(trainer.model, tokenizer, prompts, references)

    rows = [("exact match", "exact_match"), ("field accuracy", "field_accuracy"), ("valid JSON", "valid_json")]
    print(f"\nHeld-out results ({len(test)} messages with unseen names, cities, items, phrasings):")
    print(f"| {'metric':<15} | {'base model':>10} | {'fine-tuned':>10} |")
    print(f"|{'-' * 17}|{'-' * 12}|{'-' * 12}|")
    for label, key in rows:
        print(f"| {label:<15} | {before.scores[key]:>10.1%} | {after.scores[key]:>10.1%} |")
    mfu = f", {result.mfu:.0%} of this CPU's {precision.name} matmul peak" if result.mfu is not None else ""
    print(f"\nTraining: {result.steps} steps in {result.train_seconds:.0f} s, "
          f"{result.target_tokens_per_s:.0f} answer tokens/s{mfu}; final train loss {result.train_loss:.3f}"
          + (f", eval loss {result.eval_loss:.3f}" if result.eval_loss is not None else ""))
    print("\nSample generations:")
    for i in range(min(show, len(test))):
        print(f"- message:    {test[i][0]['content'].split(chr(10))[-1]}")
        print(f"  base:       {' '.join(before.answers[i].split())[:150]}")
        print(f"  fine-tuned: {after.answers[i]}")
    out = Path(config.output_dir)
    print(f"\nAdapter (Hugging Face peft format): {result.adapter_dir}")
    print(f"Loss curve: {out / 'loss.png'}   metrics log: {out / 'metrics.jsonl'}")
    total = time.perf_counter() - t_start
    print(f"Total time: {total:.0f} s")
    summary = {"before": before.scores, "after": after.scores, "train_seconds": result.train_seconds,
               "steps": result.steps, "total_seconds": total, "params": p, "precision": precision.name,
               "precision_reason": precision.reason, "mfu": result.mfu, "eval_seconds": before.seconds + after.seconds}
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2))
    return summary

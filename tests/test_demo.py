"""The demo's headline metric (`score_orders`) on hand-built answers, and `peftkit demo` end to end on a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import tiny_llama, tiny_tokenizer

import peftkit.demo as demo
from peftkit.cli import main
from peftkit.data.formats import read_conversations
from peftkit.demo import score_orders
from peftkit.train.evaluation import METRICS, resolve_metric

REF = {"name": "Lena", "item": "vase", "quantity": 10, "color": "pink", "city": "Geneva"}
REF_TEXT = json.dumps(REF)


def with_changes(**changes) -> str:
    return json.dumps({**REF, **changes})


@pytest.mark.parametrize(("prediction", "expected"), [
    # the reference itself, with other key order, spacing and text around the object: all right
    (REF_TEXT, (1, 5, 1)),
    ('Sure! {"city": "Geneva", "color": "pink", "quantity": 10, "item": "vase", "name": "Lena"} Done.', (1, 5, 1)),
    # one field wrong: valid, not exact, 4 of 5 fields
    (with_changes(city="Bern"), (0, 4, 1)),
    # fields compare as lowercase text, exact match as JSON values: "Pink" and "10" count as fields, not exact
    (with_changes(color="Pink"), (0, 5, 1)),
    (with_changes(quantity="10"), (0, 5, 1)),
    # an extra key: every field right, but not exact ("nothing else")
    (with_changes(note="fragile"), (0, 5, 1)),
    # a missing key is a wrong field
    (json.dumps({k: v for k, v in REF.items() if k != "item"}), (0, 4, 1)),
    # not JSON, broken JSON, a list, two objects: invalid, no fields
    ("Lena wants 10 pink vases in Geneva", (0, 0, 0)),
    ('{"name": "Lena", "item": "vase",', (0, 0, 0)),
    ('{"name": "Lena" "item": "vase"}', (0, 0, 0)),
    ('["Lena", "vase"]', (0, 0, 0)),
    (f"{REF_TEXT} or {REF_TEXT}", (0, 0, 0)),
])
def test_score_orders_one_answer(prediction, expected):
    exact, fields, valid = expected
    assert score_orders([prediction], [REF_TEXT]) == {
        "exact_match": exact, "field_accuracy": fields / 5, "valid_json": valid}


def test_score_orders_averages_over_every_reference():
    other = {"name": "Tom", "item": "lamp", "quantity": 2, "color": "red", "city": "Oslo"}
    predictions = [REF_TEXT, json.dumps({**other, "city": "Rome", "color": "blue"}), "no idea",
                   with_changes(quantity=3)]
    references = [REF_TEXT, json.dumps(other), REF_TEXT, REF_TEXT]
    scores = score_orders(predictions, references)
    assert scores["exact_match"] == pytest.approx(1 / 4)
    assert scores["field_accuracy"] == pytest.approx((5 + 3 + 0 + 4) / 20)
    assert scores["valid_json"] == pytest.approx(3 / 4)


def test_score_orders_edge_cases():
    assert score_orders([], []) == {"exact_match": 0.0, "field_accuracy": 0.0, "valid_json": 0.0}
    with pytest.raises(ValueError):  # an answer without its reference is a caller's bug, not a zero
        score_orders([REF_TEXT, REF_TEXT], [REF_TEXT])


def test_the_demo_registers_its_metric_for_training():
    """``eval_metric: orders`` (README) reaches `score_orders` through the training metric registry."""
    assert METRICS["orders"][1] == ("exact_match", "field_accuracy", "valid_json")
    assert resolve_metric("orders") is score_orders


def test_demo_command_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    """`peftkit demo` with the model and run settings overridden: it scores the base model (real greedy answers
    of the tiny model), fine-tunes, scores again and writes the table, the adapter and demo_results.json. The
    second scoring gets the references as answers, so its row must read 100%: the demo scores what it generated,
    against the right references."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    test = read_conversations(demo.task_file("test"))[:3]
    reference_of = {conv[-2]["content"]: conv[-1]["content"] for conv in test}
    real, calls = demo.generate, []

    def generate(model, tokenizer, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 1:
            return real(model, tokenizer, prompts, **kw)
        return [reference_of[p[-1]["content"]] for p in prompts]

    monkeypatch.setattr(demo, "generate", generate)
    out = tmp_path / "run"
    code = main(["demo", "--n-test", "3", f"model={base}", f"output_dir={out}", "max_steps=2", "max_length=256",
                 "precision=fp32", "progress=false"])
    printed = capsys.readouterr().out
    assert code == 0
    assert calls == [3, 3]
    assert "Held-out results (3 messages" in printed
    assert re.search(r"\| exact match\s+\|\s+[\d.]+%\s+\|\s+100\.0% \|", printed)
    summary = json.loads((out / "demo_results.json").read_text())
    assert summary["steps"] == 2
    assert summary["after"] == {"exact_match": 1.0, "field_accuracy": 1.0, "valid_json": 1.0}
    assert set(summary["before"]) == {"exact_match", "field_accuracy", "valid_json"}
    assert all(0.0 <= v <= 1.0 for v in summary["before"].values())
    adapter = Path(re.search(r"Adapter \(Hugging Face peft format\): (\S+)", printed).group(1))
    assert adapter.is_relative_to(out)
    record = json.loads((adapter / "peftkit.json").read_text())
    assert record["base"]["name"] == str(base)
    assert record["quantization"]["format"] == "nf4"  # the demo's QLoRA, not overridden

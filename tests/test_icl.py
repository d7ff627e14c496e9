"""In-context learning baseline: prompt construction, no leakage, orders, spread, token cost."""

from __future__ import annotations

import math
import statistics

import pytest
from conftest import tiny_llama, tiny_tokenizer

from peftkit.errors import PeftkitError
from peftkit.eval.icl import (
    ICLExample,
    draw_order,
    icl_conversation,
    pick_examples,
    prompt_tokens,
    run_icl,
    spread,
)

POOL = [ICLExample(f"q{i}", f"a{i}") for i in range(10)]


def test_conversation_has_k_examples_as_turns_then_the_query():
    conv = icl_conversation(POOL[:3], "the query")
    assert [m["role"] for m in conv] == ["user", "assistant"] * 3 + ["user"]
    assert [m["content"] for m in conv] == ["q0", "a0", "q1", "a1", "q2", "a2", "the query"]
    assert icl_conversation([], "x") == [{"role": "user", "content": "x"}]


def test_chat_template_renders_examples_before_the_query():
    tok = tiny_tokenizer()
    from peftkit.data.sequences import prompt_text

    text = prompt_text(tok, icl_conversation(POOL[:2], "QQ"))
    assert text.index("q0") < text.index("a0") < text.index("q1") < text.index("a1") < text.index("QQ")
    assert text.endswith("<|im_start|>assistant\n")
    # the token cost grows with the examples
    assert prompt_tokens(tok, [icl_conversation(POOL[:2], "QQ")]) > prompt_tokens(tok, [icl_conversation([], "QQ")])


def test_draw_order_is_a_seeded_permutation():
    a, b = draw_order(10, 0), draw_order(10, 1)
    assert sorted(a) == list(range(10)) and a != b
    assert draw_order(10, 0) == a and draw_order(10, 0, seed=1) != a


def test_pick_skips_the_query_itself_and_its_references():
    pool = [ICLExample("same query", "x"), ICLExample("q1", "ref A"), ICLExample("q2", "a2"),
            ICLExample("q3", "a3"), ICLExample("q4", "a4")]
    picked = pick_examples(pool, [0, 1, 2, 3, 4], 2, "same query", ["ref A", "ref B"])
    assert picked == [pool[2], pool[3]]
    assert pick_examples(pool, [4, 3, 2], 3, "other", []) == [pool[4], pool[3], pool[2]]
    with pytest.raises(PeftkitError, match="need k=4"):
        pick_examples(pool, [0, 1, 2, 3, 4], 4, "same query", ["ref A"])


def test_spread_mean_sample_std_min_max():
    values = [0.1, 0.4, 0.25, 0.3]
    s = spread(values)
    assert s["mean"] == pytest.approx(statistics.mean(values))
    assert s["std"] == pytest.approx(statistics.stdev(values))  # sample std (n - 1)
    assert (s["min"], s["max"]) == (0.1, 0.4)
    assert spread([0.5]) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5}
    with pytest.raises(ValueError):
        spread([])


def test_run_icl_draws_orders_and_summary(monkeypatch):
    """Every (draw, order) run sees k examples, none leaking; orders permute the same examples; the summary is
    the spread of the per-run scores."""
    import peftkit.generation as gen_mod

    seen: list[list[list[dict]]] = []

    def fake_generate(model, tokenizer, prompts, **kw):
        seen.append([list(p) for p in prompts])
        return [f"answer {len(seen)}"] * len(prompts)

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    pool = [ICLExample(f"q{i}", f"a{i}") for i in range(8)]
    queries, refs = ["q3", "z"], [["a5"], ["a0"]]  # q3 is in the pool, a5 and a0 are references
    scores = iter([0.1, 0.2, 0.3, 0.6])
    result = run_icl(tiny_llama(), tiny_tokenizer(), pool, queries, refs, k=3, draws=2, orders=2,
                     score=lambda p, r: {"BLEU": next(scores)})
    assert [(r.draw, r.order) for r in result.runs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for convs in seen:
        for conv, q, rs in zip(convs, queries, refs, strict=True):
            assert len(conv) == 7 and conv[-1]["content"] == q
            shown_prompts = [m["content"] for m in conv[:-1:2]]
            shown_answers = [m["content"] for m in conv[1:-1:2]]
            assert q not in shown_prompts and not set(rs) & set(shown_answers)
    # order 1 shows the same examples as order 0 of the same draw, in another order
    for d in (0, 2):
        first, second = seen[d][0][:-1], seen[d + 1][0][:-1]
        pairs = lambda conv: [(conv[i]["content"], conv[i + 1]["content"]) for i in range(0, len(conv), 2)]  # noqa: E731
        assert sorted(pairs(first)) == sorted(pairs(second)) and pairs(first) != pairs(second)
    assert seen[0][0][:-1] != seen[2][0][:-1]  # another draw, other examples
    s = result.summary["BLEU"]
    assert s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(statistics.stdev([0.1, 0.2, 0.3, 0.6]))
    assert (s["min"], s["max"]) == (0.1, 0.6)
    assert result.prompt_tokens > result.zero_shot_prompt_tokens > 0
    assert result.token_cost_ratio == pytest.approx(result.prompt_tokens / result.zero_shot_prompt_tokens)
    assert "**std**" in result.table()


def test_run_icl_with_a_real_tiny_model_and_zero_shot():
    tok = tiny_tokenizer()
    result = run_icl(tiny_llama(), tok, POOL, ["hello"], [["hi"]], k=0, draws=1, orders=3,
                     score=lambda p, r: {"n": float(len(p))}, max_new_tokens=3)
    assert len(result.runs) == 1 and result.summary["n"]["mean"] == 1.0  # one example or none: one order
    assert math.isclose(result.prompt_tokens, result.zero_shot_prompt_tokens)

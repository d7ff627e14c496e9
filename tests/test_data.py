"""Instruction data: formats, bad rows, loss masking, truncation, packing without leakage."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer

from peftkit.data.formats import ReadStats, read_conversations
from peftkit.data.sequences import (
    IGNORE,
    Example,
    TokenizeStats,
    collate,
    make_rows,
    row_length,
    shared_prefix,
    tokenize_conversations,
    turn_end,
)
from peftkit.errors import PeftkitError

ROWS = [
    {"instruction": "Add", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi", "input": "", "output": "hi there"},
    {"instruction": "Name a colour", "output": "blue"},
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_formats_read_the_same(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    rows = [{**r, "input": r.get("input", "")} for r in ROWS]
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    convs = read_conversations(path)
    assert convs[0] == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert convs[1][0]["content"] == "Say hi"


def test_dolly_chat_datasets_and_field_map():
    from datasets import Dataset

    dolly = [{"instruction": "Q", "context": "C", "response": "R"}]
    assert read_conversations(dolly)[0][1]["content"] == "R"
    chat = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    assert read_conversations(Dataset.from_list(chat))[0][1] == {"role": "assistant", "content": "b"}
    custom = [{"question": "Q?", "answer": "A."}]
    conv = read_conversations(custom, field_map={"instruction": "question", "output": "answer"})
    assert conv[0][1]["content"] == "A."


def test_bad_rows_error_or_skip(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [ROWS[0], {"instruction": "x"}, {"instruction": 3, "output": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(PeftkitError, match=r"bad.jsonl: line 2: missing field 'output'"):
        read_conversations(path)
    stats = ReadStats()
    convs = read_conversations(path, skip_bad_rows=True, stats=stats)
    assert len(convs) == 1 and stats.skipped == 2 and "line 3" in stats.reasons[1]
    path.write_text('{"instruction": "a", "output": "b"}\n{broken')
    with pytest.raises(PeftkitError, match="line 2 is not valid JSON"):
        read_conversations(path)


def test_loss_only_on_output_tokens():
    tok = tiny_tokenizer()
    [ex] = tokenize_conversations(tok, read_conversations(ROWS[:1]), max_length=512)
    target = tok.decode([t for t in ex.labels if t != IGNORE])
    assert target == "5<|im_end|>"  # the newline after the end-of-turn token belongs to the next prompt
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
    prompt = tok.decode(ex.input_ids[:first])
    assert prompt.endswith("<|im_start|>assistant\n") and "2 and 3" in prompt and set(ex.labels[:first]) == {IGNORE}
    # multi-turn: every assistant turn is a target, every user turn is not
    chat = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    [ex] = tokenize_conversations(tok, read_conversations(chat), max_length=512)
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == "b<|im_end|>d<|im_end|>"


def test_turn_end_is_the_text_after_an_answer_special_token_or_not():
    chatml, plain = tiny_tokenizer(), tiny_tokenizer(chatml_tokens=False)
    assert turn_end(chatml) == turn_end(plain) == "<|im_end|>"
    assert len(plain("<|im_end|>", add_special_tokens=False)["input_ids"]) == 10  # plain text there
    assert turn_end(plain, "alpaca") == "</s>" and turn_end(chatml, "alpaca") == "<|im_end|>"  # the EOS
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert turn_end(plain) == ""
    with pytest.raises(PeftkitError, match="unknown template"):
        turn_end(plain, "vicuna")


def test_overlong_truncate_or_drop():
    tok = tiny_tokenizer()
    convs = read_conversations([{"instruction": "x" * 40, "output": "y" * 40}, ROWS[0]])
    stats = TokenizeStats()
    ex = tokenize_conversations(tok, convs, max_length=70, stats=stats)
    assert stats.truncated == 1 and len(ex[0].input_ids) == 70 and len(ex) == 2
    stats = TokenizeStats()
    ex = tokenize_conversations(tok, convs, max_length=70, overlong="drop", stats=stats)
    assert stats.dropped == 1 and len(ex) == 1


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_packing_has_no_cross_example_leakage(make):
    model = make()
    tok = tiny_tokenizer()
    examples = tokenize_conversations(tok, read_conversations(ROWS), max_length=512)
    rows = make_rows(examples, max_length=512, packing=True)
    assert len(rows) == 1 and len(rows[0]) == 3
    packed = collate(rows, pad_id=0)
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k not in ("labels", "segment_ids")}).logits
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits
            end = start + len(e.input_ids)
            torch.testing.assert_close(logits[0, start:end], alone[0], atol=1e-5, rtol=1e-5)
            start = end
    # labels and positions
    assert packed["labels"][0, :start].ne(IGNORE).sum() == sum(e.num_targets for e in examples)
    assert packed["position_ids"][0, len(examples[0].input_ids)] == 0


def test_padding_mode_matches_alone():
    model = tiny_llama()
    examples = tokenize_conversations(tiny_tokenizer(), read_conversations(ROWS), max_length=512)
    batch = collate(make_rows(examples, 512, packing=False), pad_id=0)
    assert batch["attention_mask"].dim() == 2
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, e in enumerate(examples):
            alone = model(input_ids=torch.tensor([e.input_ids])).logits
            torch.testing.assert_close(logits[i, : len(e.input_ids)], alone[0], atol=1e-5, rtol=1e-5)


SAME_START = [{"instruction": "Extract the colour from this message", "input": f"I want {c} socks", "output": c}
              for c in ("red", "blue", "green", "pink", "grey", "teal")]


def test_shared_prefix_packs_more_examples_within_max_length():
    examples = tokenize_conversations(tiny_tokenizer(), read_conversations(SAME_START), max_length=512)
    size = sum(len(e.input_ids) for e in examples[:3])
    plain = make_rows(examples, size, packing=True)
    shared = make_rows(examples, size, packing=True, share_prefix=True)
    assert len(shared) < len(plain) and all(row_length(r) <= size for r in shared)
    assert sorted(map(id, sum(shared, []))) == sorted(map(id, examples))  # every example once
    p = shared_prefix(shared[0])
    text = tiny_tokenizer().decode(shared[0][0].input_ids[:p])
    assert text.endswith("Extract the colour from this message\n\nI want ")  # the common start, all of it
    assert all(e.labels[p] == IGNORE for e in shared[0])  # the prefix stops before every target and its prompt


def test_shared_prefix_never_holds_a_target_or_the_token_before_one():
    a = Example([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9])
    b = Example([5, 6, 7, 8, 4], [IGNORE, IGNORE, IGNORE, 8, 4])
    assert shared_prefix([a, b]) == 1  # 5 6 7 are common, but a's first target is at index 2
    assert shared_prefix([a]) == 0 and shared_prefix([b, b]) == 2


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_shared_prefix_row_gives_each_example_its_own_logits(make):
    model = make()
    examples = tokenize_conversations(tiny_tokenizer(), read_conversations(SAME_START), max_length=512)
    rows = make_rows(examples, 512, packing=True, share_prefix=True)
    assert len(rows) == 1
    batch = collate(rows, pad_id=0, share_prefix=True)
    p = int(batch["prefix_lengths"][0])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items()
                          if k not in ("labels", "segment_ids", "prefix_lengths")}).logits[0]
        start = p
        for e in examples:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(logits[:p], alone[:p], atol=1e-5, rtol=1e-5)
            end = start + len(e.input_ids) - p
            torch.testing.assert_close(logits[start:end], alone[p:], atol=1e-5, rtol=1e-5)
            assert batch["labels"][0, start:end].tolist() == e.labels[p:]
            start = end

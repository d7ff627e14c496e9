"""Multi-turn conversations: OpenAI ``messages`` and ShareGPT ``conversations`` rows, the loss on every assistant
turn, checked against the chat template's own rendering; malformed turns named by file and row."""

from __future__ import annotations

import json

import pytest
from conftest import requires_bundled, tiny_llama, tiny_tokenizer

from peftkit.data.formats import ReadStats, read_conversations
from peftkit.data.sequences import IGNORE, TEMPLATES, TokenizeStats, tokenize_conversations
from peftkit.errors import PeftkitError

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?\nShow it."},
    {"role": "assistant", "content": "2+2 = 4.\n\nThat is all."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome :)"},
]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(messages):
    return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages]}


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def target_spans(example):
    """The runs of consecutive target tokens, as token-id lists."""
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_sharegpt_and_openai_rows_read_the_same(tmp_path):
    no_system = CHAT[1:5]
    path = write_jsonl(tmp_path / "chat.jsonl", [sharegpt(CHAT), {"messages": no_system}, sharegpt(no_system)])
    convs = read_conversations(path)
    assert convs == [CHAT, no_system, no_system]
    # a mapped field name for either layout
    assert read_conversations([{"dialog": CHAT}], field_map={"messages": "dialog"}) == [CHAT]
    assert read_conversations([{"turns": sharegpt(CHAT)["conversations"]}],
                              field_map={"conversations": "turns"}) == [CHAT]


def check_against_template(tok, template, end_of_turn, conv):
    """The example's tokens are the template's rendering tokenized; its targets are the assistant turns."""
    [ex] = tokenize_conversations(tok, [conv], max_length=4096, template=template)
    rendered = tok.apply_chat_template(conv, chat_template=TEMPLATES.get(template), tokenize=True)
    rendered = rendered if isinstance(rendered, list) else rendered["input_ids"]
    assert ex.input_ids == rendered
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert [tok.decode(span) for span in target_spans(ex)] == [a + end_of_turn for a in answers]


@pytest.mark.parametrize("template", [None, "alpaca"])
def test_every_assistant_turn_is_a_target_tiny_tokenizer(template):
    tok = tiny_tokenizer()  # its own template is chatml
    for conv in (CHAT, CHAT[1:], CHAT[1:3]):
        check_against_template(tok, template, "<|im_end|>", conv)


@requires_bundled
@pytest.mark.parametrize("template", [None, "chatml", "alpaca"])
def test_every_assistant_turn_is_a_target_bundled_tokenizer(template):
    """SmolLM2's own template (which adds a default system prompt), peftkit's chatml and alpaca templates."""
    from peftkit.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    end = tok.eos_token if template == "alpaca" else "<|im_end|>"
    for conv in (CHAT, CHAT[1:]):
        check_against_template(tok, template, end, conv)


@requires_bundled
def test_an_answer_opening_with_whitespace_keeps_the_inference_prompt():
    """Where an answer opens with whitespace that the BPE would merge with the template's newline before it, the
    prompt keeps its inference-time tokens (the one place where the whole-text tokenization differs)."""
    from peftkit.data.sequences import prompt_text
    from peftkit.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    conv = [*CHAT[1:3], {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "  Welcome."}]
    [ex] = tokenize_conversations(tok, [conv], max_length=4096)
    spans = target_spans(ex)
    assert [tok.decode(s) for s in spans] == ["Hello! How can I help?<|im_end|>", "  Welcome.<|im_end|>"]
    last = next(i for i in range(len(ex.labels)) if ex.labels[i:i + len(spans[1])] == spans[1])
    inference = tok(prompt_text(tok, conv[:3]), add_special_tokens=False)["input_ids"]
    assert ex.input_ids[:last] == inference
    rendered = tok.apply_chat_template(conv, tokenize=True)  # the premise: the whole text merges "\n" + "  "
    assert ex.input_ids != (rendered if isinstance(rendered, list) else rendered["input_ids"])


def test_malformed_turns_name_file_and_row(tmp_path):
    good = sharegpt(CHAT[1:3])
    bad = {
        2: ({"conversations": [{"from": "bing", "value": "x"}, {"from": "gpt", "value": "y"}]},
            r"conversations\[0\]: unknown from 'bing' \(known: system, human, user, gpt, assistant\)"),
        3: ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n"}]},
            r"messages\[1\] \(assistant\): empty 'content'"),
        4: ({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]},
            r"conversations\[0\] \(user\): empty 'value'"),
        5: ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]},
            r"messages\[1\] \(assistant\): 'content' is a int, not a string"),
        6: ({"conversations": [{"from": "human", "value": "q"}]}, "field 'conversations' has no assistant turn"),
        7: ({"messages": []}, "field 'messages' must be a non-empty list"),
        8: ({"conversations": ["hello"]}, r"conversations\[0\] is a str, not a message object"),
    }
    for row, (record, message) in bad.items():
        path = write_jsonl(tmp_path / f"bad{row}.jsonl", [good] * (row - 1) + [record, good])
        with pytest.raises(PeftkitError, match=rf"bad{row}.jsonl: line {row}: {message}"):
            read_conversations(path)
    path = write_jsonl(tmp_path / "mixed.jsonl", [good] + [record for record, _ in bad.values()] + [good])
    stats = ReadStats()
    assert len(read_conversations(path, skip_bad_rows=True, stats=stats)) == 2
    assert stats.skipped == len(bad) and stats.kept == [1, len(bad) + 2]


# A template that requires user/assistant alternation, as Llama-2 and Mistral templates do.
STRICT = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '<|im_start|>user\n' + m['content'] + '<|im_end|>\n<|im_start|>assistant\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
)


def test_a_conversation_the_template_rejects_names_file_and_row(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = STRICT
    alternating = {"messages": CHAT[1:5]}
    two_users = {"messages": [CHAT[1], CHAT[3], CHAT[4]]}
    path = write_jsonl(tmp_path / "turns.jsonl", [alternating, two_users, alternating])
    stats = ReadStats()
    convs = read_conversations(path, stats=stats)
    with pytest.raises(PeftkitError, match="turns.jsonl: line 2: the chat template rejects this conversation: "
                                           "Conversation roles must alternate"):
        tokenize_conversations(tok, convs, 512, where=stats.where)
    tok_stats = TokenizeStats()
    examples = tokenize_conversations(tok, convs, 512, stats=tok_stats, where=stats.where, skip_rejected=True)
    assert len(examples) == 2 and tok_stats.rejected == 1
    # the accepted conversations still match the template's rendering
    check_against_template(tok, None, "<|im_end|>", CHAT[1:5])


def test_trainer_learns_from_a_sharegpt_file(tmp_path):
    """A new user's run: a ShareGPT JSONL file with system prompts and several turns, straight into train."""
    import torch

    from peftkit.train import TrainConfig, Trainer

    rows = []
    for i in range(40):
        a, b = i % 5, (i * 3) % 7
        rows.append(sharegpt([{"role": "system", "content": "Echo twice."},
                              {"role": "user", "content": f"{a}"}, {"role": "assistant", "content": f"{a}{a}"},
                              {"role": "user", "content": f"{b}"}, {"role": "assistant", "content": f"{b}{b}"}]))
    path = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    cfg = TrainConfig.from_dict(dict(data=str(path), output_dir=str(tmp_path / "run"), precision="fp32", batch_size=4,
                                     lr=1e-2, method="lora", method_config={"r": 4}, max_length=128, progress=False,
                                     packing=False, warmup_ratio=0.0, epochs=2.0))
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # a flat random head cannot show learning (see test_train.sharp_llama)
    trainer = Trainer(cfg, model=model, tokenizer=tiny_tokenizer())
    # both answers of every conversation are targets: 2 turns x (2 digits + <|im_end|>)
    assert trainer.data.tok_stats.examples == 40 and trainer.data.tok_stats.target_tokens == 40 * 2 * 3
    trainer.run()
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < 0.5 * losses[0]

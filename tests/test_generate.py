"""Batched generation: a batch's shared prompt prefix run once gives the answers each prompt gets alone."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer

import peftkit.generation as gen
from peftkit.core.adapter_io import apply_method
from peftkit.data.sequences import prompt_text

PROMPTS = ["Please answer in one word. Which colour is " + x for x in ("the sky?", "grass", "snow, mostly?", "a")]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method", [None, "lora", "prompt_tuning"])
def test_shared_prefix_generation_equals_one_prompt_at_a_time(make, method, monkeypatch):
    torch.manual_seed(0)
    model, tok = make(), tiny_tokenizer()
    if method:
        apply_method(model, method, {"num_virtual_tokens": 3} if method == "prompt_tuning" else {"r": 4})
    calls = []
    real = gen._common_prefix
    monkeypatch.setattr(gen, "_common_prefix", lambda rows: calls.append(real(rows)) or calls[-1])
    batched = gen.generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4)
    alone = [gen.generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone
    if method == "prompt_tuning":  # its virtual tokens live in the cache: no shared prefix is seeded
        assert calls == []
    else:
        assert calls[0] >= gen.MIN_SHARED  # the prefix was shared in the batched call


ANSWERS = {"Snow colour?": "white", "Lake colour?": "blue!"}  # prompts of one length: no padding in training


@functools.cache
def parrot():
    """A tiny Llama trained to answer each prompt of `ANSWERS` with its answer, then ``<|im_end|>`` as plain text
    (a tokenizer without ChatML tokens), then junk: only stopping on the end text ends its answer, EOS never comes."""
    tok = tiny_tokenizer(chatml_tokens=False)
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.tensor([tok(prompt_text(tok, [{"role": "user", "content": q}]) + a + "<|im_end|>\n" + "zq" * 12,
                            add_special_tokens=False)["input_ids"] for q, a in ANSWERS.items()])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):  # memorised after about 40
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return model.eval(), tok


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_stops_on_end_of_turn_text_that_is_no_special_token(num_beams, monkeypatch):
    """chatml on a tokenizer without ChatML tokens: ``<|im_end|>`` is ten plain tokens, not EOS."""
    model, tok = parrot()
    prompts = list(ANSWERS)
    # without the stop text, the model runs on past it
    encoded = tok(prompt_text(tok, [{"role": "user", "content": prompts[0]}]), return_tensors="pt",
                  add_special_tokens=False)
    raw = model.generate(**encoded, max_new_tokens=30, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    assert tok.decode(raw[0, encoded["input_ids"].shape[1]:]).startswith("white<|im_end|>\nzqzq")
    outputs = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: outputs.append(out := real(**kw)) or out)
    batched = gen.generate(model, tok, prompts, max_new_tokens=30, batch_size=2, num_beams=num_beams)
    assert batched == list(ANSWERS.values())
    assert outputs[0].shape[1] - encoded["input_ids"].shape[1] < 30  # stopped, not cut at max_new_tokens
    assert [gen.generate(model, tok, [p], max_new_tokens=30, num_beams=num_beams)[0] for p in prompts] == batched

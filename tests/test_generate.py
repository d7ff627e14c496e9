"""Batched generation: a batch's shared prompt prefix run once gives the answers each prompt gets alone."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer

from peftkit.core.adapter_io import apply_method
from peftkit.eval import generate as gen

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

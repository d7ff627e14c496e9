"""Per-example attention for packed rows: the kernel, and the training loss with it switched on or off."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer

from peftkit.core.adapter_io import apply_method
from peftkit.data.formats import read_conversations
from peftkit.data.sequences import collate, make_rows, tokenize_conversations
from peftkit.train.packed_attention import (
    NAME,
    CausalAttention,
    PackedCausalAttention,
    segment_bounds,
    use_packed_attention,
)
from peftkit.train.trainer import sequence_loss

CONVS = [{"instruction": "q" * (3 + 2 * i), "output": "answer " * (i + 1)} for i in range(7)]


def reference(q, k, v, scale):
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    n, m = q.shape[1], k.shape[1]
    scores = (q @ k.transpose(-1, -2)) * scale
    # query i is key m - n + i: it sees the shared prefix (the first m - n keys) and itself causally
    scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1 + m - n), float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("heads,kv_heads,n,prefix", [(4, 4, 9, 0), (6, 2, 13, 0), (3, 1, 1, 0), (4, 2, 7, 5),
                                                      (2, 2, 1, 3)])
def test_causal_attention_matches_reference_forward_and_backward(heads, kv_heads, n, prefix):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, length, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for h, length in ((heads, n), (kv_heads, n + prefix), (kv_heads, n + prefix)))
    torch.autograd.gradcheck(lambda a, b, c: CausalAttention.apply(a, b, c, 0.3), (q, k, v))
    out = CausalAttention.apply(q, k, v, 0.3)
    torch.testing.assert_close(out, reference(q, k, v, 0.3))
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    mine = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(reference(q, k, v, 0.3), (q, k, v), grad)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_packed_attention_gradients_with_a_shared_prefix_and_padding():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1], [0, 0, 1, 1, 1, 1, 1, -1, -1]])
    segments = segment_bounds(ids, torch.tensor([3, 0]))
    torch.autograd.gradcheck(lambda a, b, c: PackedCausalAttention.apply(a, b, c, segments, 0.3), (q, k, v))
    out = PackedCausalAttention.apply(q, k, v, segments, 0.3)  # (batch, L, heads, d)
    ref = reference(q[0, :, 5:8], torch.cat([k[0, :, :3], k[0, :, 5:8]], 1), torch.cat([v[0, :, :3], v[0, :, 5:8]], 1),
                    0.3)
    torch.testing.assert_close(out[0, 5:8].transpose(0, 1), ref)
    assert out[0, 8].abs().sum() == 0 and out[1, 7:].abs().sum() == 0


def test_segment_bounds():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 2, 3, -1, -1, -1, -1]])
    assert segment_bounds(ids) == (8, (((0, 3), (3, 5), (5, 6)), ((0, 8),), ((0, 1), (1, 2), (2, 3), (3, 4))),
                                   (0, 0, 0))
    assert segment_bounds(ids, torch.tensor([3, 0, 1]))[2] == (3, 0, 1)


def batches(packing: bool, share_prefix: bool = False, convs=CONVS):
    examples = tokenize_conversations(tiny_tokenizer(), read_conversations(convs), max_length=128)
    rows = make_rows(examples, max_length=128, packing=packing, share_prefix=share_prefix)
    assert packing == any(len(r) > 1 for r in rows)
    return collate(rows, pad_id=0, share_prefix=share_prefix)


def loss_and_grads(model, batch):
    model.zero_grad()
    loss, n = sequence_loss(model, batch)
    (loss / n).backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def tiny_qwen2() -> torch.nn.Module:  # biases on q/k/v, grouped-query attention
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def tiny_mistral_sliding() -> torch.nn.Module:  # a sliding window shorter than the rows: must take the fallback
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, sliding_window=4))


def tiny_falcon() -> torch.nn.Module:
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    return FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          new_decoder_architecture=True, num_kv_heads=2, bias=False))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("method", ["full", "lora", "prompt_tuning", "prefix_tuning", "houlsby"])
def test_training_loss_and_gradients_equal_with_and_without_packed_attention(make, packing, method):
    check_loss_and_gradients(make, packing, method)


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_mistral_sliding, tiny_falcon])
@pytest.mark.parametrize("packing", [True, False])
def test_other_architectures_same_loss_and_gradients(make, packing):
    check_loss_and_gradients(make, packing, "lora")


SHARED = [{"system": "Answer briefly.", "instruction": "Name the letter " + "xyzw"[i % 4] * (1 + i % 3),
           "output": "It is " + "xyzw"[i % 4]} for i in range(9)]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_qwen2])
@pytest.mark.parametrize("method", ["full", "lora", "prompt_tuning", "prefix_tuning", "houlsby"])
@pytest.mark.parametrize("switch", [False, True])
def test_shared_prefix_rows_give_the_same_loss_and_gradients(make, method, switch):
    """A row's shared prefix stored once (fast path and mask path) = every example packed in full."""
    shared, full = batches(True, True, SHARED), batches(True, False, SHARED)
    assert shared["prefix_lengths"].max() > 5 and shared["input_ids"].numel() < full["input_ids"].numel()
    check_loss_and_gradients(make, True, method, pair=(full, shared), switch=switch)


def check_loss_and_gradients(make, packing: bool, method: str, pair=None, switch=None) -> None:
    """The fast path (LoRA, full) and the fallback (virtual tokens: the sdpa mask path) both give the same loss;
    with `pair`, two batches of the same examples give the same loss (packed attention on if `switch`)."""
    runs = [(batches(packing), False), (batches(packing), True)] if pair is None else [(b, switch) for b in pair]
    virtual = {"num_virtual_tokens": 3}
    settings = {"lora": {"r": 4}, "prompt_tuning": virtual, "prefix_tuning": virtual}
    results = []
    for batch, packed in runs:
        model = make()
        if method != "full":
            apply_method(model, method, settings.get(method, {}))
        if packed and make is tiny_falcon:  # its attention does not go through transformers' interface
            assert not use_packed_attention(model) and model.config._attn_implementation == "sdpa"
        elif packed:
            assert use_packed_attention(model) and model.config._attn_implementation == NAME
        results.append(loss_and_grads(model, batch))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b > 0
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fast_path_is_taken_and_other_calls_are_unchanged(monkeypatch):
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    use_packed_attention(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # no boundaries given: sdpa
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), generated)
    calls = []
    attend = CausalAttention.attend
    monkeypatch.setattr(CausalAttention, "attend", lambda *a: calls.append(a[0].shape) or attend(*a))
    with torch.no_grad():
        sequence_loss(model, batches(True))
    assert calls  # one call per example per layer, never the whole row
    assert max(shape[1] for shape in calls) < batches(True)["input_ids"].shape[1]


def test_gpt2_attention_dropout_in_training_runs():
    model = tiny_gpt2()
    model.config.attn_pdrop = 0.5
    use_packed_attention(model)
    model.train()
    loss, n = sequence_loss(model, batches(True))
    assert torch.isfinite(loss) and n > 0

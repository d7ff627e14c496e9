"""Per-example attention for packed rows: the kernel, and the training loss with it switched on or off."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from peftkit.core.adapter_io import apply_method
from peftkit.data.formats import read_conversations
from peftkit.data.sequences import collate, make_rows, tokenize_conversations
from peftkit.train.loss import sequence_loss
from peftkit.train.packed_attention import (
    NAME,
    CausalAttention,
    PackedCausalAttention,
    segment_bounds,
    use_packed_attention,
)

CONVS = [{"instruction": "q" * (3 + 2 * i), "output": "answer " * (i + 1)} for i in range(7)]


def reference(q, k, v, scale, window=None):
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    n, m = q.shape[1], k.shape[1]
    scores = (q @ k.transpose(-1, -2)) * scale
    # query i is key m - n + i: it sees the shared prefix (the first m - n keys) and itself causally
    back = (torch.arange(n)[:, None] + m - n) - torch.arange(m)[None, :]  # how far back each key is
    hidden = (back < 0) | (back >= window if window is not None else False)
    return torch.softmax(scores.masked_fill(hidden, float("-inf")), -1) @ v


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


@pytest.mark.parametrize("heads,kv_heads,n,prefix,window", [(4, 4, 9, 0, 1), (6, 2, 13, 0, 4), (4, 2, 7, 5, 3),
                                                             (4, 2, 7, 5, 9), (2, 2, 1, 3, 2), (3, 1, 6, 0, 40)])
def test_causal_attention_with_a_sliding_window_matches_reference(heads, kv_heads, n, prefix, window):
    """A query sees its last `window` keys (itself included), the shared prefix's among them."""
    from peftkit.train.packed_attention import _one_example

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, length, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for h, length in ((heads, n), (kv_heads, n + prefix), (kv_heads, n + prefix)))
    torch.autograd.gradcheck(lambda a, b, c: CausalAttention.apply(a, b, c, 0.3, window), (q, k, v))
    out, ref = CausalAttention.apply(q, k, v, 0.3, window), reference(q, k, v, 0.3, window)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(_one_example(q, k, v, 0.3, 0.0, window), ref)  # the per-example sdpa path (CUDA)
    if window < n + prefix:
        assert not torch.allclose(ref, reference(q, k, v, 0.3))  # the window changes the result
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("window", [None, 2])
def test_packed_attention_gradients_with_a_shared_prefix_and_padding(window):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1], [0, 0, 1, 1, 1, 1, 1, -1, -1]])
    segments = segment_bounds(ids, torch.tensor([3, 0]))
    torch.autograd.gradcheck(lambda a, b, c: PackedCausalAttention.apply(a, b, c, segments, 0.3, window), (q, k, v))
    out = PackedCausalAttention.apply(q, k, v, segments, 0.3, window)  # (batch, L, heads, d)
    ref = reference(q[0, :, 5:8], torch.cat([k[0, :, :3], k[0, :, 5:8]], 1), torch.cat([v[0, :, :3], v[0, :, 5:8]], 1),
                    0.3, window)
    torch.testing.assert_close(out[0, 5:8].transpose(0, 1), ref)
    torch.testing.assert_close(out[1, 2:7].transpose(0, 1), reference(q[1, :, 2:7], k[1, :, 2:7], v[1, :, 2:7], 0.3,
                                                                      window))
    assert out[0, 8].abs().sum() == 0 and out[1, 7:].abs().sum() == 0


def many_examples(seed: int = 2):
    """Three rows of examples from 1 to 17 tokens, two of them with a shared prefix (their first segment), padding
    at the ends."""
    g = torch.Generator().manual_seed(seed)
    width, ids = 60, torch.full((3, 60), -1)
    for r in range(3):
        start = s = 0
        while True:
            n = int(torch.randint(1, 18, (1,), generator=g))
            if start + n > width - 2:
                break
            ids[r, start:start + n] = s
            start, s = start + n, s + 1
    return ids, ids.eq(0).sum(1) * torch.tensor([1, 0, 1])


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("slack, max_scores", [(0.5, 2**24), (1.5, 2**24), (1e9, 2**24), (1e9, 4000)])
def test_packed_attention_equals_each_example_alone_however_it_groups(window, slack, max_scores, monkeypatch):
    """Each example (and its shared prefix) attended alone = the grouped kernel, from one example per group to
    all in one, forward and backward; padding rows of the output and gradients are zero."""
    import peftkit.train.packed_attention as pa

    ids, prefixes = many_examples()
    segments = segment_bounds(ids, prefixes)
    monkeypatch.setattr(pa, "SLACK", slack)
    monkeypatch.setattr(pa, "MAX_SCORES", max_scores)
    pa._plan.cache_clear()
    groups = pa._plan(segments, 6, 2, window, torch.device("cpu"))
    pieces = list(PackedCausalAttention._pieces(segments))
    assert sum(group.bias.shape[0] for group in groups) == len(pieces) > 20
    assert len(groups) == len(pieces) if slack < 1 else len(groups) < len(pieces)  # < 1: none join
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 6, 60, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 2, 60, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = PackedCausalAttention.apply(q, k, v, segments, 0.3, window)
    expected = torch.zeros_like(out)
    for r, start, end, prefix in pieces:
        keys = [torch.cat([t[r, :, :prefix], t[r, :, start:end]], 1) for t in (k, v)]
        expected[r, start:end] = reference(q[r, :, start:end], *keys, 0.3, window).transpose(0, 1)
    torch.testing.assert_close(out, expected)
    assert out[ids < 0].abs().sum() == 0
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    mine = torch.autograd.grad(out, (q, k, v), grad)
    for a, b in zip(mine, torch.autograd.grad(expected, (q, k, v), grad), strict=True):
        torch.testing.assert_close(a, b)
    for t in mine:
        assert t.transpose(1, 2)[ids < 0].abs().sum() == 0


def test_groups_hold_every_example_once_within_the_padding_bound():
    import peftkit.train.packed_attention as pa

    ids, prefixes = many_examples(5)
    pieces = list(PackedCausalAttention._pieces(segment_bounds(ids, prefixes)))
    groups = pa._grouped(pieces, heads=4)
    assert sorted(p for group in groups for p in group) == sorted(pieces)
    for group in groups:
        n = [end - start for _, start, end, _ in group]
        m = [end - start + prefix for _, start, end, prefix in group]
        padded = len(group) * max(n) * max(m)
        assert len(group) == 1 or (padded <= pa.SLACK * sum(a * b for a, b in zip(n, m, strict=True))
                                   and 4 * padded <= pa.MAX_SCORES)
    assert len(groups) < len(pieces)


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


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_falcon])
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


def calls_attention_interface(make) -> bool:
    """Whether a model built by `make` runs its attention through a function registered in transformers'
    AttentionInterface, found by running one: Falcon did not before transformers 5.2x and does after."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("peftkit_test_spy", spy)
    AttentionMaskInterface.register("peftkit_test_spy", sdpa_mask)
    model = make()
    try:
        model.set_attn_implementation("peftkit_test_spy")
    except (ValueError, NotImplementedError):  # a model that keeps its own attention may refuse outright
        return False
    with torch.no_grad():
        model(input_ids=torch.arange(3, 9).unsqueeze(0))
    return bool(calls)


def test_attention_interface_probe_sees_a_model_that_uses_it():
    assert calls_attention_interface(tiny_llama)  # the probe is not blind


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
        if packed:  # switched exactly when the model calls attention through transformers' interface
            expected = calls_attention_interface(make)
            assert use_packed_attention(model) == expected
            assert model.config._attn_implementation == (NAME if expected else "sdpa")
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
    import peftkit.train.packed_attention as pa

    # the PyTorch path (the compiled kernel off): a few batched products per layer
    monkeypatch.setattr(pa.attention_native, "attention_kernel", lambda: None)
    calls = []
    attend = pa._attend
    monkeypatch.setattr(pa, "_attend", lambda *a: calls.append(a[3].shape) or attend(*a))
    batch = batches(True)
    with torch.no_grad():
        sequence_loss(model, batch)
    examples = int(batch["segment_ids"].max(1).values.add(1).sum())
    layers = model.config.num_hidden_layers
    # one call per group of similar examples per layer (fewer than one per example), never the whole row
    assert calls and len(calls) % layers == 0 and len(calls) < layers * examples
    assert max(shape[-1] for shape in calls) < batch["input_ids"].shape[1]


def test_gpt2_attention_dropout_in_training_runs():
    model = tiny_gpt2()
    model.config.attn_pdrop = 0.5
    use_packed_attention(model)
    model.train()
    loss, n = sequence_loss(model, batches(True))
    assert torch.isfinite(loss) and n > 0


# ---------------------------------------------------------------- sliding windows
WINDOW = 6  # shorter than every example below, and than the shared prefix


def tiny_gemma3(**overrides) -> torch.nn.Module:  # sliding and full layers, as Gemma 3 (five sliding to one full)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    settings = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, sliding_window=WINDOW, pad_token_id=0,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return Gemma3ForCausalLM(Gemma3TextConfig(**settings | overrides))


def tiny_mistral() -> torch.nn.Module:  # one sliding window on every layer
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW))


def adapted(make, method: str) -> torch.nn.Module:
    """`make()` with `method` applied and its trainable parameters random (an adapter at init changes nothing)."""
    model = make()
    apply_method(model, method, {"num_virtual_tokens": 3} if "tuning" in method else {"r": 4})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


def alone(model, examples):
    """Plain transformers: each example in its own forward call (no padding, no packing); loss and gradients."""
    import torch.nn.functional as F

    model.zero_grad()
    total = 0.0
    for e in examples:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        total = total + F.cross_entropy(logits.float(), torch.tensor(e.labels[1:]), ignore_index=-100, reduction="sum")
    n = sum(e.num_targets for e in examples)
    (total / n).backward()
    return total.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [tiny_gemma3, tiny_mistral])
@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("share_prefix", [False, True])
def test_packed_rows_honour_sliding_windows(make, method, share_prefix, monkeypatch):
    """Packed loss and gradients == unpacked == each example alone in plain transformers, for examples longer than
    the window: LoRA takes the fast path (per-example kernel), virtual tokens the mask path (sdpa, windowed mask)."""
    import peftkit.train.packed_attention as pa

    examples = tokenize_conversations(tiny_tokenizer(), read_conversations(SHARED if share_prefix else CONVS), 128)
    assert min(len(e.input_ids) for e in examples) > 2 * WINDOW
    packed = collate(make_rows(examples, 128, True, share_prefix), 0, share_prefix=share_prefix)
    assert packed["input_ids"].shape[0] < len(examples)
    if share_prefix:
        assert packed["prefix_lengths"].max() > WINDOW
    unpacked = collate(make_rows(examples, 128, False), 0)
    model = adapted(make, method)
    expected, n, expected_grads = alone(model, examples)
    assert use_packed_attention(model)
    fast, masked = [], []  # the windows each path applied
    plan, window_mask = pa._plan, pa._window_mask
    monkeypatch.setattr(pa, "_plan", lambda *a: fast.append(a[3]) or plan(*a))
    monkeypatch.setattr(pa, "_window_mask", lambda *a: masked.append(a[2]) or window_mask(*a))
    native = pa.attention_native.forward  # full-attention layers go to the compiled kernel where it is built
    monkeypatch.setattr(pa.attention_native, "forward", lambda *a: fast.append(None) or native(*a))
    for batch in (packed, unpacked):
        loss, count, grads = loss_and_grads(model, batch)
        assert count == n
        torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-5)
        assert grads.keys() == expected_grads.keys() and grads
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    if method == "lora":
        assert set(fast) == ({WINDOW, None} if make is tiny_gemma3 else {WINDOW}) and not masked
    else:
        assert set(masked) == {WINDOW} and not fast


def test_packed_rows_without_windows_in_their_mask_are_refused():
    """Plain sdpa would give every layer the packed mask without a window: the loss refuses the batch."""
    from peftkit.errors import PeftkitError

    model = tiny_mistral()
    with pytest.raises(PeftkitError, match="sliding windows.*use_packed_attention"):
        sequence_loss(model, batches(True))
    sequence_loss(model, batches(False))  # one example per row: transformers' own windowed masks


def test_the_window_the_layer_passes_must_agree_with_the_config():
    from peftkit.errors import PeftkitError

    model = tiny_gemma3()
    use_packed_attention(model)
    model.config.sliding_window = WINDOW + 1  # the layers keep the window they were built with
    with pytest.raises(PeftkitError, match=f"passes sliding_window={WINDOW} but its config gives {WINDOW + 1}"):
        sequence_loss(model, batches(True))


def test_attention_windows_are_read_from_the_config():
    from transformers import Gemma3Config, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    from peftkit.train.packed_attention import attention_windows

    assert attention_windows(Gemma3TextConfig(num_hidden_layers=7, sliding_window=5)) == (5,) * 5 + (None, 5)
    assert attention_windows(Gemma3Config(text_config={"num_hidden_layers": 2, "sliding_window": 3})) == (3, 3)
    # Qwen2: use_sliding_window, and the window only from layer max_window_layers on
    assert attention_windows(Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=5,
                                         max_window_layers=2)) == (None, None, 5, 5)
    assert attention_windows(Qwen2Config(num_hidden_layers=2, sliding_window=5)) == (None, None)
    assert attention_windows(MistralConfig(num_hidden_layers=2, sliding_window=5)) == (5, 5)
    assert attention_windows(MistralConfig(num_hidden_layers=2, sliding_window=None)) == (None, None)
    assert attention_windows(LlamaConfig(num_hidden_layers=2)) == (None, None)
    assert attention_windows(GPT2Config(n_layer=3)) == (None, None, None)


def chunked_llama4():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, intermediate_size_mlp=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_chunk_size=8, num_local_experts=1,
        pad_token_id=0))


def test_patterns_packed_rows_cannot_honour_are_named():
    from transformers import Qwen3NextConfig

    from peftkit.errors import PeftkitError
    from peftkit.train.packed_attention import attention_windows, packing_problem

    assert packing_problem(chunked_llama4()) == "Llama4TextConfig has chunked_attention layers, which packed rows " \
                                                "cannot honour"
    with pytest.raises(PeftkitError, match="linear_attention"):
        attention_windows(Qwen3NextConfig(num_hidden_layers=4))
    assert "bidirectional" in packing_problem(tiny_gemma3(use_bidirectional_attention=True))
    broken = tiny_gemma3()
    broken.config.sliding_window = None
    assert packing_problem(broken) == "Gemma3TextConfig has sliding_attention layers but sliding_window=None"
    for fine in (tiny_llama(), tiny_gpt2(), tiny_gemma3()):
        use_packed_attention(fine)
        assert packing_problem(fine) is None
    assert "sliding windows" in packing_problem(tiny_gemma3())  # not switched on


@pytest.mark.parametrize("make, packed", [(chunked_llama4, False), (tiny_gemma3, True)])
def test_the_trainer_turns_packing_off_with_one_line_when_it_cannot_be_honoured(tmp_path, capsys, make, packed):
    import json

    from peftkit.train import TrainConfig, Trainer

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in CONVS * 2))
    cfg = TrainConfig.from_dict(dict(data=str(data), output_dir=str(tmp_path / "run"), precision="fp32", batch_size=2,
                                     method="lora", method_config={"r": 4, "target_modules": ["q_proj", "v_proj"]},
                                     max_length=128, progress=False,
                                     packing=True, max_steps=1, eval_fraction=0.0))
    trainer = Trainer(cfg, model=make(), tokenizer=tiny_tokenizer())
    lines = [line for line in capsys.readouterr().err.splitlines() if "packing" in line]
    assert trainer.data.packing is packed and any(len(r) > 1 for r in trainer.data.rows) is packed
    assert lines == ([] if packed else ["peftkit: packing off: Llama4TextConfig has chunked_attention layers, which "
                                        "packed rows cannot honour"])
    assert trainer.run().steps == 1

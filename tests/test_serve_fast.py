"""The server's compiled decode step (`peftkit.serve.fast`, `peftkit.serve.native`): its kernels against their
PyTorch references, each row's result independent of the other rows, and greedy answers equal to the model's own
forward pass (the fallback path) and to HF generate, in fp32 and bf16, with and without a LoRA adapter."""

from __future__ import annotations

import platform

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_qwen2, tiny_tokenizer

from peftkit.core.native import cpu_flags
from peftkit.serve import native
from peftkit.serve.batch import DecodeBatch
from peftkit.serve.decoder import TextStream
from peftkit.serve.engine import Engine
from peftkit.serve.lora_batch import LoRAWeights
from peftkit.serve.request import Generation, SamplingParams

pytestmark = pytest.mark.skipif(not native.available(), reason="the decode kernels are not built here")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [8, 33, 64, 100, 577])
def test_linear_equals_reference_and_each_row_its_own(dtype, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(9, k, generator=g).to(dtype)
    w = torch.randn(37, k, generator=g).to(dtype)
    y = native.linear(x, w)
    ref = native.linear_reference(x, w)
    tol = 1e-4 * k if dtype == torch.float32 else 0.02 * ref.float().abs().max().item()
    assert torch.allclose(y.float(), ref.float(), atol=tol, rtol=1e-2)
    for start in range(9):  # any slice of the rows: bit for bit the same rows
        for n in (1, 2, 4, 5):
            if start + n <= 9:
                assert torch.equal(native.linear(x[start:start + n], w), y[start:start + n]), (start, n)


def test_linear_refuses_operands_that_do_not_fit():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        native.linear(x, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="weight"):
        native.linear(x, torch.randn(3, 9))
    with pytest.raises(ValueError, match="x must be"):
        native.linear(x.double(), w.double())


def test_attention_writes_the_new_key_and_attends_over_the_row_only():
    g = torch.Generator().manual_seed(0)
    layers, kv_heads, dim, heads = 2, 2, 8, 4
    caches = [torch.randn(layers, 2, kv_heads, cap, dim, generator=g) for cap in (7, 12, 5)]
    positions = torch.tensor([6, 3, 0])
    q, k, v = (torch.randn(3, n, dim, generator=g) for n in (heads, kv_heads, kv_heads))
    addresses = torch.tensor([c.data_ptr() for c in caches])
    capacities = torch.tensor([c.shape[3] for c in caches])
    out = native.attention(q, k, v, addresses, capacities, positions, 1)
    for b, cache in enumerate(caches):
        n = int(positions[b]) + 1
        assert torch.equal(cache[1, 0, :, n - 1], k[b]) and torch.equal(cache[1, 1, :, n - 1], v[b])
        ref = native.attention_reference(q[b], cache[1, 0, :, :n], cache[1, 1, :, :n])
        assert torch.allclose(out[b], ref, atol=1e-5)
        alone = native.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], addresses[b:b + 1], capacities[b:b + 1],
                                 positions[b:b + 1], 1)
        assert torch.equal(alone[0], out[b])
    with pytest.raises(ValueError, match="positions"):
        native.attention(q, k, v, addresses, capacities, torch.tensor([7, 0, 0]), 0)


def random_lora(model: torch.nn.Module, seed: int) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    layers = {name: ((torch.randn(4, m.in_features, generator=g) * 0.3).to(dtype),
                     (torch.randn(m.out_features, 4, generator=g) * 0.3).to(dtype))
              for name, m in model.named_modules() if name.endswith(("q_proj", "v_proj", "down_proj"))}
    return LoRAWeights("random", 4, 2.0, layers)


def decode(model: torch.nn.Module, fast: bool, prompts: list[list[int]], slots: list[int], steps: int = 10,
           forced: list[list[int]] | None = None):
    """Greedy token ids of each prompt decoded together, and the batch used (fast path or the model's forward);
    with `forced`, each row is fed those tokens instead, and the logits of every step come back instead of ids."""
    engine = Engine(model, tiny_tokenizer(), "base", max_batch=16)
    engine.add_adapter("lora", random_lora(model, 1))
    engine.batch = batch = DecodeBatch(model, engine.lora, 0, engine.stats, fast=fast)
    gens = [Generation("base", p, SamplingParams(max_tokens=steps, ignore_eos=True), lambda e: None, False,
                       TextStream(engine.tokenizer)) for p in prompts]
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    try:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = []
            for gen, slot in zip(gens, slots, strict=True):
                gen.slot = slot
                logits.append(batch.prefill(gen, 8192)[0].float())
                gen.last = int(logits[-1].argmax())
            out = [[g.last] for g in gens]
            for step in range(steps - 1):
                if forced is not None:
                    for gen, tokens in zip(gens, forced, strict=True):
                        gen.last = tokens[step]
                logits.append(batch.decode().float())
                for i, token in enumerate(logits[-1].argmax(-1).tolist()):
                    gens[i].last = token if forced is None else gens[i].last
                    out[i].append(token)
            if forced is not None:
                return torch.cat([x.reshape(-1) for x in logits]), batch
    finally:
        engine.lora.close()  # its hooks off the model again
    return out, batch


PROMPTS = [[5, 9, 17, 33, 2 + 60], [7], list(range(3, 40)), [100, 101, 102]]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_fast_decode_gives_the_forward_pass_answers_in_fp32(make):
    model = make()
    slots = [0, 1, 1, 0]
    fast, batch = decode(model, True, PROMPTS, slots)
    assert batch.fast is not None
    slow, slow_batch = decode(model, False, PROMPTS, slots)
    assert slow_batch.fast is None
    assert fast == slow
    assert fast[1] != decode(model, True, PROMPTS, [0, 0, 1, 0])[0][1]  # the adapter changes row 1's answer
    for i, prompt in enumerate(PROMPTS):  # each row alone: the same tokens
        assert decode(model, True, [prompt], [slots[i]])[0][0] == fast[i]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_fast_decode_logits_match_the_forward_pass_in_bf16(make):
    """bf16 rounds each product once more or less depending on the kernel: fed the same tokens, the fast path's
    logits stay within bf16 rounding of the forward pass's (a tiny random model's greedy answers are near-ties)."""
    model = make().to(torch.bfloat16)
    slots = [0, 1, 1, 0]
    tokens, _ = decode(model, False, PROMPTS, slots)
    forced = [t[:-1] for t in tokens]
    slow, _ = decode(model, False, PROMPTS, slots, forced=forced)
    fast, batch = decode(model, True, PROMPTS, slots, forced=forced)
    assert batch.fast is not None
    assert (fast - slow).abs().max() <= 0.05 * slow.abs().max()
    assert torch.corrcoef(torch.stack([fast, slow]))[0, 1] > 0.999
    alone = [decode(model, True, [p], [s], forced=[f])[0] for p, s, f in zip(PROMPTS, slots, forced, strict=True)]
    together = fast.view(-1, 128)  # prefill rows, then each step's rows
    n = len(PROMPTS)
    for i in range(n):
        rows = torch.cat([together[i:i + 1], together[n + i::n]])
        assert torch.equal(rows.reshape(-1), alone[i]), i  # bit for bit the row alone


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fast_decode_equals_hf_generate(dtype):
    model = tiny_llama(seed=3).to(dtype)
    prompt = PROMPTS[2]
    ids = torch.tensor([prompt])
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert decode(model, True, [prompt], [0])[0][0] == ref


def test_models_it_does_not_cover_use_the_forward_pass():
    model = tiny_gpt2()
    engine = Engine(model, tiny_tokenizer(), "base")
    assert engine.batch.fast is None


def quantized(make, dtype: torch.dtype) -> torch.nn.Module:
    from peftkit.quant.linear import quantize_model

    model = make().to(dtype)
    quantize_model(model, "nf4", block_size=32, compute_dtype=dtype)
    return model


def test_nf4_base_takes_the_fast_path_with_the_forward_pass_answers_in_fp32():
    """NF4 codes and block scales read by the kernel give the same weights as the layer's dequantized copy."""
    model = quantized(tiny_llama, torch.float32)
    slots = [0, 1, 1, 0]
    fast, batch = decode(model, True, PROMPTS, slots)
    assert batch.fast is not None
    assert fast == decode(model, False, PROMPTS, slots)[0]
    for i, prompt in enumerate(PROMPTS):
        assert decode(model, True, [prompt], [slots[i]])[0][0] == fast[i]


def test_nf4_base_logits_match_the_forward_pass_in_bf16():
    model = quantized(tiny_llama, torch.bfloat16)
    slots = [0, 1, 1, 0]
    tokens, _ = decode(model, False, PROMPTS, slots)
    forced = [t[:-1] for t in tokens]
    slow, _ = decode(model, False, PROMPTS, slots, forced=forced)
    fast, batch = decode(model, True, PROMPTS, slots, forced=forced)
    assert batch.fast is not None
    assert (fast - slow).abs().max() <= 0.05 * slow.abs().max()
    alone = decode(model, True, [PROMPTS[2]], [1], forced=[forced[2]])[0]
    together = fast.view(-1, 128)
    assert torch.equal(torch.cat([together[2:3], together[4 + 2::4]]).reshape(-1), alone)


@pytest.mark.parametrize("make", [lambda: tiny_llama(), lambda: quantized(tiny_llama, torch.float32)],
                         ids=["dense", "nf4"])
def test_generic_build_equals_this_cpus_build_in_fp32(make, tmp_path, monkeypatch):
    """The kernel built without AVX-512 (as on an AVX2-only CPU) sums every element in the same order: fp32
    logits bit for bit those of this CPU's build, for dense and NF4 weights."""
    if "avx2" not in cpu_flags().split():
        pytest.skip("the generic build is run here only on a CPU with AVX2")
    model = make()
    tokens, _ = decode(model, False, PROMPTS, [0, 1, 1, 0])
    forced = [t[:-1] for t in tokens]
    here, _ = decode(model, True, PROMPTS, [0, 1, 1, 0], forced=forced)
    generic = native.LIBRARY.build(tmp_path, extra=("-mno-avx512f",))
    assert generic.isa() == b"AVX2"
    monkeypatch.setattr(native.LIBRARY, "_loaded", (generic, "built without AVX-512"))
    there, batch = decode(model, True, PROMPTS, [0, 1, 1, 0], forced=forced)
    assert batch.fast is not None
    assert torch.equal(here, there)


def test_generic_build_gives_the_forward_pass_answers_in_bf16(tmp_path, monkeypatch):
    """Without AVX512-BF16 the bf16 weights are widened by a shift and summed by the fp32 tiles."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("-mno-avx512f is an x86 flag")
    model = tiny_llama(seed=3).to(torch.bfloat16)
    generic = native.LIBRARY.build(tmp_path, extra=("-mno-avx512f",))
    assert generic.isa() in (b"AVX2", b"generic")
    monkeypatch.setattr(native.LIBRARY, "_loaded", (generic, "built without AVX-512"))
    prompt = PROMPTS[2]
    ids = torch.tensor([prompt])
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert decode(model, True, [prompt], [0])[0][0] == ref

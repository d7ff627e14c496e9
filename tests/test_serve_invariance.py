"""Batch-invariant decoding: a request's token ids depend on its prompt, adapter and sampling settings only, never on
the batch it shares, the other rows' lengths or when it arrived (`peftkit.serve.rows`), in fp32 and in bf16.

The reference is each request served alone (one at a time, by the same engine); the batches mix prompts of other
lengths, the base model and two LoRA adapters, a seeded sampled request, and requests that arrive mid-decode.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import requires_bundled, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit.core.adapter_io import apply_method, save_adapter
from peftkit.methods.lora import lora_layers
from peftkit.serve.decoder import TextStream
from peftkit.serve.engine import Engine, Finished, SamplingParams
from peftkit.serve.lora_batch import read_lora
from peftkit.serve.request import Generation

NEW_TOKENS = 12
DTYPES = [torch.float32, torch.bfloat16]


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def save_lora(model: torch.nn.Module, folder, seed: int, settings: dict, std: float = 0.5):
    """A LoRA adapter with random (non-zero) B, so that it changes the answers."""
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    apply_method(model, "lora", settings)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0.0, std)
    return save_adapter(model, folder)


@pytest.fixture(scope="module", params=DTYPES, ids=["fp32", "bf16"])
def parts(request, tmp_path_factory):
    """(the parametrized dtype, adapter name -> folder)."""
    root = tmp_path_factory.mktemp("invariance")
    model = llama()
    folders = {"alpha": save_lora(model, root / "alpha", 1, {"r": 4}),
               "beta": save_lora(model, root / "beta", 2, {"r": 2, "target_modules": ["q_proj", "v_proj"]})}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's matmuls spend their time handing work between threads on a busy CPU
    yield request.param, folders
    torch.set_num_threads(threads)


def make_engine(parts) -> Engine:
    """An engine on a model of its own (`llama()`: the same weights each time) and both adapters."""
    dtype, folders = parts
    model = llama().to(dtype)
    engine = Engine(model, tiny_tokenizer(), "base", max_batch=16)
    for name, folder in folders.items():
        engine.add_adapter(name, read_lora(folder, model))
    return engine


@pytest.fixture(scope="module")
def engine(parts):
    engine = make_engine(parts)
    engine.start()
    yield engine
    engine.shutdown()


def jobs(n: int, seed: int = 0) -> list[tuple[str, list[int], SamplingParams]]:
    """`n` requests: prompts of 1..40 tokens, the base and both adapters in turn, every fifth one sampled (seeded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 128, (int(torch.randint(1, 41, (1,), generator=g)),), generator=g).tolist()
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.8 if i % 5 == 4 else 0.0,
                                seed=i)
        out.append((("base", "alpha", "beta")[i % 3], prompt, params))
    return out


def serve(engine: Engine, todo: list, arrivals: list[int] | None = None) -> list[list[int]]:
    """Token ids of each request. `arrivals`: None serves them one at a time; else request i is submitted once the
    engine has run `arrivals[i]` more decode steps (the zeros start together, in one batch)."""
    gens, done = {}, set()

    def submit(i: int) -> None:
        model, prompt, params = todo[i]
        gens[i] = engine.submit(model, prompt, params, lambda e, i=i: isinstance(e, Finished) and done.add(i),
                                deltas=False)

    if arrivals is None:
        for i in range(len(todo)):
            submit(i)
            wait_for(lambda i=i: i in done)
    else:
        start = engine.stats["steps"]
        with engine.hold():
            for i in [i for i, a in enumerate(arrivals) if a == 0]:
                submit(i)
        for i in sorted((i for i, a in enumerate(arrivals) if a), key=lambda i: arrivals[i]):
            wait_for(lambda i=i: engine.stats["steps"] >= start + arrivals[i])
            submit(i)
        wait_for(lambda: len(done) == len(todo))
    assert all(gens[i].generated == NEW_TOKENS for i in range(len(todo)))
    return [list(gens[i].output.detokenizer.ids) for i in range(len(todo))]


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_identical_prompts_in_batches_of_1_to_16(engine):
    for model in ("base", "alpha"):
        job = (model, jobs(1, seed=7)[0][1], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        alone = serve(engine, [job])[0]
        for n in range(1, 17):
            assert serve(engine, [job] * n, [0] * n) == [alone] * n, (model, n)


def test_different_prompts_and_adapters_in_batches_of_1_to_16(engine):
    todo = jobs(16)
    alone = serve(engine, todo)
    assert len({tuple(a) for a in alone}) >= 12  # the requests differ: a mix-up would be caught
    steps = engine.stats["mixed_steps"]
    for n in range(1, 17):
        assert serve(engine, todo[:n], [0] * n) == alone[:n], n
    assert engine.stats["mixed_steps"] > steps


def test_requests_arriving_mid_decode(engine):
    todo = jobs(12, seed=3)
    alone = serve(engine, todo)
    assert serve(engine, todo, [0, 0, 0, 0, 1, 2, 3, 3, 5, 8, 9, 11]) == alone
    assert serve(engine, todo, [0, 4, 1, 0, 7, 2, 0, 10, 3, 0, 5, 6]) == alone


def test_decode_logits_are_bit_for_bit_those_of_the_row_alone(parts):
    """Below the token ids: every row's logits, step after step, in batches of other sizes, adapters and lengths."""
    engine = make_engine(parts)  # not started: the test drives its batch
    todo = jobs(9, seed=5)
    bf16 = parts[0] == torch.bfloat16

    def logits(rows: list[int], steps: int = 4) -> dict[int, list[torch.Tensor]]:
        gens, out = {}, {i: [] for i in rows}
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            for i in rows:
                model, prompt, params = todo[i]
                gens[i] = Generation(model, prompt, params, lambda e: None, False, TextStream(engine.tokenizer))
                gens[i].slot = engine.adapters.slot(model)
                out[i].append(engine.batch.prefill(gens[i], 8192)[0].clone())
            for step in range(steps):
                for i in rows:
                    gens[i].last = (7 * step + 13 * i) % 128  # each row's own inputs, whatever the batch
                for i, row in zip(rows, engine.batch.decode(), strict=True):
                    out[i].append(row.clone())
        engine.batch.clear()
        return out

    alone = {i: logits([i])[i] for i in range(len(todo))}
    for rows in ([0, 1], [2, 0, 1], [3, 4, 5, 6, 7], list(range(9)), [8, 1, 6, 2]):
        for i, got in logits(rows).items():
            assert all(torch.equal(a, b) for a, b in zip(got, alone[i], strict=True)), (rows, i)


@pytest.mark.integration
@requires_bundled
def test_bundled_model_concurrent_equals_sequential_in_bf16(tmp_path):
    """8 mixed requests (4 chat prompts x the base and a LoRA adapter) on SmolLM2-135M-Instruct, in the precision
    the server picks on a CPU with native bf16."""
    from peftkit.hardware import resolve_precision
    from peftkit.models import BUNDLED_NAME, load_model

    precision = resolve_precision("auto", "cpu")
    if precision.name != "bf16":
        pytest.skip(f"the server picks {precision.name} here, not bf16 ({precision.reason})")
    model, tok = load_model(BUNDLED_NAME, dtype=torch.float32)
    folder = save_lora(model, tmp_path / "lora", 0, {"r": 8, "lora_alpha": 16}, std=0.02)
    model = model.to(torch.bfloat16)  # what `peftkit serve` serves: bf16 weights, bf16 autocast
    engine = Engine(model, tok, "base", max_batch=16)
    engine.add_adapter("lora", read_lora(folder, model))
    engine.start()
    try:
        prompts = ["Hello!", "What is the capital of France?", "Write a haiku about the sea.", "Name three fruits."]
        ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for p in prompts]
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
        todo = [(m, p, params) for p in ids for m in ("base", "lora")]
        alone = serve(engine, todo)
        assert alone[0] != alone[1]  # the adapter changes the answer
        assert serve(engine, todo, [0] * 8) == alone
        assert serve(engine, todo, [0, 0, 0, 1, 1, 2, 3, 5]) == alone
    finally:
        engine.shutdown()

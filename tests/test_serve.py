"""`peftkit serve`: a live server on loopback answering the real `openai` client, mixed-adapter batches equal to
serving each request alone (and to `peftkit generate`), each request prefilled alone, adapters trained by `Trainer`
answering in their recorded training context, and the paths off the happy one."""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from peftkit.cli import build_parser, main  # noqa: E402
from peftkit.commands.serve import build_engine  # noqa: E402
from peftkit.core.adapter_io import apply_method, load_adapter, save_adapter  # noqa: E402
from peftkit.core.context import TrainingContext, read_context  # noqa: E402
from peftkit.data.sequences import prompt_text  # noqa: E402
from peftkit.errors import PeftkitError  # noqa: E402
from peftkit.generation import generate  # noqa: E402
from peftkit.methods.lora import lora_layers  # noqa: E402
from peftkit.models import load_model  # noqa: E402
from peftkit.quant import QuantLinear, apply_quantization  # noqa: E402
from peftkit.serve.app import as_trained, create_app  # noqa: E402
from peftkit.serve.engine import Engine, Finished, SamplingParams  # noqa: E402
from peftkit.serve.lora_batch import LoRABatch, read_lora  # noqa: E402
from peftkit.train import TrainConfig, Trainer  # noqa: E402

KEY = "sk-test-key"
PROMPTS = ["Which colour is the sky?", "Name a fruit, please.", "2+2="]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def long_llama(seed: int = 0) -> LlamaForCausalLM:
    """conftest's tiny Llama with a long context (for generations that run long enough to cancel)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def save_lora(model: torch.nn.Module, folder: Path, seed: int, settings: dict) -> Path:
    """A LoRA adapter with random (non-zero) B, so that it changes the answers."""
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    apply_method(model, "lora", settings)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0.0, 0.5)
    return save_adapter(model, folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    model, tok = long_llama(), tiny_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    other = copy.deepcopy(model)
    apply_method(other, "prompt_tuning", {"num_virtual_tokens": 2})
    gpt2 = tiny_gpt2()
    apply_method(gpt2, "lora", {"r": 2})
    return {
        "model": root / "model",
        "alpha": save_lora(model, root / "alpha", 1, {"r": 4}),
        "beta": save_lora(model, root / "beta", 2, {"r": 2, "target_modules": ["q_proj", "v_proj"]}),
        "prompt_tuning": save_adapter(other, root / "prompt_tuning"),
        "gpt2": save_adapter(gpt2, root / "gpt2_lora"),
    }


class LiveServer:
    """uvicorn in a thread, on a loopback socket bound to a free port."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def make_engine(files, **kwargs) -> Engine:
    model, tok = load_model(files["model"])
    engine = Engine(model, tok, "base", adapter_root=files["model"].parent, **kwargs)
    for name in ("alpha", "beta"):
        engine.add_adapter(name, read_lora(files[name], model))
    return engine


@pytest.fixture(scope="module")
def live(files):
    engine = make_engine(files)
    server = LiveServer(create_app(engine, api_key=KEY))
    yield server, engine
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def http(live) -> httpx.Client:
    return httpx.Client(base_url=live[0].url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def cli_generate(files, adapter: str | None, prompts: list[str], new_tokens: int, capsys) -> list[str]:
    """The answers `peftkit generate` prints."""
    args = ["--model", str(files["model"]), "--max-new-tokens", str(new_tokens)]
    if adapter:
        args += ["--adapter", str(files[adapter])]
    return cli_answers(capsys, args, prompts)


def cli_answers(capsys, args: list[str], prompts: list[str]) -> list[str]:
    """The answers `peftkit generate ARGS PROMPTS` prints."""
    capsys.readouterr()
    assert main(["generate", "--precision", "fp32", *args, *prompts]) == 0
    out = capsys.readouterr().out
    answers = []
    for prompt in prompts:
        head = f">>> {prompt}\n"
        out = out[out.index(head) + len(head):]
        answers.append(out[:out.index("\n\n>>> ")] if "\n\n>>> " in out else out.rstrip("\n"))
    return answers


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---- the live server and the openai client


def test_two_adapters_at_once_equal_peftkit_generate(live, client, files, capsys):
    server, engine = live
    jobs = [(name, p) for name in ("base", "alpha", "beta") for p in PROMPTS]
    expected = {name: cli_generate(files, None if name == "base" else name, PROMPTS, 12, capsys)
                for name in ("base", "alpha", "beta")}
    mixed_before = engine.stats["mixed_steps"]

    def ask(job):
        name, prompt = job
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}], max_tokens=12)
        return r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        with engine.hold():  # every request waits, then all start together: one mixed batch
            futures = [pool.submit(ask, job) for job in jobs]
            wait_for(lambda: engine.load()["waiting"] == len(jobs))
        answers = [f.result() for f in futures]
    assert engine.stats["mixed_steps"] > mixed_before
    for (name, prompt), answer in zip(jobs, answers, strict=True):
        assert answer.strip() == expected[name][PROMPTS.index(prompt)], (name, prompt)
    # the adapters do change the answers, so a request routed to the wrong adapter would be caught
    assert expected["alpha"] != expected["base"] and expected["beta"] != expected["base"]
    assert expected["alpha"] != expected["beta"]


def test_streaming_equals_one_response(client):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    whole = client.chat.completions.create(model="alpha", messages=messages, max_tokens=20, extra_body={
        "ignore_eos": True})
    chunks = list(client.chat.completions.create(model="alpha", messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    plain = client.completions.create(model="beta", prompt="abc", max_tokens=8, extra_body={"ignore_eos": True})
    streamed = client.completions.create(model="beta", prompt="abc", max_tokens=8, stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_completions_equal_hf_generate_with_the_adapter(client, files):
    model, tok = load_model(files["model"])
    load_adapter(model, files["alpha"])
    ids = torch.tensor([tok("The sky is")["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    got = client.completions.create(model="alpha", prompt="The sky is", max_tokens=10)
    assert got.choices[0].text == expected
    assert got.usage.prompt_tokens == ids.shape[1]


def test_stop_strings_and_seeded_sampling(client):
    messages = [{"role": "user", "content": PROMPTS[1]}]
    extra = {"ignore_eos": True}
    full = client.chat.completions.create(model="alpha", messages=messages, max_tokens=24,
                                          extra_body=extra).choices[0].message.content
    assert len(full) >= 8
    stop = full[5:7]
    expected = full[:full.index(stop)]
    got = client.chat.completions.create(model="alpha", messages=messages, max_tokens=24, stop=[stop],
                                         extra_body=extra)
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == (expected, "stop")
    streamed = client.chat.completions.create(model="alpha", messages=messages, max_tokens=24, stop=stop,
                                              stream=True, extra_body=extra)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected

    def sample(seed):
        return client.chat.completions.create(model="beta", messages=messages, max_tokens=12, temperature=1.5,
                                              seed=seed, extra_body=extra).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_models_and_adapters_loaded_at_run_time(live, client, files):
    server, engine = live
    assert [m.id for m in client.models.list().data] == ["base", "alpha", "beta"]
    messages = [{"role": "user", "content": PROMPTS[2]}]
    with http(live) as h:
        r = h.post("/v1/adapters", json={"name": "gamma", "path": str(files["alpha"])})
        assert r.status_code == 200 and r.json()["id"] == "gamma"
        assert "gamma" in [m.id for m in client.models.list().data]
        ask = {"messages": messages, "max_tokens": 10}
        assert (client.chat.completions.create(model="gamma", **ask).choices[0].message.content
                == client.chat.completions.create(model="alpha", **ask).choices[0].message.content)
        r = h.post("/v1/adapters", json={"name": "gamma", "path": str(files["beta"])})
        assert r.status_code == 409 and "already served" in r.json()["error"]["message"]
        for path, words in [(files["prompt_tuning"], "LoRA"), (files["gpt2"], "GPT2LMHeadModel"),
                            (files["model"].parent / "nowhere", "adapter file missing")]:
            r = h.post("/v1/adapters", json={"name": "delta", "path": str(path)})
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert h.post("/v1/adapters", json={"name": "bad name!", "path": str(files["alpha"])}).status_code == 400

        # unloading waits for the adapter's request in flight; new requests for it are refused meanwhile
        with client.chat.completions.create(model="gamma", messages=messages, max_tokens=500, stream=True,
                                            extra_body={"ignore_eos": True}) as stream:
            first = next(iter(stream))
            assert first.choices[0].delta.role == "assistant"
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                deleted = pool.submit(h.delete, "/v1/adapters/gamma")
                wait_for(lambda: "gamma" not in engine.models())
                with pytest.raises(openai.NotFoundError):
                    client.chat.completions.create(model="gamma", **ask)
                assert not deleted.done()
                rest = list(stream)
                assert deleted.result().json() == {"id": "gamma", "object": "model", "deleted": True}
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
        assert h.delete("/v1/adapters/gamma").status_code == 404
        assert h.delete("/v1/adapters/base").status_code == 400
    assert [m.id for m in client.models.list().data] == ["base", "alpha", "beta"]


def test_bad_requests_get_clear_4xx(live, client):
    server, engine = live
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist; available: base, alpha, beta"):
        client.chat.completions.create(model="nope", messages=messages)
    with pytest.raises(openai.BadRequestError, match="context is 4096 tokens"):
        client.chat.completions.create(model="alpha", messages=messages, max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="alpha", messages=messages, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="alpha", messages=messages, temperature=3)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="alpha", messages=[])
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="alpha", prompt=["a", "b"])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with httpx.Client(base_url=server.url, timeout=30) as h:
        assert h.get("/v1/models").status_code == 401
        assert h.get("/health").json()["status"] == "ok"
    with http(live) as h:
        r = h.post("/v1/chat/completions", content=b'{"model": "alpha", "messages": [', headers={
            "Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = h.post("/v1/chat/completions", json={"model": "alpha"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = h.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "tool", "content": "x"}]})
        assert r.status_code == 400 and "role" in r.json()["error"]["message"]
        assert h.get("/v1/nothing").status_code == 404
    assert engine.load() == {"active": 0, "waiting": 0}


def test_full_queue_gets_429_and_shutdown_503(files):
    engine = make_engine(files, max_batch=1, max_queue=1)
    server = LiveServer(create_app(engine))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    ask = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            with engine.hold():
                accepted = [pool.submit(client.chat.completions.create, **ask) for _ in range(2)]
                wait_for(lambda: engine.load()["waiting"] == 2)
                with pytest.raises(openai.RateLimitError, match="busy"):
                    client.chat.completions.create(**ask)
            assert all(f.result().choices[0].finish_reason in ("stop", "length") for f in accepted)
        engine.close()
        with pytest.raises(openai.InternalServerError, match="shutting down") as e:
            client.chat.completions.create(**ask)
        assert e.value.status_code == 503
    finally:
        server.stop()


def test_client_that_disconnects_cancels_its_request(live):
    server, engine = live
    body = {"model": "beta", "messages": [{"role": "user", "content": "go"}], "max_tokens": 3000,
            "ignore_eos": True}
    with http(live) as h:
        cancelled = engine.stats["cancelled"]
        with h.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            wait_for(lambda: engine.load()["active"] == 1)
        wait_for(lambda: engine.load()["active"] == 0, timeout=5)
        assert engine.stats["cancelled"] == cancelled + 1
        with pytest.raises(httpx.ReadTimeout):
            h.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        wait_for(lambda: engine.load()["active"] == 0, timeout=5)
        assert engine.stats["cancelled"] == cancelled + 2


# ---- the engine and the batched LoRA directly


def base_and_two_adapters(base: str, tmp_path):
    """A tiny base ("llama", "gpt2" or "llama-nf4"), its tokenizer, and two LoRA adapters "a" and "b" saved for it."""
    from peftkit.quant import quantize_model

    model = tiny_gpt2() if base == "gpt2" else long_llama()
    if base == "llama-nf4":
        quantize_model(model, "nf4", compute_dtype=torch.float32)
    folders = {"a": save_lora(model, tmp_path / "a", 1, {"r": 4}),
               "b": save_lora(model, tmp_path / "b", 2, {"r": 2, "target_modules": "all-linear"})}
    return model, tiny_tokenizer(), folders


@pytest.mark.parametrize("base", ["llama", "gpt2", "llama-nf4"])
def test_rows_joining_and_leaving_a_mixed_batch_equal_each_request_alone(base, tmp_path):
    model, tok, folders = base_and_two_adapters(base, tmp_path)
    jobs = [("a", PROMPTS[0], 9), ("base", PROMPTS[1], 5), ("b", PROMPTS[2], 12), ("a", "x", 3), ("b", "yz", 7)]
    expected = []
    for name, prompt, n in jobs:  # peftkit generate's function, on its own copy of the model
        alone = copy.deepcopy(model)
        if name != "base":
            load_adapter(alone, folders[name])
        expected.append(generate(alone, tok, [prompt], max_new_tokens=n)[0])
    engine = Engine(model, tok, "base", max_batch=2)  # 5 requests through 2 rows: they join a running batch
    for name, folder in folders.items():
        engine.add_adapter(name, read_lora(folder, model))
    done: dict[int, Finished] = {}
    with engine.hold():
        engine.start()
        for i, (name, prompt, n) in enumerate(jobs):
            ids = tok(prompt_text(tok, [{"role": "user", "content": prompt}]), add_special_tokens=False)["input_ids"]
            engine.submit(name, ids, SamplingParams(max_tokens=n), lambda e, i=i: isinstance(e, Finished) and
                          done.__setitem__(i, e))
    wait_for(lambda: len(done) == len(jobs))
    engine.shutdown()
    assert [done[i].text.strip() for i in range(len(jobs))] == expected
    assert engine.stats["joined_running_batch"] >= 3 and engine.stats["mixed_steps"] > 0
    assert len(set(expected)) == len(expected)


def test_lora_batch_leaves_the_model_as_it_was(files):
    model, _ = load_model(files["model"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        batch = LoRABatch(model)
        batch.add("alpha", read_lora(files["alpha"], model))
        batch.select([1])
        assert not torch.allclose(model(input_ids=ids).logits, ref)
        batch.close()
        assert torch.equal(model(input_ids=ids).logits, ref)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_read_lora_refuses_what_does_not_fit(files, tmp_path):
    model, _ = load_model(files["model"])
    with pytest.raises(PeftkitError, match="uses prompt_tuning, which cannot share a batch"):
        read_lora(files["prompt_tuning"], model)
    with pytest.raises(PeftkitError, match="saved for a GPT2LMHeadModel"):
        read_lora(files["gpt2"], model)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(PeftkitError, match=r"wider/adapter_model.safetensors: model.layers.0.mlp.down_proj.lora_B"
                       r".weight has shape \(64, 4\), this LlamaForCausalLM expects \(32, 4\)"):
        read_lora(save_lora(wider, tmp_path / "wider", 0, {"r": 4}), model)


def test_cli_refuses_bad_adapters_before_listening(files, capsys):
    assert main(["serve", "--port", "0", "--model", str(files["model"]), "--adapter",
                 f"x={files['prompt_tuning']}"]) == 2
    assert "cannot share a batch" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--model", str(files["model"]), "--adapter", f"x={files['alpha']}",
                 "--adapter", f"x={files['beta']}"]) == 2
    assert "names must differ" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--adapter", "no-equals-sign"])
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_cli_server_finishes_requests_in_flight_on_sigterm(files):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": SRC, "PEFTKIT_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "serve", "--model", str(files["model"]),
                             "--adapter", f"alpha={files['alpha']}", "--port", str(port), "--precision", "fp32",
                             "--shutdown-timeout", "300"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                assert [m.id for m in client.models.list().data] == [str(files["model"]), "alpha"]
                break
            except openai.APIConnectionError:
                time.sleep(0.2)
        stream = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "go"}],
                                                max_tokens=300, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].usage.completion_tokens == 300
        assert proc.wait(60) == -signal.SIGTERM  # uvicorn ends by the signal it caught, once all is done
        assert "Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- prefilling the requests admitted together, each alone


@pytest.mark.parametrize("base", ["llama", "gpt2", "llama-nf4"])
def test_requests_admitted_together_are_prefilled_each_alone(base, tmp_path):
    model, tok, folders = base_and_two_adapters(base, tmp_path)
    long = "Please write a long answer about the colour of the sky at noon, at dusk and at night."
    # four rows start together; the first two end together (same length), then the last two join the other two,
    # longer prompts than theirs in a shorter batch (both sides get padded)
    jobs = [("a", "x", 4), ("base", PROMPTS[0], 4), ("b", "yz", 10), ("a", PROMPTS[2], 12), ("b", long, 6),
            ("base", long[:50], 5)]
    ids = [tok(prompt_text(tok, [{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
           for _, p, _ in jobs]

    def serve(max_batch: int, max_prefill_tokens: int, together: bool) -> tuple[list[str], dict]:
        engine = Engine(model, tok, "base", max_batch=max_batch, max_prefill_tokens=max_prefill_tokens)
        for name, folder in folders.items():
            engine.add_adapter(name, read_lora(folder, model))
        done: dict[int, Finished] = {}

        def submit(i: int) -> None:
            name, _, n = jobs[i]
            engine.submit(name, ids[i], SamplingParams(max_tokens=n, ignore_eos=True),
                          lambda e: isinstance(e, Finished) and done.__setitem__(i, e))

        engine.start()
        if together:
            with engine.hold():  # all wait, then start together
                for i in range(len(jobs)):
                    submit(i)
        else:
            for i in range(len(jobs)):
                submit(i)
                wait_for(lambda i=i: i in done)
        wait_for(lambda: len(done) == len(jobs))
        engine.shutdown()  # removes its hooks: the next engine gets the plain model
        assert [done[i].completion_tokens for i in range(len(jobs))] == [n for _, _, n in jobs]
        return [done[i].text for i in range(len(jobs))], dict(engine.stats)

    alone, stats = serve(1, 8192, together=False)
    assert stats["max_rows"] == 1 and stats["prefills"] == len(jobs)
    assert len(set(alone)) == len(alone)
    together, stats = serve(4, 8192, together=True)
    assert together == alone
    assert stats["prefills"] == len(jobs) and stats["joined_running_batch"] == 2  # each prompt alone
    # a budget of tokens per pass cuts each prompt into chunks of its own: the same chunks whatever else is served
    chunked_alone, stats = serve(1, 5, together=False)
    assert stats["prefills"] == sum(-(-len(x) // 5) for x in ids)
    chunked, stats = serve(4, 5, together=True)
    assert chunked == chunked_alone and stats["prefills"] == sum(-(-len(x) // 5) for x in ids)
    with pytest.raises(PeftkitError, match="max_prefill_tokens must be >= 1"):
        Engine(model, tok, "base", max_prefill_tokens=0)




# ---- adapters trained by `Trainer` answer in their recorded training context

INSTRUCTION = "Write the number in the message as digits."
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ORDERS = ["I would like seven, please.", "Send me two of them."]
SYSTEM = "You greet people by their name."
NAMES = ["Hello, I am Ana.", "Hi there, this is Bo."]


def sharp_base(folder: Path, seed: int) -> str:
    """conftest's tiny Llama with a sharper head, whose greedy answers are text (special tokens are never the argmax):
    they depend on the prompt, and run for max_tokens."""
    model = long_llama(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        model.lm_head.weight[:5] = 0
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def train(base: str, rows: list[dict], folder: Path, **settings) -> str:
    """A LoRA adapter trained for a few steps by `Trainer` on `rows` (it records its training context)."""
    folder.mkdir()
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig.from_dict({
        "model": base, "data": str(data), "output_dir": str(folder / "run"), "precision": "fp32", "batch_size": 4,
        "lr": 1e-2, "method": "lora", "method_config": {"r": 4}, "max_length": 160, "packing": False,
        "progress": False, "warmup_ratio": 0.0, "max_steps": 2, **settings})
    return str(Trainer(cfg).run().adapter_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("trained")
    base, other = sharp_base(root / "base", 0), sharp_base(root / "other", 1)
    orders = [{"instruction": INSTRUCTION, "input": f"I would like {WORDS[i % 10]}, please.", "output": str(i % 10)}
              for i in range(12)]
    greetings = [{"messages": [{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": f"Hello, I am {name}."},
                               {"role": "assistant", "content": f"Hi {name}!"}]}
                 for name in ["Ana", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]]
    return {
        "base": base, "other": other,  # the same architecture, other weights
        "orders": train(base, orders, root / "orders", lr=3e-3),
        "greeter": train(base, greetings, root / "greeter", template="alpaca", lr=3e-3),
        "qlora": train(base, orders, root / "qlora", quantize="nf4"),
    }


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", "--precision", "fp32", *argv])


def ask_all(client, engine, jobs: list[tuple[str, list[dict], dict]], max_tokens: int = 8) -> list:
    """Send every chat request at once (one batch) and return the replies."""
    def ask(job):
        model, messages, extra = job
        return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                              extra_body=extra)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        with engine.hold():
            futures = [pool.submit(ask, job) for job in jobs]
            wait_for(lambda: engine.load()["waiting"] == len(jobs))
        return [f.result() for f in futures]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_trained_adapters_answer_in_their_training_context_as_peftkit_generate(trained, capsys):
    orders, greeter, base = trained["orders"], trained["greeter"], trained["base"]
    expected = {
        "orders": cli_answers(capsys, ["--adapter", orders, "--max-new-tokens", "8"], ORDERS),
        "greeter": cli_answers(capsys, ["--adapter", greeter, "--max-new-tokens", "8"], NAMES),
        "base": cli_answers(capsys, ["--model", base, "--max-new-tokens", "8"], ORDERS),
        "raw": cli_answers(capsys, ["--adapter", orders, "--no-context", "--model", base, "--max-new-tokens", "8"],
                           ORDERS),
        "own system": cli_answers(capsys, ["--adapter", greeter, "--system", "Be brief.", "--max-new-tokens", "8"],
                                  NAMES),
    }
    engine = build_engine(serve_args("--adapter", f"orders={orders}", "--adapter", f"greeter={greeter}"))
    assert engine.base_name == base  # the base the adapters were trained on, as they name it
    assert "peftkit serve: warning" not in capsys.readouterr().err
    server = LiveServer(create_app(engine))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        jobs = {
            "orders": [("orders", user(m), {}) for m in ORDERS],
            "greeter": [("greeter", user(m), {}) for m in NAMES],
            "base": [(base, user(m), {}) for m in ORDERS],
            "raw": [("orders", user(m), {"peftkit_raw": True}) for m in ORDERS],
            "own system": [("greeter", [{"role": "system", "content": "Be brief."}, *user(m)], {}) for m in NAMES],
        }
        flat = [job for group in jobs.values() for job in group]
        prefills = engine.stats["prefills"]
        replies = iter(ask_all(client, engine, flat))
        got = {kind: [next(replies) for _ in group] for kind, group in jobs.items()}
        assert engine.stats["prefills"] == prefills + len(flat)  # each prompt in a forward pass of its own
        assert {kind: [r.choices[0].message.content.strip() for r in got[kind]] for kind in got} == expected
        assert expected["orders"] != expected["raw"]  # the wrapping changes the answers: leaving it out is caught
        # the prompts are the ones `peftkit generate` renders (the system message given, the recorded template)
        tok = engine.tokenizer
        recorded = {"orders": read_context(orders), "greeter": read_context(greeter), "base": TrainingContext(),
                    "raw": TrainingContext()}
        recorded["own system"] = dataclasses.replace(recorded["greeter"], system="Be brief.")
        for kind, context in recorded.items():
            texts = [prompt_text(tok, context.conversation(m[-1]["content"]), context.chat_template)
                     for _, m, _ in jobs[kind]]
            assert [r.usage.prompt_tokens for r in got[kind]] == [len(tok(t)["input_ids"]) for t in texts], kind
        assert got["greeter"][0].usage.prompt_tokens != got["own system"][0].usage.prompt_tokens
        assert recorded["greeter"].template == "alpaca" and recorded["greeter"].system == SYSTEM
        card = client.models.retrieve("orders").model_dump()
        assert "instruction 'Write the number" in card["training_context"] and card["warnings"] == []
        assert "system message" in client.models.retrieve("greeter").model_dump()["training_context"]
        assert client.models.retrieve(base).model_dump()["training_context"] is None
    finally:
        server.stop()
        engine.shutdown()


def test_as_trained_wraps_every_user_turn_and_keeps_a_system_message_given():
    context = TrainingContext(system="Be kind.", instruction="Answer.")
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert as_trained(context, chat) == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Answer.\n\na"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "Answer.\n\nc"}]
    own = [{"role": "system", "content": "Be short."}, chat[0]]
    assert as_trained(context, own) == [own[0], {"role": "user", "content": "Answer.\n\na"}]
    assert as_trained(TrainingContext(), chat) == chat


def test_chat_answers_end_at_the_templates_end_of_turn(files):
    """As `peftkit generate` stops: at the end-of-turn token, or at its text when it is several tokens."""
    seen = []
    for tok, template, stop, ids in [(tiny_tokenizer(), None, (), {2}),
                                     (tiny_tokenizer(chatml_tokens=False), None, ("<|im_end|>",), set()),
                                     (tiny_tokenizer(chatml_tokens=False), "alpaca", (), {2})]:  # alpaca: EOS
        engine = Engine(long_llama(), tok, "base")
        engine.submit = lambda *a, submit=engine.submit, **kw: seen.append(a[2]) or submit(*a, **kw)
        server = LiveServer(create_app(engine, template=template))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)
        try:
            client.chat.completions.create(model="base", messages=user("hi"), max_tokens=2, stop=["zz"])
            assert (seen[-1].stop, seen[-1].stop_token_ids) == (("zz", *stop), ids)
            client.completions.create(model="base", prompt="hi", max_tokens=2)  # a plain prompt: no template
            assert (seen[-1].stop, seen[-1].stop_token_ids) == ((), set())
        finally:
            server.stop()


def test_adapter_trained_on_another_base_is_refused(trained, capsys, tmp_path):
    base, other, orders = trained["base"], trained["other"], trained["orders"]
    assert main(["serve", "--port", "0", "--model", other, "--adapter", f"o={orders}"]) == 2
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("peftkit")]  # not HF's bars
    assert err.startswith("peftkit serve: error: ServeError: adapter 'o' (")
    assert f"was trained on {base} (fingerprint {read_context(orders).fingerprint}), not on the served base" in err
    assert "--allow-base-mismatch" in err
    engine = build_engine(serve_args("--model", other, "--adapter", f"o={orders}", "--allow-base-mismatch"))
    assert "was trained on" in capsys.readouterr().err and "served as asked" in engine.warnings["o"][0]
    engine.shutdown()
    shutil.copytree(base, tmp_path / "copy")  # the same weights elsewhere: fine
    engine = build_engine(serve_args("--model", str(tmp_path / "copy"), "--adapter", f"o={orders}"))
    assert engine.warnings == {"o": []} and "warning" not in capsys.readouterr().err
    engine.shutdown()

    model, tok = load_model(other)
    engine = Engine(model, tok, "other", adapter_root=Path(base).parent)
    server = LiveServer(create_app(engine))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as h:
            r = h.post("/v1/adapters", json={"name": "o", "path": orders})
            assert r.status_code == 400 and r.json()["error"]["code"] == "base_mismatch"
            assert "its answers would be garbage" in r.json()["error"]["message"]
            assert engine.models() == ["other"]
            r = h.post("/v1/adapters", json={"name": "o", "path": orders, "allow_base_mismatch": True})
            assert r.status_code == 200 and "served as asked" in r.json()["warnings"][0]
            assert engine.models() == ["other", "o"]
    finally:
        server.stop()


def test_qlora_adapter_is_served_on_the_base_quantized_as_trained(trained, capsys, caplog):
    qlora, orders = trained["qlora"], trained["orders"]
    expected = cli_answers(capsys, ["--adapter", qlora, "--max-new-tokens", "8"], ORDERS)
    engine = build_engine(serve_args("--adapter", f"q={qlora}"))
    err = capsys.readouterr().err
    assert "base stored NF4 + double quant (block 64), as the adapters were trained" in err
    assert any(isinstance(m, QuantLinear) for m in engine.model.modules()) and engine.warnings == {"q": []}
    server = LiveServer(create_app(engine))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)
    try:
        replies = ask_all(client, engine, [("q", user(m), {}) for m in ORDERS])
        assert [r.choices[0].message.content.strip() for r in replies] == expected
    finally:
        server.stop()
    # full precision asked for: served, with one warning; adapters that disagree need a choice
    engine = build_engine(serve_args("--adapter", f"q={qlora}", "--quantize", "none", "--adapter-root",
                                     str(Path(trained["base"]).parent)))
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert "'q' was trained on a NF4 + double quant (block 64) base and is served on a full-precision one" in warning
    assert not any(isinstance(m, QuantLinear) for m in engine.model.modules())
    server = LiveServer(create_app(engine))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as h:  # loaded at run time: the same warning, once
            r = h.post("/v1/adapters", json={"name": "q2", "path": qlora})
            same = warning.split("warning: ", 1)[1].replace("'q'", "'q2'")
            assert r.status_code == 200 and r.json()["warnings"] == [same]
            assert [rec.getMessage() for rec in caplog.records if rec.name == "peftkit.serve"] == [
                f"peftkit serve: warning: {same}"]
            assert h.get("/v1/models/q2").json()["warnings"] == r.json()["warnings"]
    finally:
        server.stop()
    # a base quantized before the engine got it has no fingerprint left: the adapter is served, unchecked
    model, tok = load_model(trained["base"])
    apply_quantization(model, read_context(qlora).quantization)
    engine = Engine(model, tok, "nf4-base")
    [warning] = engine.check_adapter("q", read_lora(qlora, model))  # stored as trained: no other warning
    assert "was quantized before its fingerprint was taken: it cannot be checked" in warning
    assert main(["serve", "--port", "0", "--adapter", f"q={qlora}", "--adapter", f"o={orders}"]) == 2
    assert ("different base formats (q: NF4 + double quant (block 64), o: full precision); choose one with "
            "--quantize") in capsys.readouterr().err

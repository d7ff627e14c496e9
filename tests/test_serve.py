"""`peftkit serve`: a live server on loopback answering the real `openai` client, mixed-adapter batches equal to
serving each request alone (and to `peftkit generate`), and the paths off the happy one."""

from __future__ import annotations

import concurrent.futures
import copy
import os
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

from peftkit.cli import main  # noqa: E402
from peftkit.core.adapter_io import apply_method, load_adapter, save_adapter  # noqa: E402
from peftkit.data.sequences import prompt_text  # noqa: E402
from peftkit.errors import PeftkitError  # noqa: E402
from peftkit.eval.generate import generate  # noqa: E402
from peftkit.methods.lora import lora_layers  # noqa: E402
from peftkit.models import load_model  # noqa: E402
from peftkit.serve.app import create_app  # noqa: E402
from peftkit.serve.engine import Engine, Finished, SamplingParams  # noqa: E402
from peftkit.serve.lora_batch import LoRABatch, read_lora  # noqa: E402

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
    engine = Engine(model, tok, "base", **kwargs)
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
    args = ["generate", "--model", str(files["model"]), "--precision", "fp32", "--max-new-tokens", str(new_tokens)]
    if adapter:
        args += ["--adapter", str(files[adapter])]
    capsys.readouterr()
    assert main(args + prompts) == 0
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


@pytest.mark.parametrize("base", ["llama", "gpt2", "llama-nf4"])
def test_rows_joining_and_leaving_a_mixed_batch_equal_each_request_alone(base, tmp_path):
    from peftkit.quant import quantize_model

    model = tiny_gpt2() if base == "gpt2" else long_llama()
    if base == "llama-nf4":
        quantize_model(model, "nf4", compute_dtype=torch.float32)
    tok = tiny_tokenizer()
    folders = {"a": save_lora(model, tmp_path / "a", 1, {"r": 4}),
               "b": save_lora(model, tmp_path / "b", 2, {"r": 2, "target_modules": "all-linear"})}
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
    with pytest.raises(PeftkitError, match=r"layer 'model.layers.0.mlp.down_proj' has A \(4, 64\) and B \(64, 4\), "
                       r"the model expects \(4, 64\) and \(32, 4\)"):
        read_lora(save_lora(wider, tmp_path / "wider", 0, {"r": 4}), model)


def test_cli_refuses_bad_adapters_before_listening(files, capsys):
    assert main(["serve", "--model", str(files["model"]), "--adapter", f"x={files['prompt_tuning']}"]) == 2
    assert "cannot share a batch" in capsys.readouterr().err
    assert main(["serve", "--model", str(files["model"]), "--adapter", f"x={files['alpha']}",
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

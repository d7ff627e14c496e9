"""Prefix tuning (Li & Liang, 2021, https://arxiv.org/abs/2101.00190).

    head_i = Attn(q_i, [P_k^l; K^l], [P_v^l; V^l])    at every layer l, P^l in R^{m x kv_dim} (keys and values)
    [P^1_k, P^1_v, ..., P^L_k, P^L_v] = MLP(E) = W_2 tanh(W_1 E + b_1) + b_2,   E in R^{m x d}

m trainable key/value prefixes at every layer, trained through the MLP reparameterisation (E -> Linear -> tanh ->
Linear to L * 2 * kv_dim), which `fold` drops after training: the folded prefixes (m, L * 2 * kv_dim) are all that
inference needs and all that adapter files hold. The prefix keys are used as given (no rotary embedding), and the
real tokens start at position m, as in Hugging Face peft, whose PREFIX_TUNING files (key ``prompt_embeddings``,
row layout ``[layer 0 key, layer 0 value, layer 1 key, ...]``, kv_dim = key/value heads x head size) load both
ways.

The model stays a normal Hugging Face model: a forward pre-hook puts the prefixes in the KV cache.

* Training (grad enabled and ``model.training``) or ``use_cache=False`` without a cache: a `FrozenPrefixCache`
  whose layers return ``[prefix; new]`` without storing anything, so a gradient-checkpointing replay sees the
  same keys. Layers that drop the cache under gradient checkpointing (transformers passes ``cache=None``) get
  the prefix from a pre-hook on their attention module instead.
* Otherwise the prefixes are written into a `DynamicCache` (the caller's empty one, as `model.generate` passes,
  or a new one) that then grows as usual while decoding.
* The attention mask gets m leading ones and given position ids are shifted by m, on the first call and on every
  later call with that cache, so the caller keeps counting in its own frame.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from peftkit.core.config import Config
from peftkit.core.hooks import HookReport, model_geometry, prepend_to_mask, split_call
from peftkit.core.inject import AdapterModule, freeze_all
from peftkit.core.registry import MemoryModel, register_method
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.memory import Arch

__all__ = ["FrozenPrefixCache", "PrefixEncoder", "PrefixTuningConfig", "fold"]

ATTRIBUTE = "peftkit_prefix"
CACHE_MARK = "_peftkit_prefix_tokens"


@dataclasses.dataclass
class PrefixTuningConfig(Config):
    """Prefix tuning settings (peft's field names).

    Attributes:
        num_virtual_tokens: m, the prefix length (~10 for table-to-text in the paper).
        prefix_projection: train through the MLP reparameterisation (False: train the prefixes directly).
        encoder_hidden_size: hidden size of the MLP (512 as in Li & Liang 2021).
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = True
    encoder_hidden_size: int = 512

    def validate(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise PeftkitError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}")
        if self.encoder_hidden_size <= 0:
            raise PeftkitError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size}")

    def peft_fields(self, model: nn.Module) -> dict[str, Any]:
        # peft's layout for grouped-query attention: token_dim = kv heads x head size, heads = kv heads
        geo = model_geometry(model)
        return {"token_dim": geo["kv_heads"] * geo["head_dim"], "num_attention_heads": geo["kv_heads"],
                "num_layers": geo["layers"], "num_transformer_submodules": 1}


class _PrefixLayer(DynamicLayer):
    """A cache layer holding only the prefix: ``update`` returns ``[prefix; new]`` and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class FrozenPrefixCache(DynamicCache):
    """A cache that always holds exactly the prefixes (training: replay-safe under gradient checkpointing)."""

    def __init__(self, layers: list[_PrefixLayer]) -> None:
        Cache.__init__(self, layers=layers)


class _OneLayerPrefix:
    """Stands in for the cache of one attention call when gradient checkpointing dropped it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.layer = _PrefixLayer(keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.update(key_states, value_states)


class PrefixEncoder(nn.Module, AdapterModule):
    """The prefixes: ``embedding`` (m x d) and the MLP ``transform`` while training, or, folded, ``embedding``
    holding the prefixes themselves (m x L*2*kv_dim), as in peft."""

    def __init__(self, config: PrefixTuningConfig, geometry: dict[str, int], device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.num_layers = geometry["layers"]
        self.kv_heads, self.head_dim = geometry["kv_heads"], geometry["head_dim"]
        self.kv_dim = self.kv_heads * self.head_dim
        width = self.num_layers * 2 * self.kv_dim
        self.transform: nn.Sequential | None = None
        if config.prefix_projection:
            self.embedding = nn.Embedding(self.num_virtual_tokens, geometry["hidden"], device=device, dtype=dtype)
            self.transform = nn.Sequential(
                nn.Linear(geometry["hidden"], config.encoder_hidden_size, device=device, dtype=dtype),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width, device=device, dtype=dtype),
            )
        else:
            self.embedding = nn.Embedding(self.num_virtual_tokens, width, device=device, dtype=dtype)
        self.enabled = True
        self._frozen = False  # this call's cache is a FrozenPrefixCache

    @property
    def folded(self) -> bool:
        return self.transform is None

    def adapter_params(self) -> list[str]:
        return [n for n, _ in self.named_parameters()]

    def prefixes(self) -> torch.Tensor:
        """All prefixes, (m, L * 2 * kv_dim): row i is ``[layer 0 key, layer 0 value, layer 1 key, ...]``."""
        if self.transform is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    def layer_prefix(self, layer: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each (batch, kv_heads, m, head_dim); with the MLP only its rows run."""
        cols = slice(2 * layer * self.kv_dim, (2 * layer + 2) * self.kv_dim)
        if self.transform is None:
            flat = self.embedding.weight[:, cols]
        else:
            first, act, last = self.transform
            flat = F.linear(act(first(self.embedding.weight)), last.weight[cols], last.bias[cols])
        return tuple(  # type: ignore[return-value]
            part.view(self.num_virtual_tokens, self.kv_heads, self.head_dim).transpose(0, 1)
            .unsqueeze(0).expand(batch, -1, -1, -1).to(dtype)
            for part in flat.split(self.kv_dim, dim=1)
        )

    def all_layer_prefixes(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        flat = self.prefixes()  # one MLP pass for all layers
        per = flat.view(self.num_virtual_tokens, self.num_layers * 2, self.kv_heads, self.head_dim)
        per = per.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1).to(dtype)  # (L*2, b, h, m, hd)
        return [(per[2 * i], per[2 * i + 1]) for i in range(self.num_layers)]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the embedding + MLP by the prefixes they produce (idempotent)."""
        if self.transform is not None:
            self._set_folded(self.prefixes().detach().clone())

    def _set_folded(self, value: torch.Tensor) -> None:
        trainable = self.embedding.weight.requires_grad
        weight = self.embedding.weight
        self.embedding = nn.Embedding(value.shape[0], value.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(value.to(weight.dtype))
        self.embedding.weight.requires_grad_(trainable)
        self.transform = None

    # adapter file: peft's folded prompt_embeddings
    def adapter_file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prefixes().detach()}

    def load_adapter_file_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if "prompt_embeddings" not in tensors:
            raise PeftkitError("the adapter file has no prompt_embeddings tensor")
        value = tensors.pop("prompt_embeddings")
        expected = (self.num_virtual_tokens, self.num_layers * 2 * self.kv_dim)
        if tuple(value.shape) != expected:
            raise PeftkitError(f"prompt_embeddings has shape {tuple(value.shape)}, this model expects {expected} "
                               f"(virtual tokens, layers * 2 * kv_dim)")
        self._set_folded(value)

    # hooks
    def pre_hook(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        self._frozen = False
        if not self.enabled:
            return None
        kw = split_call(args, kwargs)
        m = self.num_virtual_tokens
        cache = kw.get("cache")
        first = cache is None or cache.get_seq_length() == 0
        if not first and getattr(cache, CACHE_MARK, None) != m:
            return (), kw  # somebody else's cache: leave the call alone
        ref = kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None else kw.get("input_ids")
        if ref is None:
            raise PeftkitError("pass input_ids or inputs_embeds")
        if first:
            batch, dtype = ref.shape[0], model.get_input_embeddings().weight.dtype
            if kw.get("inputs_embeds") is not None:
                dtype = kw["inputs_embeds"].dtype
            training = model.training and torch.is_grad_enabled()
            if cache is None and (training or kw.get("use_cache") is False):
                cache = FrozenPrefixCache([_PrefixLayer(k, v) for k, v in self.all_layer_prefixes(batch, dtype)])
                self._frozen = True
            else:
                if cache is None:
                    cache = DynamicCache(config=model.config)
                if type(cache) is not DynamicCache:
                    raise PeftkitError(f"prefix tuning works with DynamicCache, not {type(cache).__name__}")
                for i, (k, v) in enumerate(self.all_layer_prefixes(batch, dtype)):
                    cache.update(k, v, i)
                setattr(cache, CACHE_MARK, m)
            kw["cache"] = cache
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = prepend_to_mask(kw["attention_mask"], m, as_queries=False)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + m
        return (), kw

    def post_hook(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if self._frozen and getattr(output, "cache", None) is not None:
            output.cache = None  # holds only the prefixes: useless (and wrong) to continue from
        self._frozen = False
        return output

    def attention_pre_hook(self, layer: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]
                           ) -> tuple[tuple, dict[str, Any]] | None:
        if not self.enabled or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return None
        # gradient checkpointing dropped the cache for this layer: bring the prefix in directly
        hidden = args[0] if args else kwargs["hidden_states"]
        k, v = self.layer_prefix(layer, hidden.shape[0], hidden.dtype)
        return args, {**kwargs, "cache": _OneLayerPrefix(k, v)}


def _attention_modules(model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The self-attention module of every block, by its ``layer_idx``."""
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and type(module).__name__.endswith("Attention") and "cross" not in name:
            found.setdefault(idx, module)
    if sorted(found) != list(range(num_layers)):
        raise PeftkitError(f"cannot find one attention module per layer in {type(model).__name__}")
    return [found[i] for i in range(num_layers)]


def fold(model: nn.Module) -> None:
    """Drop the MLP reparameterisation of a prefix-tuned model, keeping the prefixes it produces."""
    encoder = getattr(model, ATTRIBUTE, None)
    if not isinstance(encoder, PrefixEncoder):
        raise PeftkitError("this model has no prefix-tuning adapter")
    encoder.fold()


def count(arch: Arch, config: PrefixTuningConfig) -> list[tuple[str, int]]:
    """The prefixes (m x L*2*kv_dim), or, through the MLP, the embedding (m x h) and the MLP's two layers."""
    n, h, p = config.num_virtual_tokens, arch.hidden, config.encoder_hidden_size
    width = arch.layers * 2 * arch.kv_dim
    if not config.prefix_projection:
        return [(f"{ATTRIBUTE}.embedding.weight", n * width)]
    return [(f"{ATTRIBUTE}.embedding.weight", n * h), (f"{ATTRIBUTE}.transform.0.weight", h * p),
            (f"{ATTRIBUTE}.transform.0.bias", p), (f"{ATTRIBUTE}.transform.2.weight", p * width),
            (f"{ATTRIBUTE}.transform.2.bias", width)]


@register_method("prefix_tuning", PrefixTuningConfig, count=count, peft_type="PREFIX_TUNING",
                 memory=MemoryModel(kv_tokens=lambda config: config.num_virtual_tokens))
def apply(model: nn.Module, config: PrefixTuningConfig) -> HookReport:
    """Attach trainable key/value prefixes to every layer of `model` and freeze everything else."""
    if ATTRIBUTE in model._modules:
        raise PeftkitError("this model already has a prefix-tuning adapter")
    geometry = model_geometry(model)
    attentions = _attention_modules(model, geometry["layers"])
    weight = model.get_input_embeddings().weight
    encoder = PrefixEncoder(config, geometry, weight.device, weight.dtype)
    freeze_all(model)
    setattr(model, ATTRIBUTE, encoder)
    for p in encoder.parameters():
        p.requires_grad_(True)
    report = HookReport("prefix_tuning", adapted=[ATTRIBUTE], attribute=ATTRIBUTE)
    report.handles.append(model.register_forward_pre_hook(encoder.pre_hook, with_kwargs=True))
    report.handles.append(model.register_forward_hook(encoder.post_hook, with_kwargs=True))
    for i, attn in enumerate(attentions):
        hook = (lambda layer: lambda mod, a, kw: encoder.attention_pre_hook(layer, mod, a, kw))(i)
        report.handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    return report

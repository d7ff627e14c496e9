"""Prompt tuning (Lester et al., 2021, https://arxiv.org/abs/2104.08691).

    h_0 = [P; E(x)],   P in R^{m x d} trainable,  E the frozen input embedding

m virtual-token embeddings are prepended to the input embeddings; nothing else changes. P starts as the
embeddings of a text (``TEXT``; its tokens repeated to length m), of tokens sampled from the first 5000 of the
vocabulary (``SAMPLE_VOCAB``, the paper's "sampled vocab"), or U[-0.5, 0.5] (``RANDOM``).

The model stays a normal Hugging Face model: a forward pre-hook on it rewrites each call.

* First call over an input (no cache, or an empty one): ``input_ids`` become ``inputs_embeds = [P; E(x)]``,
  the attention mask gets m leading ones, the labels m leading -100, given position ids become
  ``[0..m-1, m + p]``; the cache (created if the call would cache) is marked as holding the m virtual tokens.
* Later calls with that cache (decoding): the attention mask gets the m leading ones and the position ids are
  shifted by m, so the caller keeps counting in its own frame (this is what `model.generate` does).

The returned logits drop the m virtual positions, so ``logits[:, i]`` belongs to ``input_ids[:, i]`` as for the base
model (peft returns them; compare ``peft_logits[:, m:]``). Adapter files use peft's PROMPT_TUNING layout: the key
``prompt_embeddings`` of shape (m, d).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from peftkit.core.config import Config
from peftkit.core.hooks import HookReport, model_geometry, prepend_to_mask, split_call
from peftkit.core.inject import AdapterModule, freeze_all
from peftkit.core.registry import MemoryModel, register_method
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.memory import Arch

__all__ = ["PromptEncoder", "PromptTuningConfig"]

ATTRIBUTE = "peftkit_prompt"
SAMPLE_VOCAB_SIZE = 5000  # the paper samples from the 5000 most common tokens; we take the first 5000 ids
CACHE_MARK = "_peftkit_virtual_tokens"


@dataclasses.dataclass
class PromptTuningConfig(Config):
    """Prompt tuning settings (peft's field names).

    Attributes:
        num_virtual_tokens: m, the number of trainable virtual tokens.
        prompt_tuning_init: ``TEXT``, ``SAMPLE_VOCAB`` or ``RANDOM`` (U[-0.5, 0.5]).
        prompt_tuning_init_text: the text for ``TEXT``.
        tokenizer_name_or_path: tokenizer (local folder or hub name) that tokenizes the text for ``TEXT``; by
            default the model's own folder (``config._name_or_path``), which the saved adapter then names.
        prompt_tuning_init_token_ids: token ids for ``TEXT`` instead of a text and tokenizer.
    """

    peftkit_only_fields = ("prompt_tuning_init_token_ids",)  # not written to adapter_config.json when unset

    num_virtual_tokens: int = 20
    prompt_tuning_init: Literal["TEXT", "SAMPLE_VOCAB", "RANDOM"] = "SAMPLE_VOCAB"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    prompt_tuning_init_token_ids: list[int] | None = None

    def validate(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise PeftkitError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_token_ids:
            if not self.prompt_tuning_init_text:
                raise PeftkitError("prompt_tuning_init=TEXT needs prompt_tuning_init_text (tokenized by "
                                   "tokenizer_name_or_path or the model's own tokenizer) or "
                                   "prompt_tuning_init_token_ids")

    def for_loading(self) -> PromptTuningConfig:
        """Loading overwrites the prompt: skip the initialisation (no tokenizer needed)."""
        return self.replace(prompt_tuning_init="RANDOM", prompt_tuning_init_token_ids=None)

    def peft_fields(self, model: nn.Module) -> dict[str, Any]:
        geo = model_geometry(model)
        fields = {"token_dim": geo["hidden"], "num_layers": geo["layers"], "num_attention_heads": geo["heads"],
                  "num_transformer_submodules": 1}
        if self.prompt_tuning_init == "TEXT" and not self.tokenizer_name_or_path:
            fields["tokenizer_name_or_path"] = _model_folder(model)  # peft's config requires one for TEXT
        return fields


class PromptEncoder(nn.Module, AdapterModule):
    """The m virtual-token embeddings (``embedding.weight``, as peft names them) and the hooks that use them."""

    def __init__(self, num_virtual_tokens: int, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, dim, device=device, dtype=dtype)
        self.enabled = True
        self._full_length: int | None = None  # length of the logits to strip in this call

    def adapter_params(self) -> list[str]:
        return ["embedding.weight"]

    def adapter_file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight}

    def load_adapter_file_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if "prompt_embeddings" not in tensors:
            raise PeftkitError("the adapter file has no prompt_embeddings tensor")
        value = tensors.pop("prompt_embeddings")
        if value.shape != self.embedding.weight.shape:
            raise PeftkitError(f"prompt_embeddings has shape {tuple(value.shape)}, this model expects "
                               f"{tuple(self.embedding.weight.shape)}")
        with torch.no_grad():
            self.embedding.weight.copy_(value.to(self.embedding.weight.dtype))

    def pre_hook(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        self._full_length = None
        if not self.enabled:
            return None
        kw = split_call(args, kwargs)
        m = self.num_virtual_tokens
        cache = kw.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            if getattr(cache, CACHE_MARK, None) == m:  # decoding after our first call: shift into the cache frame
                if kw.get("attention_mask") is not None and kw["attention_mask"].dim() == 2:
                    kw["attention_mask"] = prepend_to_mask(kw["attention_mask"], m, as_queries=True)
                if kw.get("position_ids") is not None:
                    kw["position_ids"] = kw["position_ids"] + m
            return (), kw
        ids = kw.pop("input_ids", None)
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise PeftkitError("pass input_ids or inputs_embeds")
            embeds = model.get_input_embeddings()(ids)
        b = embeds.shape[0]
        prompts = self.embedding.weight.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        kw["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = prepend_to_mask(kw["attention_mask"], m, as_queries=True)
        if isinstance(kw.get("logits_to_keep"), torch.Tensor):  # positions of the caller's sequence: shift them
            kw["logits_to_keep"] = kw["logits_to_keep"] + m
        if kw.get("labels") is not None:  # no loss on the virtual tokens
            labels = kw["labels"]
            kw["labels"] = torch.cat([torch.full((b, m), -100, dtype=labels.dtype, device=labels.device), labels], 1)
        if kw.get("position_ids") is not None:
            pos = kw["position_ids"]
            virtual = torch.arange(m, dtype=pos.dtype, device=pos.device).expand(*pos.shape[:-1], m)
            kw["position_ids"] = torch.cat([virtual, pos + m], dim=-1)
        use_cache = kw.get("use_cache")
        if cache is None and (use_cache if use_cache is not None else getattr(model.config, "use_cache", False)):
            cache = kw["cache"] = DynamicCache(config=model.config)
        if cache is not None:
            setattr(cache, CACHE_MARK, m)
        self._full_length = embeds.shape[1] + m
        return (), kw

    def post_hook(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        full, self._full_length = self._full_length, None
        logits = getattr(output, "logits", None)
        if full is not None and logits is not None and logits.shape[1] == full:
            output.logits = logits[:, self.num_virtual_tokens :]
        return output


def _init_prompt(encoder: PromptEncoder, model: nn.Module, config: PromptTuningConfig) -> None:
    m = config.num_virtual_tokens
    weight = encoder.embedding.weight
    with torch.no_grad():
        if config.prompt_tuning_init == "RANDOM":
            weight.uniform_(-0.5, 0.5)
            return
        vocab = model.get_input_embeddings().weight
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, min(SAMPLE_VOCAB_SIZE, vocab.shape[0]), (m,))
        else:
            ids = torch.tensor(config.prompt_tuning_init_token_ids or _tokenize(config, model), dtype=torch.long)
            if ids.numel() == 0:
                raise PeftkitError("prompt_tuning_init_text gives no tokens")
            if int(ids.max()) >= vocab.shape[0] or int(ids.min()) < 0:
                raise PeftkitError(f"prompt_tuning_init token ids must be in [0, {vocab.shape[0]})")
            ids = ids.repeat(math.ceil(m / ids.numel()))[:m]  # repeat a short text, cut a long one
        weight.copy_(vocab[ids.to(vocab.device)].to(weight.dtype))


def _model_folder(model: nn.Module) -> str | None:
    """Where `model` was loaded from (``config._name_or_path``), if it says."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _tokenize(config: PromptTuningConfig, model: nn.Module) -> list[int]:
    from transformers import AutoTokenizer

    source = config.tokenizer_name_or_path or _model_folder(model)
    if source is None:
        raise PeftkitError("prompt_tuning_init=TEXT: give tokenizer_name_or_path (the model does not say where it "
                           "was loaded from, so its tokenizer cannot be found)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise PeftkitError(f"cannot load tokenizer {source!r} for prompt_tuning_init=TEXT: {e}") from None
    return tokenizer(config.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]


def count(arch: Arch, config: PromptTuningConfig) -> list[tuple[str, int]]:
    """m virtual-token embeddings of the model width."""
    return [(f"{ATTRIBUTE}.embedding.weight", config.num_virtual_tokens * arch.hidden)]


@register_method("prompt_tuning", PromptTuningConfig, count=count, peft_type="PROMPT_TUNING",
                 memory=MemoryModel(input_tokens=lambda config: config.num_virtual_tokens))
def apply(model: nn.Module, config: PromptTuningConfig) -> HookReport:
    """Attach m trainable virtual tokens to `model` and freeze everything else."""
    if ATTRIBUTE in model._modules:
        raise PeftkitError("this model already has a prompt-tuning adapter")
    embed = model.get_input_embeddings()
    encoder = PromptEncoder(config.num_virtual_tokens, embed.weight.shape[1], embed.weight.device, embed.weight.dtype)
    _init_prompt(encoder, model, config)
    freeze_all(model)
    setattr(model, ATTRIBUTE, encoder)
    encoder.embedding.weight.requires_grad_(True)
    report = HookReport("prompt_tuning", adapted=[ATTRIBUTE], attribute=ATTRIBUTE)
    report.handles.append(model.register_forward_pre_hook(encoder.pre_hook, with_kwargs=True))
    report.handles.append(model.register_forward_hook(encoder.post_hook, with_kwargs=True))
    return report

"""The method registry: each method file registers its config class and `apply()` with one decorator.

The registry entry (`MethodSpec`) holds every fact the rest of peftkit needs about a method, so that adding a method
is adding one file: how it adapts a model, how many parameters it trains on an architecture (for the memory
estimator), what one training step of it keeps in memory (`MemoryModel`), whether and how its update folds into the
base weights, what else it can do (`Capabilities`: batched serving, llama.cpp adapter export, a quantized base), and
its adapter-file form (the config class's peft hooks, see `peftkit.core.config.Config`). Code outside
``peftkit/methods`` asks the spec, never ``if name == "lora"``.

A preset (`Preset`) is a registered method with base-model settings: ``qlora`` is LoRA over an NF4 +
double-quantized base (Dettmers et al. 2023), registered in ``methods/lora.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peftkit.core.config import Config
    from peftkit.core.inject import InjectReport
    from peftkit.memory import Arch

ApplyFn = Callable[["nn.Module", Any], "InjectReport"]
CalibrateFn = Callable[["nn.Module", Any, Iterable[dict[str, Any]]], None]
CountFn = Callable[["Arch", Any], list[tuple[str, int]]]
Trainable = list[tuple[str, int]]
"""(name, numel) of the tensors a method trains, as `MethodSpec.count` gives them."""


def _zero(*_: Any) -> int:
    return 0


def _false(*_: Any) -> bool:
    return False


def _nothing(*_: Any) -> frozenset[str]:
    return frozenset()


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """What one training step of a method keeps in memory beyond the base model's forward (read by
    `peftkit.memory`; the defaults add nothing). `config` is the method's config, `arch` a `peftkit.memory.Arch`,
    `trainable` what `MethodSpec.count` gives for them.

    Attributes:
        input_tokens: ``f(config)``: virtual tokens prepended to every sequence (they run through every block and
            the head).
        kv_tokens: ``f(config)``: extra key/value positions every attention layer attends to (not run through the
            blocks).
        trains_block_linears: every block linear's weight trains or is rebuilt every step, so each keeps its input
            (whether a norm trains is read from the trained tensors' names).
        active_blocks: ``f(arch, config, trainable)``: the blocks gradients flow through (counted from the top);
            None: all of them.
        grad_starts: where in the lowest of those blocks the graph starts (below it nothing is kept): ``"input"``
            (its first norm), ``"attn_output"`` (after the attention output projection: the MLP half and the method's
            own tensors are kept) or ``"block_output"`` (after the MLP: only the method's own tensors).
        adapted_linears: ``f(trainable)``: names of the block linears (``self_attn.q_proj``) whose input the method
            keeps for its own branch.
        block_activations: ``f(arch, config, trainable, e)``: bytes per token and block the method's own modules keep
            for backward, `e` being the compute dtype's bytes.
        trains_head: ``f(config)``: the output head trains (its input is kept).
        rebuilt_weights: ``f(arch, config)``: elements of base weights rebuilt as ``W0 + delta`` every step (a
            compute-dtype copy alive, and a full-size gradient in the frozen weights' dtype).
        buffers: ``f(arch, config, trainable)``: bytes of fixed, non-trainable tensors the method adds (random
            projections, indices), counted with the frozen weights.
        note: a caveat added to every estimate; ``{buffers_gib}`` is replaced by `buffers` in GiB.
    """

    input_tokens: Callable[[Any], int] = _zero
    kv_tokens: Callable[[Any], int] = _zero
    trains_block_linears: bool = False
    active_blocks: Callable[[Arch, Any, Trainable], int] | None = None
    grad_starts: Literal["input", "attn_output", "block_output"] = "input"
    adapted_linears: Callable[[Trainable], Iterable[str]] = _nothing
    block_activations: Callable[[Arch, Any, Trainable, int], int] = _zero
    trains_head: Callable[[Any], bool] = _false
    rebuilt_weights: Callable[[Arch, Any], int] = _zero
    buffers: Callable[[Arch, Any, Trainable], int] = _zero
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a method's adapters can be used for besides training (merging is `MethodSpec.merging`).

    Attributes:
        batched_serving: adapters of this method share a batch with other adapters on one base model (the server
            applies each row's own low-rank update).
        gguf_adapter: the adapter exports as a llama.cpp adapter file (``general.type = adapter``).
        quantized_base: the method trains over a quantized base (it leaves base weights frozen to quantize).
    """

    batched_serving: bool = False
    gguf_adapter: bool = False
    quantized_base: bool = True



@dataclasses.dataclass(frozen=True)
class Merging:
    """How a method's update folds into the base weights.

    Attributes:
        merge_and_unload: ``f(model, dtype) -> model`` with plain base layers and the update folded in (`dtype`:
            of the layers it rebuilds, None keeps theirs); the model then holds exactly the base model's tensors.
        merge: fold the update into the base weights in place, keeping the adapter (idempotent); None when the
            method trains the base weights themselves, so the model is always merged.
        unmerge: take the update back out (idempotent); None as for `merge`.
    """

    merge_and_unload: Callable[[nn.Module, torch.dtype | None], nn.Module]
    merge: Callable[[nn.Module], None] | None = None
    unmerge: Callable[[nn.Module], None] | None = None

    @classmethod
    def in_place(cls) -> Merging:
        """For methods that train base parameters (full, top-k layers, BitFit, norms): the trained weights are the
        merged model."""
        return cls(_unload_in_place)


def _unload_in_place(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    return model if dtype is None else model.to(dtype)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What the rest of peftkit needs to know about a method.

    Attributes:
        name: registry name (``lora``, ``prefix_tuning`` ...).
        config_cls: its config dataclass.
        apply: ``apply(model, config) -> InjectReport``; adapts the model in place and freezes the rest.
        count: ``count(arch, config) -> [(name, numel), ...]``: the tensors `apply` makes trainable on a model of
            geometry `arch` (`peftkit.memory.Arch`), from the architecture alone; names follow `Arch`'s tensor names
            (``layers.3.self_attn.q_proj.lora_A.weight``). Raises `PeftkitError` where `apply` would.
        peft_type: the Hugging Face ``peft`` type name when the adapter files are peft-compatible, else None.
        merging: how the update folds into the base weights; None when it cannot (the method adds modules or
            inputs the base model does not have).
        calibrate: optional ``calibrate(model, config, batches)``, called by the trainer after `apply` with a few
            batches (dicts with input_ids, attention_mask, labels) when the method chooses what to train from data
            (e.g. sparse updates scored by gradients).
        memory: what a training step of it keeps in memory (`MemoryModel`).
        capabilities: what its adapters can be used for (`Capabilities`).
    """

    name: str
    config_cls: type[Config]
    apply: ApplyFn
    count: CountFn
    peft_type: str | None = None
    merging: Merging | None = None
    calibrate: CalibrateFn | None = None
    memory: MemoryModel = MemoryModel()
    capabilities: Capabilities = Capabilities()

    @property
    def can_merge(self) -> bool:
        return self.merging is not None


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    config_cls: type[Config],
    *,
    count: CountFn,
    peft_type: str | None = None,
    merging: Merging | None = None,
    calibrate: CalibrateFn | None = None,
    memory: MemoryModel | None = None,
    capabilities: Capabilities | None = None,
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator registering `apply` as method `name` (see `MethodSpec` for the other arguments)."""

    def deco(apply: ApplyFn) -> ApplyFn:
        if name in _REGISTRY or name in _PRESETS:
            raise RuntimeError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name, config_cls, apply, count, peft_type, merging, calibrate,
                                     memory or MemoryModel(), capabilities or Capabilities())
        return apply

    return deco


@dataclasses.dataclass(frozen=True)
class Preset:
    """A registered method with base-model settings, under a name of its own.

    Attributes:
        name: the preset's name (``qlora``).
        method: the registered method it trains (``lora``).
        quant: the base weights' format (`peftkit.quant`) unless the user names one.
        double_quant: quantize the 4-bit format's constants too (with `quant`).
        doc: one line saying what it is.
    """

    name: str
    method: str
    quant: str | None = None
    double_quant: bool = False
    doc: str = ""


_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> None:
    """Register `preset` (called by the file of the method it trains)."""
    if preset.name in _PRESETS or preset.name in _REGISTRY:
        raise RuntimeError(f"method {preset.name!r} registered twice")
    _PRESETS[preset.name] = preset


def _load_all() -> None:
    """Import every module of `peftkit.methods` (on first lookup), so that each method file has registered itself:
    a new method is a new file there, nothing else."""
    import peftkit.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def list_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; an unknown name is an error listing the known ones."""
    _load_all()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise PeftkitError(f"unknown method {name!r}; {hint}known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_presets() -> list[str]:
    _load_all()
    return sorted(_PRESETS)


def resolve_method(name: str) -> tuple[MethodSpec, Preset | None]:
    """A method or preset name -> (the method's spec, the preset or None); an unknown name is an error listing
    both."""
    _load_all()
    preset = _PRESETS.get(name)
    if preset is not None:
        return _REGISTRY[preset.method], preset
    if name not in _REGISTRY:
        known = sorted([*_REGISTRY, *_PRESETS])
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise PeftkitError(f"unknown method {name!r}; {hint}known methods: {', '.join(known)}")
    return _REGISTRY[name], None


def has_quantized_preset(name: str) -> bool:
    """Whether method `name` has a preset over a quantized base (``lora``: ``qlora``)."""
    _load_all()
    return any(p.method == name and p.quant is not None for p in _PRESETS.values())


def method_for_peft_type(peft_type: str, fields: dict[str, Any] | None = None) -> MethodSpec:
    """The method reading peft adapters of `peft_type`; where several share one (LoRA and DoRA: ``LORA``), the one
    whose config class's ``peft_matches(fields)`` accepts the file's config `fields`."""
    _load_all()
    for spec in _REGISTRY.values():
        matches = getattr(spec.config_cls, "peft_matches", None)
        if spec.peft_type == peft_type and (matches is None or matches(fields or {})):
            return spec
    raise PeftkitError(f"peft adapter type {peft_type!r} is not supported by peftkit")

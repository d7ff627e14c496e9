"""The method registry: each method file registers its config class and `apply()` with one decorator.

The registry entry (`MethodSpec`) holds every fact the rest of peftkit needs about a method, so that adding a method
is adding one file: how it adapts a model, how many parameters it trains on an architecture (for the memory
estimator), whether and how its update folds into the base weights, and its adapter-file form (the config class's
peft hooks, see `peftkit.core.config.Config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

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
    """

    name: str
    config_cls: type[Config]
    apply: ApplyFn
    count: CountFn
    peft_type: str | None = None
    merging: Merging | None = None
    calibrate: CalibrateFn | None = None

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
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator registering `apply` as method `name` (see `MethodSpec` for the other arguments)."""

    def deco(apply: ApplyFn) -> ApplyFn:
        if name in _REGISTRY:
            raise RuntimeError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name, config_cls, apply, count, peft_type, merging, calibrate)
        return apply

    return deco


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


def method_for_peft_type(peft_type: str) -> MethodSpec:
    _load_all()
    for spec in _REGISTRY.values():
        if spec.peft_type == peft_type:
            return spec
    raise PeftkitError(f"peft adapter type {peft_type!r} is not supported by peftkit")

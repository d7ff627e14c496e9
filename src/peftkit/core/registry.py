"""The method registry: each method file registers its config class and `apply()` with one decorator."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from torch import nn

    from peftkit.core.config import Config
    from peftkit.core.inject import InjectReport

ApplyFn = Callable[["nn.Module", Any], "InjectReport"]
CalibrateFn = Callable[["nn.Module", Any, Iterable[dict[str, Any]]], None]

# Modules imported on first lookup so that every method file has registered itself.
_METHOD_MODULES = ("lora", "adapters", "prompt_tuning", "prefix_tuning", "selective", "intrinsic_said", "full")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What the rest of peftkit needs to know about a method.

    Attributes:
        name: registry name (``lora``, ``prefix_tuning`` ...).
        config_cls: its config dataclass.
        apply: ``apply(model, config) -> InjectReport``; adapts the model in place and freezes the rest.
        peft_type: the Hugging Face ``peft`` type name when the adapter files are peft-compatible, else None.
        can_merge: whether the update can be folded into the base weights.
        calibrate: optional ``calibrate(model, config, batches)``, called by the trainer after `apply` with a few
            batches (dicts with input_ids, attention_mask, labels) when the method chooses what to train from data
            (e.g. sparse updates scored by gradients).
    """

    name: str
    config_cls: type[Config]
    apply: ApplyFn
    peft_type: str | None = None
    can_merge: bool = False
    calibrate: CalibrateFn | None = None


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    config_cls: type[Config],
    *,
    peft_type: str | None = None,
    can_merge: bool = False,
    calibrate: CalibrateFn | None = None,
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator registering `apply` as method `name`."""

    def deco(apply: ApplyFn) -> ApplyFn:
        if name in _REGISTRY:
            raise RuntimeError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name, config_cls, apply, peft_type, can_merge, calibrate)
        return apply

    return deco


def _load_all() -> None:
    for mod in _METHOD_MODULES:
        importlib.import_module(f"peftkit.methods.{mod}")


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

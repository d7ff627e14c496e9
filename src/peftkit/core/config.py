"""Flat, validated config dataclasses.

Every method config and the training config derive from `Config`. `Config.from_dict` maps a YAML/JSON
mapping 1:1 onto the fields: an unknown key or a value of the wrong type is an error naming the key.
`key=value` overrides from the command line are parsed with YAML rules (``r=16``, ``lr=2e-4``,
``target_modules=[q_proj,v_proj]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml

from peftkit.errors import PeftkitError

C = TypeVar("C", bound="Config")

__all__ = ["Config", "parse_override"]


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except PeftkitError:
                pass
        raise PeftkitError(f"{key}: expected {' or '.join(_type_name(a) for a in get_args(tp))}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise PeftkitError(f"{key}: expected None, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise PeftkitError(f"{key}: expected one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}")
    if origin in (list, tuple, dict):
        return _coerce_container(value, tp, origin, key)
    return _coerce_scalar(value, tp, key)


def _coerce_container(value: Any, tp: Any, origin: Any, key: str) -> Any:
    if origin is dict:
        if not isinstance(value, dict):
            raise PeftkitError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if not isinstance(value, (list, tuple)):
        raise PeftkitError(f"{key}: expected a list, got {value!r}")
    (item_tp, *_) = get_args(tp) or (Any,)
    items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise PeftkitError(f"{key}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise PeftkitError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


@dataclasses.dataclass
class Config:
    """Base class: subclasses are dataclasses whose fields are the config keys.

    `aliases` maps other spellings users know (Hugging Face's ``learning_rate``) to a field name.
    """

    aliases: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses raise `PeftkitError` naming the key."""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
        """Build from a mapping; unknown keys are errors listing close matches."""
        known = cls.keys()
        data = dict(data)
        for alias, name in cls.aliases.items():
            if alias in data:
                if name in data:
                    raise PeftkitError(f"{where}{alias!r} and {name!r} are the same key: give one")
                data[name] = data.pop(alias)
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, [*known, *cls.aliases], n=3)
                close = list(dict.fromkeys(cls.aliases.get(c, c) for c in close))
                hint = f" (did you mean {', '.join(close)}?)" if close else f" (known keys: {', '.join(known)})"
                raise PeftkitError(f"{where}unknown key {key!r} for {cls.__name__}{hint}")
        try:
            return cls(**data)
        except PeftkitError as e:
            raise PeftkitError(f"{where}{cls.__name__}.{e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: C, **changes: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **changes})


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Config):
        return value.to_dict()
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override; the value is read as YAML (numbers, lists, booleans, null)."""
    if "=" not in text:
        raise PeftkitError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise PeftkitError(f"override {text!r}: cannot read the value ({e.problem})") from None
    return key.strip(), value

"""Optimizer and scheduler state as safetensors + JSON: no pickle is written, and none is ever loaded.

A state dict (nested dicts, lists, tuples, tensors, numbers, strings, None) is split in two files: its tensors in
``<name>.safetensors`` under generated keys, and its structure in ``<name>.json`` where each tensor stands as
``{"__tensor__": key}``. Dicts whose keys are not all strings (an optimizer's ``state``, keyed by parameter index) and
tuples (``betas``) are tagged so that loading gives back the same Python types: a round trip is exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from peftkit.errors import PeftkitError

__all__ = ["load_state", "state_file_names", "write_state"]

TENSOR, ITEMS, TUPLE, FLOAT = "__tensor__", "__items__", "__tuple__", "__float__"


def state_file_names(name: str) -> tuple[str, str]:
    """The two files `name` is stored in: its tensors and its structure."""
    return f"{name}.safetensors", f"{name}.json"


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        # a copy of its own: safetensors refuses tensors that share memory (views of one buffer)
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {TENSOR: key}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {FLOAT: repr(value)}  # inf, nan: JSON has no spelling
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {TENSOR, ITEMS, TUPLE, FLOAT} & set(value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {ITEMS: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                        for k, v in value.items()]}
    raise PeftkitError(f"cannot store {where} ({type(value).__name__}) in a state file: only tensors, numbers, "
                       "strings, None, lists, tuples and dicts are stored")


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        if value[TENSOR] not in tensors:
            raise PeftkitError(f"{where}: tensor {value[TENSOR]!r} is missing from its .safetensors file")
        return tensors[value[TENSOR]]
    if FLOAT in value:
        return float(value[FLOAT])
    if TUPLE in value:
        return tuple(_decode(v, tensors, where) for v in value[TUPLE])
    if ITEMS in value:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value[ITEMS]}
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def write_state(state: dict[str, Any], name: str) -> dict[str, Any]:
    """The files of `state` as `peftkit.core.adapter_io.write_atomic_dir` takes them (file name -> writer)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(state, tensors, name), allow_nan=False)
    weights, text = state_file_names(name)
    return {weights: lambda p: save_file(tensors, str(p)), text: structure}


def load_state(folder: Path, name: str) -> dict[str, Any]:
    """`name`'s state as `write_state` stored it in `folder` (a `PeftkitError` naming the file when it is not)."""
    weights, text = state_file_names(name)
    if not (folder / text).is_file() and (folder / f"{name}.pt").is_file():
        raise PeftkitError(f"{folder / (name + '.pt')} is a pickle written by an older peftkit; peftkit no longer "
                           "loads pickles (they can run code): start a new run (--overwrite or another output_dir), "
                           "or finish this one with the peftkit version that wrote it")
    try:
        tensors = load_file(str(folder / weights))
        structure = json.loads((folder / text).read_text())
    except Exception as e:  # noqa: BLE001 - any unreadable piece makes the state unusable
        raise PeftkitError(f"{folder / text} (or its .safetensors) is unreadable: {str(e).splitlines()[0]}") from None
    return _decode(structure, tensors, str(folder / text))

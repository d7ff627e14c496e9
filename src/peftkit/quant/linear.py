"""Frozen quantized linear layers: `QuantLinear`, `quantize_model`, and saving/loading a quantized model.

A `QuantLinear` holds only the packed weight and its quantization state, as buffers. Each forward dequantizes the
weight to the compute dtype (bf16 by default), multiplies, and drops the dequantized copy; backward recomputes it
from the packed weight (torchao's `LinearNF4` pattern), so activations memory holds 4-bit weights only. Inputs get
gradients, the weight never does. There is no train/eval mode switch and no repacking on first use: the layer
computes the same thing whatever `model.train()`/`model.eval()`/`torch.no_grad()` say (the bitsandbytes 0.50 CPU
path repacks on an eval forward and silently drops gradients afterwards; see SPECS 6).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.context import check_block_size
from peftkit.errors import PeftkitError

from .blockwise import FORMATS, QuantState, dequantize, quantize
from .codebooks import codebook

if TYPE_CHECKING:
    from peftkit.core.context import Quantization

STATE_KEYS: tuple[str, ...] = ("absmax", "absmax_scale", "absmax_offset")
CONFIG_FILE, WEIGHTS_FILE = "quantization.json", "model.safetensors"
FILE_VERSION = 2  # 2: every layer carries a fingerprint of its format's codebook and its stored tensors
_LAYOUT_TYPES: dict[str, type] = {
    "in_features": int, "out_features": int, "bias": bool, "format": str, "block_size": int, "double_quant": bool,
    "compute_dtype": str, "weight_dtype": str, "fingerprint": str,
}  # fmt: skip
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


class _QuantMatmul(torch.autograd.Function):
    """`x @ W.T`, `W` dequantized from the packed codes in forward and again in backward.

    Only the packed uint8 weight (and its small state) is kept for backward, never the dense copy.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.state = state
        return F.linear(x, dequantize(packed, state, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (packed,) = ctx.saved_tensors
        return grad_out @ dequantize(packed, ctx.state, grad_out.dtype), None, None


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized (NF4 + double quantization by default).

    State-dict keys: `weight` (packed uint8 codes), `weight_absmax` (and `weight_absmax_scale`,
    `weight_absmax_offset` with double quantization), and `bias` if any. The bias is a frozen parameter (a method
    such as BitFit may unfreeze it).

    Attributes:
        in_features: input size.
        out_features: output size.
        compute_dtype: dtype of the dequantized weight and of the output.
        format: quantization format.
        block_size: elements per quantization block.
        double_quant: whether the block scales are quantized too.
    """

    weight: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        format: str = "nf4",
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        weight_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Build an empty layer (zero weight) of the given layout, e.g. to load a state dict into."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        data, state = quantize(
            torch.zeros(out_features, in_features, dtype=weight_dtype), format, block_size, double_quant
        )
        self._set_weight(data, state)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def _set_weight(self, data: torch.Tensor, state: QuantState) -> None:
        self.format, self.block_size, self.double_quant = state.format, state.block_size, state.double_quant
        self.weight_dtype = state.dtype
        self.register_buffer("weight", data)
        for key in STATE_KEYS:
            self._buffers.pop(f"weight_{key}", None)
        for key, tensor in state.tensors().items():
            self.register_buffer(f"weight_{key}", tensor)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        format: str = "nf4",
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> QuantLinear:
        """Quantize an `nn.Linear` (or a GPT-2 `Conv1D`, whose weight is stored in x out) into a QuantLinear."""
        weight = _linear_weight(linear)
        out_features, in_features = weight.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.compute_dtype = in_features, out_features, compute_dtype
        layer._set_weight(*quantize(weight.detach(), format, block_size, double_quant))
        bias = getattr(linear, "bias", None)
        layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def state(self) -> QuantState:
        """The weight's `QuantState`, built from the current buffers (so it follows `.to(device)`)."""
        # buffers, or frozen parameters once a sharded run made them so (`peftkit.train.sharding`)
        tensors = {k: t for k in STATE_KEYS if (t := getattr(self, f"weight_{k}", None)) is not None}
        meta = {
            "format": self.format, "block_size": self.block_size, "shape": [self.out_features, self.in_features],
            "dtype": str(self.weight_dtype).removeprefix("torch."), "double_quant": self.double_quant,
        }  # fmt: skip
        return QuantState.from_parts(tensors, meta)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense `(out_features, in_features)` tensor, in `dtype` (default: compute dtype)."""
        return dequantize(self.weight, self.state, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _QuantMatmul.apply(x.to(self.compute_dtype), self.weight, self.state)
        if self.bias is not None:
            out = out + self.bias.to(self.compute_dtype)
        return out

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense `nn.Linear` with the dequantized weight (default dtype: the original weight's)."""
        dtype = dtype or self.weight_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=dtype)  # fmt: skip
        with torch.no_grad():
            linear.weight.copy_(self.dequantize_weight(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # Note: `model.to(torch.bfloat16)` / `.half()` cast every floating buffer; the float32 state tensors are
        # part of the weight format, so they may move between devices but keep their dtype.
        before = {k: b for k, b in self._buffers.items() if k.startswith("weight_") and b is not None}
        super()._apply(fn, recurse)
        for key, old in before.items():
            new = self._buffers[key]
            if new is not None and new.dtype != old.dtype:
                self._buffers[key] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        dq = "+dq" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}{dq}, block_size={self.block_size}, compute_dtype={self.compute_dtype}")

    def layout(self) -> dict[str, Any]:
        """JSON-friendly constructor arguments (what `load_quantized` needs to rebuild the layer)."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
            "format": self.format, "block_size": self.block_size, "double_quant": self.double_quant,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "weight_dtype": str(self.weight_dtype).removeprefix("torch."),
        }  # fmt: skip


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The `(out, in)` weight of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.weight
    if _is_conv1d(module):
        return module.weight.t()  # type: ignore[operator]  # Conv1D stores (in, out) and computes x @ W + b
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """True if `name` equals, ends with `.pattern`, or fully matches `pattern` as a regex."""
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:
            continue
    return False


@dataclass
class QuantReport:
    """What `quantize_model` did.

    Attributes:
        quantized: names of the replaced modules.
        skipped: names of linear modules left as they were (matched by `skip`).
        params: number of weight parameters quantized.
        bytes_before: bytes of those weights before.
        bytes_after: bytes of packed data plus state tensors after.
    """

    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    params: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_after / max(self.params, 1)

    def __str__(self) -> str:
        return (f"quantized {len(self.quantized)} layers ({self.params:,} weights, {self.bytes_before / 2**20:.1f} MiB "
                f"-> {self.bytes_after / 2**20:.1f} MiB, {self.bits_per_param:.3f} bits/param); "
                f"skipped {self.skipped or 'none'}")  # fmt: skip


def apply_quantization(model: nn.Module, quantization: Quantization,
                       compute_dtype: torch.dtype = torch.float32) -> QuantReport:
    """Quantize `model` in place as a training context records it (format, block size, double quantization, the
    modules left alone); returns the `QuantReport`."""
    return quantize_model(model, quantization.format, block_size=quantization.block_size,
                          double_quant=quantization.double_quant, compute_dtype=compute_dtype, skip=quantization.skip)


def quantize_model(
    model: nn.Module,
    format: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: Iterable[str] = ("lm_head",),
) -> QuantReport:
    """Replace every nn.Linear / GPT-2 Conv1D of `model` by a QuantLinear, in place.

    Embeddings are never touched (they are not linear layers); the output head is skipped by default.

    Args:
        model: the model to modify.
        format, block_size, double_quant, compute_dtype: as for `QuantLinear.from_linear`.
        skip: module names to leave alone: exact names, name suffixes (`"lm_head"` matches `"model.lm_head"`),
            or regexes matched against the full name.

    Returns:
        A `QuantReport`.

    Raises:
        ValueError: the model has no linear layer to quantize.
    """
    skip = tuple(skip)
    report = QuantReport()
    targets = []
    for name, module in model.named_modules():
        if not name or not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            continue
        if _matches(name, skip):
            report.skipped.append(name)
        else:
            targets.append(name)
    if not targets:
        raise ValueError(f"no nn.Linear/Conv1D module to quantize in {type(model).__name__} (skip={skip})")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        weight = _linear_weight(linear)
        layer = QuantLinear.from_linear(linear, format, block_size, double_quant, compute_dtype)
        setattr(parent, child, layer)
        report.quantized.append(name)
        report.params += weight.numel()
        report.bytes_before += weight.numel() * weight.element_size()
        report.bytes_after += sum(b.numel() * b.element_size() for b in layer.buffers())
    return report


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every QuantLinear of `model` by a dense `nn.Linear` with its dequantized weight, in place.

    Returns the names of the replaced modules.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).to_linear(dtype))
    return names


def save_quantized(model: nn.Module, folder: str | Path) -> Path:
    """Save a model quantized with `quantize_model`: `model.safetensors` + `quantization.json`.

    The JSON records the layout of every QuantLinear; a transformers model's config is saved too
    (`config.json`), so that `load_quantized` can rebuild the model without being given one.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {name: m.layout() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("model has no QuantLinear layer; quantize it first with quantize_model")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _untie(tensors)
    for name, layout in layers.items():
        layout["fingerprint"] = _fingerprint(name, layout, tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "peftkit": "quantized"})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(folder)  # config.json, for load_quantized without a model
    (folder / CONFIG_FILE).write_text(json.dumps({"version": FILE_VERSION, "layers": layers}, indent=1))
    return folder


def _fingerprint(name: str, layout: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (first 16 hex digits) of a layer's layout, its format's codebook and its stored quantized tensors.

    Note:
        NF4 and FP4 (and int4) codes are the same uint8 nibbles with the same block scales: nothing in the tensors
        says which table they index, so a `quantization.json` edited from nf4 to fp4 would load and compute with
        the wrong values. The fingerprint ties the recorded format to the codebook and to the exact tensors. The
        compute dtype is left out: it is how to run the layer, not what was stored, and may be changed.
    """
    recorded = {k: v for k, v in layout.items() if k not in ("fingerprint", "compute_dtype")}  # compute: a choice
    digest = hashlib.sha256(json.dumps(recorded, sort_keys=True).encode())
    digest.update(codebook(layout["format"]).values.float().numpy().tobytes())
    for key in ("weight", *(f"weight_{k}" for k in STATE_KEYS)):
        t = tensors.get(f"{name}.{key}")
        if t is not None:
            digest.update(key.encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:16]


def _check_file(path: Path, meta: Any) -> dict[str, dict[str, Any]]:
    """The layers of a `quantization.json`, every field checked for presence, type and known values."""
    if not isinstance(meta, dict):
        raise PeftkitError(f"{path}: expected an object with version and layers, got a {type(meta).__name__}")
    version = meta.get("version")
    if version != FILE_VERSION:
        older = isinstance(version, int) and not isinstance(version, bool) and 0 < version < FILE_VERSION
        hint = (" (written by an older peftkit, without per-layer fingerprints: quantize and save the model again)"
                if older else "")
        raise PeftkitError(f"{path}: unsupported version {version!r}; this peftkit reads version {FILE_VERSION}"
                           + hint)
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise PeftkitError(f"{path}: layers must be a non-empty object of layer name -> layout, got "
                           f"{type(layers).__name__}")
    for name, layout in layers.items():
        _check_layout(f"{path}: layer {name!r}", layout)
    return layers


def _check_layout(where: str, layout: Any) -> None:
    """One layer's layout in a `quantization.json`: every field present, of its type, with a known value."""
    if not isinstance(layout, dict):
        raise PeftkitError(f"{where}: the layout must be an object, got a {type(layout).__name__}")
    missing, unknown = _LAYOUT_TYPES.keys() - layout.keys(), layout.keys() - _LAYOUT_TYPES.keys()
    if missing or unknown:
        problem = f"missing {sorted(missing)}" if missing else f"unknown keys {sorted(unknown)}"
        raise PeftkitError(f"{where}: {problem}")
    for key, kind in _LAYOUT_TYPES.items():
        value = layout[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PeftkitError(f"{where}: {key} must be of type {kind.__name__}, got {value!r}")
    if layout["format"] not in FORMATS:
        raise PeftkitError(f"{where}: unknown format {layout['format']!r}; expected one of {list(FORMATS)}")
    for key in ("compute_dtype", "weight_dtype"):
        if layout[key] not in _FLOAT_DTYPES:
            raise PeftkitError(f"{where}: {key} {layout[key]!r} is not one of {list(_FLOAT_DTYPES)}")
    if layout["in_features"] <= 0 or layout["out_features"] <= 0:
        raise PeftkitError(f"{where}: in_features and out_features must be > 0")
    try:
        check_block_size(layout["block_size"])
    except ValueError as e:
        raise PeftkitError(f"{where}: {e}") from None


def _untie(tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors sharing memory (tied embeddings): give each its own copy."""
    seen: dict[tuple[int, int], str] = {}
    for key, t in tensors.items():
        ident = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if ident in seen and t.numel():
            tensors[key] = t.clone()
        seen[ident] = key


def load_quantized(folder: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a model saved by `save_quantized`.

    Args:
        folder: the folder written by `save_quantized`.
        model: an un-quantized model of the same architecture to load into (its weights are replaced). If
            omitted, the folder's `config.json` is used to build a transformers causal LM.

    Returns:
        The model, with QuantLinear layers in place, loaded strictly.

    Raises:
        ValueError: a file is missing or corrupt, or the model does not match the saved layout.
    """
    folder = Path(folder)
    layers, tensors = _read_files(folder)
    if model is None:
        model = _model_from_config(folder)
    for name, layout in layers.items():
        try:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            getattr(parent, child)
        except AttributeError as e:
            raise ValueError(f"saved quantized layer {name!r} does not exist in {type(model).__name__}") from e
        setattr(parent, child, _empty_layer(name, layout))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match the model: {e}") from e
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            try:
                module.state.validate(module.weight)
            except ValueError as e:
                raise ValueError(f"layer {name!r}: {e}") from e
    for name, layout in layers.items():  # last: everything else fits, but do the codes mean what the file says?
        if _fingerprint(name, layout, tensors) != layout["fingerprint"]:
            raise PeftkitError(f"{folder / CONFIG_FILE}: layer {name!r} does not match its stored tensors (its "
                               f"{layout['format']} layout or its tensors in {WEIGHTS_FILE} were changed, or the "
                               "two files come from different saves); save the quantized model again")
    return model


def _read_files(folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """The checked layer layouts and the tensors of a folder written by `save_quantized`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / f).is_file():
            raise ValueError(f"{folder} is not a saved quantized model: {f} is missing")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftkitError(f"{folder / CONFIG_FILE} is corrupt: {e}") from None
    layers = _check_file(folder / CONFIG_FILE, meta)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise PeftkitError(f"{folder / WEIGHTS_FILE} is corrupt: {e}") from None
    return layers, tensors


def _empty_layer(name: str, layout: dict[str, Any]) -> QuantLinear:
    try:
        args = {k: v for k, v in layout.items() if k != "fingerprint"}
        args["compute_dtype"] = getattr(torch, args["compute_dtype"])
        args["weight_dtype"] = getattr(torch, args["weight_dtype"])
        return QuantLinear(**args)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"quantization layout of layer {name!r} is corrupt: {e}") from e


def _model_from_config(folder: Path) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: pass the model to load into")
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))

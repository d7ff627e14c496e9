"""Blockwise quantization of a tensor: `quantize(x) -> (data, state)`, `dequantize(data, state)`.

The tensor is flattened row-major and cut into blocks of `block_size` elements (a trailing partial block gets its
own scale). Per block, `absmax = max|x|` (float32); `x / absmax`, clamped to [-1, 1], is mapped to the nearest
code of the format's codebook. Dequantization is `value[code] * absmax`.

Double quantization (QLoRA) quantizes the float32 block scales themselves, exactly as bitsandbytes does:
`offset = mean(absmax)`; `absmax - offset` is quantized blockwise (block 256, float32 scale per block) to the
8-bit signed dynamic map; restored as `dyn[q] * scale + offset`. For NF4 at block 64 this stores
4 + 8/64 + 32/(64*256) = 4.127 bits per parameter instead of 4.5.

The state is serialisable: `state.tensors()` (safetensors-friendly) plus `state.meta()` (JSON-friendly), and
`QuantState.from_parts(tensors, meta)` validates and rebuilds it.

Note:
    Speed. Quantization runs over chunks of 2**21 elements with reused buffers (allocating fresh 64 MB
    temporaries costs more than the arithmetic on CPU: first-touch page faults), and finds the nearest code
    with `CellTable` (two table gathers) instead of a binary search per element. Smaller chunks fit the cache
    better but multiply the number of parallel regions: on an oversubscribed CPU each one waits for a
    descheduled thread: 2**18-element chunks measured up to 10x slower than 2**22 under load, though faster
    when the CPU is idle. Dequantization of 4-bit formats on CPU runs the compiled kernel of `native` (one
    pass; `python bench/quant.py` times both); the PyTorch path (any device, any format, and the fallback)
    gathers one int64 per byte from a 256-entry table holding both decoded values, then scales. Both give the
    same bits. The numbers are bitsandbytes', bit for bit: full blocks are scaled by `x * (1 / absmax)`, the
    trailing partial block by `x / absmax`, both as bitsandbytes does on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftkit.core.context import FORMATS, check_block_size  # FORMATS: the names a training context records

from . import native
from .codebooks import Codebook, codebook
from .packing import pair_table, unpack_4bit
from .scaling import check_float, clip_threshold, num_blocks

DQ_BLOCK = 256  # block size of the second level of double quantization (fixed, as in bitsandbytes)
CHUNK = 1 << 21  # elements per pass, buffers reused (see the Note above on the size)
STATE_VERSION = 1
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


@dataclass
class QuantState:
    """Everything needed to dequantize `data`, besides `data` itself.

    Attributes:
        format: "nf4", "fp4", "int4" or "int8".
        block_size: elements per block.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (the default dequantization dtype).
        absmax: float32 block scales, or their uint8 codes when double-quantized.
        absmax_scale: float32 second-level scales, one per 256 first-level scales (double quantization only).
        absmax_offset: float32 scalar subtracted before the second level (double quantization only).
        clip_threshold: the clipping threshold used, if any (the block scales never exceed it).
        clipped: number of elements whose magnitude exceeded the threshold.
    """

    format: str
    block_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    clip_threshold: float | None = None
    clipped: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def bits(self) -> int:
        return codebook(self.format).bits

    def scales(self) -> torch.Tensor:
        """The float32 block scales (undoing double quantization if needed)."""
        if not self.double_quant:
            return self.absmax
        assert self.absmax_scale is not None and self.absmax_offset is not None  # set with double_quant
        return double_dequantize(self.absmax, self.absmax_scale, self.absmax_offset)

    def tensors(self) -> dict[str, torch.Tensor]:
        """State tensors by name (`absmax`, and `absmax_scale`, `absmax_offset` when double-quantized)."""
        out = {"absmax": self.absmax}
        if self.double_quant:
            assert self.absmax_scale is not None and self.absmax_offset is not None  # set with double_quant
            out |= {"absmax_scale": self.absmax_scale, "absmax_offset": self.absmax_offset}
        return out

    def meta(self) -> dict[str, Any]:
        """JSON-friendly description (no tensors)."""
        return {
            "version": STATE_VERSION, "format": self.format, "block_size": self.block_size,
            "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
            "double_quant": self.double_quant, "clip_threshold": self.clip_threshold, "clipped": self.clipped,
        }  # fmt: skip

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> QuantState:
        """Rebuild a state from `tensors()` and `meta()`; raises ValueError naming anything inconsistent."""
        if not isinstance(meta, dict):
            raise ValueError(f"quantization state meta must be a dict, got {type(meta).__name__}")
        missing = {"format", "block_size", "shape", "dtype", "double_quant"} - set(meta)
        if missing:
            raise ValueError(f"quantization state meta lacks {sorted(missing)}")
        if meta.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(f"unsupported quantization state version {meta['version']} (expected {STATE_VERSION})")
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"quantization state dtype {meta['dtype']!r} is not one of {sorted(_DTYPES)}")
        shape = meta["shape"]
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"quantization state shape must be a list of non-negative ints, got {shape!r}")
        if not isinstance(meta["double_quant"], bool):
            raise ValueError(f"quantization state double_quant must be true or false, got {meta['double_quant']!r}")
        clip, clipped = meta.get("clip_threshold"), meta.get("clipped", 0)
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))):
            raise ValueError(f"quantization state clip_threshold must be a number or null, got {clip!r}")
        if isinstance(clipped, bool) or not isinstance(clipped, int) or clipped < 0:
            raise ValueError(f"quantization state clipped must be a count (int >= 0), got {clipped!r}")
        dq = meta["double_quant"]
        expected = {"absmax", "absmax_scale", "absmax_offset"} if dq else {"absmax"}
        if set(tensors) != expected:
            raise ValueError(
                f"quantization state tensors are {sorted(tensors)}, expected {sorted(expected)} "
                f"(double_quant={dq})"
            )
        state = cls(
            format=meta["format"], block_size=meta["block_size"], shape=tuple(shape),
            dtype=_DTYPES[meta["dtype"]], absmax=tensors["absmax"], absmax_scale=tensors.get("absmax_scale"),
            absmax_offset=tensors.get("absmax_offset"), clip_threshold=clip, clipped=clipped,
        )  # fmt: skip
        state.validate()
        return state

    def validate(self, data: torch.Tensor | None = None) -> None:
        """Check that the state (and `data`, if given) is consistent; raise ValueError naming the problem."""
        if self.format not in FORMATS:
            raise ValueError(f"unknown quantization format {self.format!r}; expected one of {list(FORMATS)}")
        check_block_size(self.block_size)
        blocks = num_blocks(self.numel, self.block_size)
        _expect(self.absmax, "absmax", torch.uint8 if self.double_quant else torch.float32, blocks)
        if self.double_quant:
            _expect(self.absmax_scale, "absmax_scale", torch.float32, num_blocks(blocks, DQ_BLOCK))
            _expect(self.absmax_offset, "absmax_offset", torch.float32, 1)
        elif self.absmax_offset is not None:
            raise ValueError("quantization state has absmax_offset but no absmax_scale")
        if data is not None:
            size = self.numel if self.bits == 8 else -(-self.numel // 2)
            _expect(data, "quantized data", torch.uint8, size)

    def to(self, device: torch.device | str) -> QuantState:
        """A copy with the state tensors on `device`."""
        move = {k: v.to(device) for k, v in self.tensors().items()}
        return QuantState.from_parts(move, self.meta())


def _expect(t: torch.Tensor | None, name: str, dtype: torch.dtype, numel: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"quantization state: {name} is missing")
    if t.dtype != dtype:
        raise ValueError(f"quantization state: {name} has dtype {t.dtype}, expected {dtype}")
    if t.numel() != numel:
        raise ValueError(f"quantization state: {name} has {t.numel()} elements, expected {numel}")


def quantize(
    x: torch.Tensor,
    format: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    clip_percentile: float | None = None,
    clip_value: float | None = None,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a float tensor blockwise.

    Args:
        x: float tensor (fp32, fp16, bf16), any shape, any device.
        format: "nf4" (default), "fp4", "int4" or "int8".
        block_size: power of two in [32, 4096].
        double_quant: quantize the block scales too (8-bit dynamic map, block 256).
        clip_percentile: clip |x| at this percentile (e.g. 99.9) before scaling: block scales are capped at the
            threshold and values beyond it saturate. Mutually exclusive with `clip_value`.
        clip_value: clip |x| at this fixed threshold.

    Returns:
        `(data, state)`: uint8 `data` (two codes per byte, first in the high nibble, for 4-bit formats; one
        code per byte for int8), and the `QuantState`.

    Raises:
        TypeError: `x` is not a floating-point tensor.
        ValueError: unknown format, bad block size, empty tensor, bad clipping argument.
    """
    check_float(x)
    if format not in FORMATS:
        raise ValueError(f"unknown quantization format {format!r}; expected one of {list(FORMATS)}")
    check_block_size(block_size)
    if x.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    book = codebook(format)
    threshold, clipped = None, 0
    if clip_percentile is not None or clip_value is not None:
        threshold = clip_threshold(x, clip_value, clip_percentile)
        clipped = int((x.detach().abs() > threshold).sum())
    flat = x.detach().reshape(-1)
    n, bs = flat.numel(), block_size
    full = n // bs * bs
    absmax = torch.empty(num_blocks(n, bs), dtype=torch.float32, device=x.device)
    data = torch.empty(n if book.bits == 8 else -(-n // 2), dtype=torch.uint8, device=x.device)
    _quantize_blocks(flat[:full], bs, book, threshold, absmax, data)
    if full < n:
        _quantize_tail(flat[full:], book, threshold, absmax, data, full)
    state = QuantState(format, bs, tuple(x.shape), x.dtype, absmax, clip_threshold=threshold, clipped=clipped)
    if double_quant:
        state.absmax, state.absmax_scale, state.absmax_offset = double_quantize(absmax)
    return data, state


def _quantize_blocks(flat: torch.Tensor, bs: int, book: Codebook, threshold: float | None, absmax: torch.Tensor,
                     data: torch.Tensor) -> None:
    """The whole blocks of `flat` into `absmax` and `data`, in chunks of `CHUNK` elements through reused buffers."""
    full = flat.numel()
    chunk = max(min(CHUNK, full), 1)
    work = torch.empty(chunk, dtype=torch.float32, device=flat.device)
    codes = torch.empty(chunk, dtype=torch.uint8, device=flat.device)
    widened = torch.empty(chunk, dtype=torch.float32, device=flat.device) if flat.dtype != torch.float32 else None
    for start in range(0, full, chunk):
        stop = min(start + chunk, full)
        m = stop - start
        src = flat[start:stop].view(-1, bs)
        if widened is not None:  # exact for fp16/bf16; fp64 is rounded to float32 first
            src = widened[:m].view(-1, bs).copy_(src)
        buf = work[:m].view(-1, bs)
        scale = absmax[start // bs : stop // bs]
        torch.amax(torch.abs(src, out=buf), dim=1, out=scale)  # max |x| (30x faster on CPU than vector_norm inf)
        if threshold is not None:
            scale.clamp_(max=threshold)
        torch.mul(src, scale.clamp(min=1e-38).reciprocal_().unsqueeze(1), out=buf)
        buf.clamp_(-1, 1)
        _store(book, work[:m], codes[:m], data, start)


def _quantize_tail(tail: torch.Tensor, book: Codebook, threshold: float | None, absmax: torch.Tensor,
                   data: torch.Tensor, start: int) -> None:
    """The last, partial block (elements from `start` on): its own scale in ``absmax[-1]``."""
    tail = tail.float()
    absmax[-1] = tail.abs().amax()
    if threshold is not None:
        absmax[-1:].clamp_(max=threshold)
    scaled = torch.clamp(tail / absmax[-1].clamp(min=1e-38), -1, 1)
    if book.bits == 4 and scaled.numel() % 2:
        # An odd count is padded with the code of 0.0 (not code 0), as bitsandbytes does.
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    _store(book, scaled.contiguous(), None, data, start)


def _store(book: Codebook, scaled: torch.Tensor, codes: torch.Tensor | None, data: torch.Tensor, start: int) -> None:
    """Quantize `scaled` (values in [-1, 1]) and write its codes into `data` from element `start`."""
    codes = book.quantize(scaled, out=codes)
    if book.bits == 8:
        data[start : start + codes.numel()] = codes
        return
    torch.bitwise_or(codes[0::2] << 4, codes[1::2], out=data[start // 2 : start // 2 + codes.numel() // 2])


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize float32 block scales to 8 bits (second level of double quantization).

    Args:
        absmax: float32 first-level scales.

    Returns:
        `(codes, scale, offset)`: uint8 codes (one per scale) into the signed dynamic map, float32
        second-level scales (one per 256 codes), and the float32 scalar `offset = mean(absmax)`.
    """
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    blocks = num_blocks(n, DQ_BLOCK)
    padded = torch.nn.functional.pad(centred, (0, blocks * DQ_BLOCK - n)).view(blocks, DQ_BLOCK)
    scale = padded.abs().amax(dim=1)
    # A block of identical scales has scale 0: its codes pick 0.0 and restore to the offset exactly.
    inverse = torch.where(scale > 0, scale, torch.ones_like(scale)).reciprocal()
    normed = (padded * inverse.unsqueeze(1)).reshape(-1)[:n].contiguous()
    return codebook("dynamic8").quantize(normed), scale, offset


def double_dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Restore float32 block scales: `dyn[codes] * scale + offset` (inverse of `double_quantize`)."""
    n = codes.numel()
    values = codebook("dynamic8").values.to(codes.device)
    decoded = torch.index_select(values, 0, codes.int())
    padded = torch.nn.functional.pad(decoded, (0, scale.numel() * DQ_BLOCK - n)).view(-1, DQ_BLOCK)
    return (padded * scale.unsqueeze(1)).reshape(-1)[:n] + offset


_PAIR_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _pair_table(format: str, device: torch.device) -> torch.Tensor:
    key = (format, device)
    if key not in _PAIR_TABLES:
        _PAIR_TABLES[key] = pair_table(codebook(format).values).to(device)
    return _PAIR_TABLES[key]


def dequantize(data: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reconstruct the tensor: `value[code] * absmax`, computed in float32 and cast to `dtype`.

    Args:
        data: the uint8 codes from `quantize`.
        state: its `QuantState`.
        dtype: output dtype (default: the original tensor's dtype).

    Returns:
        Tensor of `state.shape` on `data`'s device.

    Raises:
        ValueError: `data` and `state` are inconsistent (wrong sizes or dtypes).
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    state.validate(data)
    dtype = dtype or state.dtype
    n, bs = state.numel, state.block_size
    full = n // bs * bs
    book = codebook(state.format)
    data = data.reshape(-1)
    out = torch.empty(n, dtype=dtype, device=data.device)
    # 4-bit formats on CPU: the compiled kernel (it also undoes double quantization); else the PyTorch path.
    done = book.bits == 4 and native.dequantize_validated(data, state, out[:full])
    if done and full == n:
        return out.view(state.shape)
    scales = state.scales().to(data.device)
    values = book.values.to(data.device)
    if not done:
        _dequantize_blocks(data, scales, book, out[:full], bs)
    if full < n:
        if book.bits == 4:
            codes = unpack_4bit(data[full // 2 :], n - full)
        else:
            codes = data[full:]
        tail = torch.index_select(values, 0, codes.int()) * scales[-1]
        out[full:] = tail
    return out.view(state.shape)


def _dequantize_blocks(data: torch.Tensor, scales: torch.Tensor, book: Codebook, out: torch.Tensor, bs: int) -> None:
    """The PyTorch path of `dequantize` for the full blocks (`out`): decode a chunk into a float32 buffer, scale."""
    full = out.numel()
    chunk = max(min(CHUNK, full), 1)
    per_byte = 2 if book.bits == 4 else 1
    # 4-bit: an int64 table entry holds the two float32 values a byte decodes to (one gather per byte).
    table = _pair_table(book.name, data.device) if book.bits == 4 else book.values.to(data.device)
    index = torch.empty(chunk // per_byte, dtype=torch.int32, device=data.device)
    decoded = torch.empty(chunk, dtype=torch.float32, device=data.device)
    for start in range(0, full, chunk):
        stop = min(start + chunk, full)
        codes = index[: (stop - start) // per_byte]
        codes.copy_(data[start // per_byte : stop // per_byte])
        values = decoded[: stop - start].view(-1, bs)
        torch.index_select(table, 0, codes, out=values.view(-1).view(table.dtype))
        block_scales = scales[start // bs : stop // bs].unsqueeze(1)
        # The output is written once, by one parallel op (its first touch: page faults of a fresh tensor).
        if out.dtype == torch.float32:
            torch.mul(values, block_scales, out=out[start:stop].view(-1, bs))
        else:  # a float32 multiply writing another dtype takes a slow path: scale in place, then cast
            out[start:stop] = values.mul_(block_scales).view(-1)


def storage_bits(data: torch.Tensor, state: QuantState) -> float:
    """Measured storage in bits per parameter: bytes of `data` and of every state tensor."""
    total = data.numel() * data.element_size()
    total += sum(t.numel() * t.element_size() for t in state.tensors().values())
    return 8 * total / state.numel

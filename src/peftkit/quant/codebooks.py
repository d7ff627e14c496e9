"""Codebooks: the value tables of the quantization formats, and nearest-code search.

A codebook maps a small integer code to a float in [-1, 1]. Quantizing a normalised value means picking the
nearest entry; dequantizing is a table lookup. "Nearest" is decided by the midpoints between neighbouring sorted
entries, a value exactly on a midpoint going to the lower entry (what `torch.bucketize(..., right=False)` does and
what bitsandbytes does), so every format here rounds the same way.

Tables (NF4, FP4) are the literal float32 values bitsandbytes uses; recomputing them from quantiles would not be
bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch

# NF4: quantiles of N(0, 1), 7 negative, an exact zero, 8 positive, normalised by the largest (QLoRA, App. E).
NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# FP4 E2M1 with the sign in bit 3, scaled so the largest magnitude is 1; index 1 is the subnormal.
FP4_VALUES: tuple[float, ...] = (
    0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
    -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25,
)  # fmt: skip


def int_values(bits: int) -> torch.Tensor:
    """Uniform symmetric integer grid, code `i` standing for `(i - 2**(bits-1)) / (2**(bits-1) - 1)`.

    Args:
        bits: 4 (codes stand for -8..7, divided by 7) or 8 (-128..127, divided by 127).

    Returns:
        float32 tensor of `2**bits` values, sorted. The most negative entry lies below -1 and is never chosen for
        absmax-scaled input (which is clamped to [-1, 1]); it is kept so that the code is simply `q + 2**(bits-1)`.
    """
    half = 2 ** (bits - 1)
    return (torch.arange(2**bits, dtype=torch.float64) - half).div(half - 1).float()


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic tree map of Dettmers (2016), as bitsandbytes builds it (`create_dynamic_map`).

    For each decimal exponent `10**(e - max_exponent_bits + 1)`, `e = 0..max_exponent_bits-1`, the interval
    [0.1, 1] is cut into `2**(e + non_sign_bits - max_exponent_bits)` (doubled when unsigned) equal pieces and
    their centres are the entries; the signed map mirrors them. Zero and 1.0 are added. Used for the second
    level of double quantization.

    Args:
        signed: mirror the entries to negative values (the double-quantization map is signed).
        max_exponent_bits: number of decimal exponents.
        total_bits: bits per code; the map has `2**total_bits` entries (zero-padded if fewer are generated).

    Returns:
        Sorted float32 tensor of `2**total_bits` entries.
    """
    non_sign_bits = total_bits - 1
    values: list[float] = []

    def add_level(exponent: int, pieces: int) -> None:
        # float32 arithmetic throughout: the map must equal bitsandbytes' bit for bit
        edges = torch.linspace(0.1, 1, pieces + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + exponent)
        values.extend((scale * centres).tolist())
        if signed:
            values.extend((-scale * centres).tolist())

    for e in range(max_exponent_bits):
        shift = 0 if signed else 1
        add_level(e, 2 ** (e + non_sign_bits - max_exponent_bits + shift))
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:
        add_level(max_exponent_bits - 1, extra)
    values += [0.0, 1.0]
    if len(values) > 2**total_bits:
        raise ValueError(f"dynamic map has {len(values)} entries, more than 2**{total_bits}")
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def midpoints(sorted_code: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between neighbouring entries of a sorted codebook (float32)."""
    if sorted_code.ndim != 1 or sorted_code.numel() < 2:
        raise ValueError(f"a codebook is a 1-D tensor of >= 2 entries, got shape {tuple(sorted_code.shape)}")
    if bool((sorted_code[1:] < sorted_code[:-1]).any()):
        raise ValueError("codebook must be sorted ascending")
    return (sorted_code[:-1] + sorted_code[1:]) / 2


def nearest_code(x: torch.Tensor, sorted_code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted codebook, for every element of `x` (reference implementation).

    Args:
        x: float tensor, any shape.
        sorted_code: 1-D ascending codebook.

    Returns:
        int64 tensor shaped like `x`; a value exactly on a midpoint gets the lower index.
    """
    return torch.bucketize(x.float(), midpoints(sorted_code.float()).to(x.device))


def lookup(codes: torch.Tensor, code_values: torch.Tensor) -> torch.Tensor:
    """Dequantize by table lookup: `code_values[codes]`."""
    return code_values.to(codes.device)[codes.long()]


@dataclass(frozen=True)
class CellTable:
    """A fast, exact nearest-code search for a sorted codebook.

    `torch.bucketize` costs a binary search per element. Instead, split the float32 line into 65536 cells by the
    upper 16 bits of the IEEE pattern (sign, exponent, 7 mantissa bits): each cell is an exact interval of floats.
    For each cell store `below` = the number of midpoints under the whole cell and `mid` = the one midpoint
    inside it (+inf if none). Then `bucketize(s) == below[cell] + (s > mid[cell])`: two table gathers, a shift
    and a compare, no rounding anywhere. Valid when no cell holds two midpoints (true for every format here;
    `build` returns None otherwise and callers fall back to bucketize).
    """

    below: torch.Tensor  # uint8 (65536,)
    mid: torch.Tensor  # float32 (65536,)
    _by_device: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def build(mids: torch.Tensor) -> CellTable | None:
        high = torch.arange(-32768, 32768, dtype=torch.int32)
        first = (high << 16).view(torch.float32)  # cell ends: low 16 bits all 0 and all 1
        last = ((high << 16) | 0xFFFF).view(torch.float32)
        lo, hi = torch.where(high < 0, last, first), torch.where(high < 0, first, last)
        finite = ~(lo.isnan() | hi.isnan())
        below = torch.searchsorted(mids, lo.contiguous(), side="left")  # midpoints < every value of the cell
        upto = torch.searchsorted(mids, hi.contiguous(), side="right")  # midpoints <= the largest value
        if int((upto - below)[finite].max()) > 1 or mids.numel() > 255:
            return None
        inside = mids[below.clamp(max=mids.numel() - 1)]
        mid = torch.where(upto > below, inside, torch.full_like(inside, float("inf")))
        return CellTable(below.to(torch.uint8), mid)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._by_device:
            self._by_device[device] = (self.below.to(device), self.mid.to(device))
        return self._by_device[device]

    def search(self, s: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest-code positions (uint8) of a contiguous 1-D float32 tensor `s`."""
        below, mid = self.on(s.device)
        cell = (s.view(torch.int32) >> 16).add_(32768)
        ahead = torch.index_select(mid, 0, cell)
        return torch.add(torch.index_select(below, 0, cell), torch.gt(s, ahead, out=ahead.bool()), out=out)


@dataclass(frozen=True)
class Codebook:
    """A codebook with its search structures.

    Attributes:
        name: format name.
        bits: bits per code (4 or 8).
        values: float32 value of each code, indexed by code (not necessarily sorted, e.g. FP4).
        order: codes sorted by value (stable, so FP4's +0 comes before -0, as in bitsandbytes).
        mids: midpoints between consecutive sorted values.
        cells: fast exact search table, or None (then bucketize is used).
    """

    name: str
    bits: int
    values: torch.Tensor
    order: torch.Tensor
    mids: torch.Tensor
    cells: CellTable | None

    @staticmethod
    def from_values(name: str, bits: int, values: torch.Tensor) -> Codebook:
        values = values.float()
        order = torch.argsort(values, stable=True)
        mids = midpoints(values[order])
        return Codebook(name, bits, values, order.to(torch.uint8), mids, CellTable.build(mids))

    @property
    def is_sorted(self) -> bool:
        return bool((self.order == torch.arange(len(self.order))).all())

    def quantize(self, s: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (uint8) of a contiguous 1-D float32 tensor `s` of values in [-1, 1]."""
        if self.cells is not None:
            pos = self.cells.search(s, out=out)
        else:
            pos = torch.bucketize(s, self.mids.to(s.device), out_int32=True).to(torch.uint8)
            if out is not None:
                pos = out.copy_(pos)
        if self.is_sorted:
            return pos
        return torch.index_select(self.order.to(s.device), 0, pos.int(), out=pos)


@cache
def codebook(name: str) -> Codebook:
    """The codebook of a format: "nf4", "fp4", "int4", "int8" or "dynamic8" (double-quantization map)."""
    tables = {
        "nf4": (4, lambda: torch.tensor(NF4_VALUES, dtype=torch.float32)),
        "fp4": (4, lambda: torch.tensor(FP4_VALUES, dtype=torch.float32)),
        "int4": (4, lambda: int_values(4)),
        "int8": (8, lambda: int_values(8)),
        "dynamic8": (8, lambda: dynamic_map(signed=True)),
    }
    if name not in tables:
        raise ValueError(f"unknown quantization format {name!r}; expected one of {sorted(tables)}")
    bits, make = tables[name]
    return Codebook.from_values(name, bits, make())

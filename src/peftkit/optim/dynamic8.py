"""Blockwise 8-bit *dynamic tree* quantization, as used for 8-bit optimizer states.

The dynamic map (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022) is a 256-entry codebook
whose entries are spread over seven decades: for decade ``i = 0..E-1`` (``E = max_exponent_bits = 7``) it holds the
midpoints of a uniform grid on ``[0.1, 1]`` scaled by ``10 ** (i - E + 1)``; decade ``i`` gets ``2 ** i`` midpoints
per sign (signed map, with their negatives) or ``2 ** (i + 1)`` (unsigned map). Together with an exact ``0`` and
``1.0`` that makes 256 values. Small magnitudes get fine resolution, which is what Adam's moments need.

Quantize one block of ``block_size`` values::

    absmax = max |x|                      (fp32, one per block; a trailing partial block gets its own)
    q      = argmin_j |code[j] - x / absmax|          (nearest code; an exact midpoint goes to the lower code)

Dequantize: ``x ~= code[q] * absmax``.

Note:
    The nearest-code search is ``bucketize(x / absmax, midpoints)``, but a binary search costs ~14 ns per element
    on CPU. :class:`DynamicCodebook` instead indexes a lookup table by the top 17 bits of the float's
    order-preserving integer image (sign, exponent, 8 mantissa bits); no such bucket of floats straddles more than
    one decision boundary of these maps (checked when the table is built), so one comparison with that boundary
    finishes the search. Results equal ``bucketize`` exactly, at ~1/10 of the cost.

Note:
    This is a small, self-contained copy of the dynamic map for the optimizers; ``peftkit.quant`` builds the signed
    map for double quantization. The two should be unified; both are tested against
    ``bitsandbytes.functional.create_dynamic_map``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftkit.quant.codebooks import dynamic_map as create_dynamic_map  # one dynamic map, shared with quant

BLOCK_SIZE = 256
_LUT_SHIFT = 15  # keep 32 - 15 = 17 high bits of the float: sign + 8 exponent + 8 mantissa bits


def _order_key(bits: Tensor) -> Tensor:
    """Map float32 bit patterns (as int32) to int32 keys with the same order as the floats (an involution)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


class DynamicCodebook:
    """A sorted codebook on one device with what nearest-code search needs.

    Attributes:
        code: The 256 sorted values (float32).
        midpoints: The 255 decision boundaries between neighbouring codes.
        signed: Which map this is.
    """

    def __init__(self, code: Tensor, signed: bool) -> None:
        self.code = code.float().contiguous()
        self.signed = signed
        self.midpoints = (self.code[1:] + self.code[:-1]) / 2
        device = self.code.device
        # Lookup table: for every bucket of floats sharing their top 17 bits, the code index of the bucket's
        # smallest float; valid if no bucket holds two decision boundaries.
        n_keys = 1 << (32 - _LUT_SHIFT)
        k = torch.arange(-(n_keys // 2), n_keys // 2, dtype=torch.int64, device=device)
        lo_key = (k << _LUT_SHIFT).to(torch.int32)
        hi_key = ((k << _LUT_SHIFT) + (1 << _LUT_SHIFT) - 1).to(torch.int32)
        lo = _order_key(lo_key).view(torch.float32)
        hi = _order_key(hi_key).view(torch.float32)
        lo_idx = torch.bucketize(lo, self.midpoints)
        hi_idx = torch.bucketize(hi, self.midpoints)
        finite = ~(torch.isnan(lo) | torch.isnan(hi))
        self._lut: Tensor | None = None
        if bool(((hi_idx - lo_idx)[finite] <= 1).all()):
            self._lut = lo_idx.to(torch.int32)
            # +inf sentinel: a candidate at the top code has no boundary above it.
            self._bounds = torch.cat([self.midpoints, self.midpoints.new_tensor([float("inf")])])

    @property
    def zero_index(self) -> int:
        """Index of the exact zero code."""
        return int((self.code == 0).nonzero()[0])

    @classmethod
    def build(cls, signed: bool, device: torch.device | str = "cpu") -> DynamicCodebook:
        """The bitsandbytes-compatible signed or unsigned dynamic map on ``device``."""
        return cls(create_dynamic_map(signed=signed).to(device), signed)

    def nearest(self, normed: Tensor, out: Tensor, work_a: Tensor, work_b: Tensor) -> Tensor:
        """Write into uint8 ``out`` the index of the nearest code of each value of flat float32 ``normed``.

        ``work_a`` and ``work_b`` are 4-byte work buffers (any dtype, reinterpreted) of at least
        ``normed.numel()`` elements, so a step allocates nothing large; ``normed`` is left unchanged.
        """
        n = normed.numel()
        if self._lut is None:
            out.copy_(torch.bucketize(normed, self.midpoints, out_int32=True))
            return out
        bits = normed.view(torch.int32)
        key = work_a[:n].view(torch.int32)
        torch.bitwise_right_shift(bits, 31, out=key)
        key.bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)
        key.bitwise_right_shift_(_LUT_SHIFT).add_(1 << (31 - _LUT_SHIFT))
        cand = work_b[:n].view(torch.int32)
        torch.index_select(self._lut, 0, key, out=cand)
        bound = work_a[:n].view(torch.float32)  # the key is no longer needed
        torch.index_select(self._bounds, 0, cand, out=bound)
        out.copy_(cand)
        above = work_b.view(torch.uint8)[:n].view(torch.bool)  # the candidate is in `out` now
        torch.lt(bound, normed, out=above)  # the value lies above the candidate's upper boundary
        out.add_(above.view(torch.uint8))
        return out


def _absmax_(flat: Tensor, block_size: int, out: Tensor, scratch: Tensor) -> Tensor:
    n = flat.numel()
    n_full = n // block_size
    mag = torch.abs(flat, out=scratch[:n])
    if n_full:
        torch.amax(mag[: n_full * block_size].view(n_full, block_size), dim=1, out=out[:n_full])
    if n_full * block_size < n:
        out[n_full] = mag[n_full * block_size :].max()
    return out


def _scale_blocks_(flat: Tensor, factor: Tensor, block_size: int, divide: bool) -> None:
    n = flat.numel()
    n_full = n // block_size
    op = Tensor.div_ if divide else Tensor.mul_
    if n_full:
        op(flat[: n_full * block_size].view(n_full, block_size), factor[:n_full, None])
    if n_full * block_size < n:
        op(flat[n_full * block_size :], factor[n_full])


def quantize_blockwise_dynamic_(
    x: Tensor,
    book: DynamicCodebook,
    out: Tensor,
    absmax_out: Tensor,
    scratch_f32: Tensor,
    scratch_i32: Tensor,
    block_size: int = BLOCK_SIZE,
) -> None:
    """Quantize flat float32 ``x`` into ``out`` (uint8) and ``absmax_out`` (fp32), destroying ``x``.

    The in-place, allocation-free form the optimizers use on their dequantized scratch moments.

    Args:
        x: Flat, contiguous float32 values; overwritten by ``x / absmax``.
        book: The codebook.
        out: uint8, ``x.numel()`` elements.
        absmax_out: fp32, ``ceil(numel / block_size)`` elements.
        scratch_f32: float32 work buffer, at least ``x.numel()`` elements.
        scratch_i32: int32 work buffer, at least ``x.numel()`` elements.
        block_size: Elements per absmax block.
    """
    _absmax_(x, block_size, absmax_out, scratch_f32)
    # An all-zero block has absmax 0: divide by the smallest normal instead, which maps it to the zero code.
    scale = absmax_out.clamp_min(torch.finfo(torch.float32).tiny)
    _scale_blocks_(x, scale, block_size, divide=True)
    book.nearest(x, out.view(-1), scratch_i32, scratch_f32)


def dequantize_blockwise_dynamic_(
    q: Tensor, absmax: Tensor, book: DynamicCodebook, out: Tensor, scratch_i32: Tensor, block_size: int = BLOCK_SIZE
) -> Tensor:
    """``out = code[q] * absmax`` per block, into flat float32 ``out`` (allocation-free form)."""
    n = q.numel()
    idx = scratch_i32[:n]
    idx.copy_(q.view(-1))
    torch.index_select(book.code, 0, idx, out=out)
    _scale_blocks_(out, absmax, block_size, divide=False)
    return out


def quantize_blockwise_dynamic(
    x: Tensor, code: Tensor | DynamicCodebook, block_size: int = BLOCK_SIZE
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` blockwise to indices into the dynamic map.

    Args:
        x: Float tensor, any shape; flattened row-major.
        code: A sorted codebook (see :func:`create_dynamic_map`) or a :class:`DynamicCodebook`.
        block_size: Elements per absmax block.

    Returns:
        ``(q, absmax)``: uint8 codes shaped like ``x`` and fp32 absmax, one per block.
    """
    book = code if isinstance(code, DynamicCodebook) else DynamicCodebook(code.to(x.device), bool(code.min() < 0))
    flat = x.detach().reshape(-1).float().clone()
    n = flat.numel()
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=x.device)
    quantize_blockwise_dynamic_(
        flat, book, q, absmax, torch.empty_like(flat), torch.empty(n, dtype=torch.int32, device=x.device), block_size
    )
    return q, absmax


def dequantize_blockwise_dynamic(
    q: Tensor, absmax: Tensor, code: Tensor | DynamicCodebook, block_size: int = BLOCK_SIZE
) -> Tensor:
    """Inverse of :func:`quantize_blockwise_dynamic`: float32 values shaped like ``q``."""
    book_code = code.code if isinstance(code, DynamicCodebook) else code.float()
    vals = book_code.to(q.device).index_select(0, q.reshape(-1).int())
    _scale_blocks_(vals, absmax, block_size, divide=False)
    return vals.view(q.shape)

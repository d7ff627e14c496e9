"""Two 4-bit codes per byte: the first element in the HIGH nibble, `byte[j] = (q[2j] << 4) | q[2j+1]`."""

from __future__ import annotations

import torch


def pack_4bit(codes: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Pack 4-bit codes (values 0..15, any shape, flattened row-major) into bytes.

    Args:
        codes: integer tensor of codes in [0, 15].
        pad: code appended to an odd count (`quantize` pads with the code of 0.0, as bitsandbytes does).

    Returns:
        uint8 tensor of `ceil(numel / 2)` bytes.
    """
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_4bit`: the first `numel` codes as a flat uint8 tensor."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if not 0 <= numel <= 2 * packed.numel():
        raise ValueError(f"cannot unpack {numel} codes from {packed.numel()} bytes")
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel]


def pair_table(values: torch.Tensor) -> torch.Tensor:
    """A 256-entry table: byte -> the two float32 values it encodes, viewed as one int64 per byte.

    Gathering one 8-byte entry per byte decodes two values at once, which is what makes dequantization cheap:
    `index_select(table, 0, bytes).view(float32)` is the unpacked, looked-up row-major sequence.
    """
    if values.numel() != 16:
        raise ValueError(f"a 4-bit codebook has 16 values, got {values.numel()}")
    byte = torch.arange(256)
    pairs = torch.stack([values[byte >> 4], values[byte & 0xF]], dim=1).float().contiguous()
    return pairs.view(torch.int64).reshape(256)

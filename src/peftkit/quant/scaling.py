"""Absmax scaling (per tensor, per row, per block) and clipping.

Symmetric absmax scaling maps `x` to `x / absmax` in [-1, 1], where a codebook takes over. The smaller the group
sharing one scale, the less an outlier hurts its neighbours, and the more scales there are to store.
"""

from __future__ import annotations

import torch

__all__ = ["check_float", "clip_threshold", "num_blocks"]


def check_float(x: torch.Tensor, what: str = "input") -> None:
    """Raise TypeError unless `x` is a floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")


def absmax_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """`max |x|` over the whole tensor, as a float32 scalar."""
    check_float(x)
    return x.detach().abs().amax().float()


def absmax_per_row(x: torch.Tensor) -> torch.Tensor:
    """`max |x|` over the last dimension: one float32 scale per row, shape `x.shape[:-1]`."""
    check_float(x)
    return x.detach().abs().amax(dim=-1).float()


def num_blocks(numel: int, block_size: int) -> int:
    """Blocks needed for `numel` elements; a trailing partial block counts as one."""
    return -(-numel // block_size)


def absmax_per_block(x: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """`max |x|` over consecutive blocks of the row-major flattened tensor.

    Args:
        x: float tensor, any shape.
        block_size: elements per block; a trailing partial block gets its own scale.

    Returns:
        float32 tensor of `ceil(numel / block_size)` scales.
    """
    check_float(x)
    flat = x.detach().reshape(-1).float().abs()
    full = flat.numel() // block_size * block_size
    scales = flat[:full].view(-1, block_size).amax(dim=1)
    if full < flat.numel():
        scales = torch.cat([scales, flat[full:].amax().view(1)])
    return scales


def clip(
    x: torch.Tensor, threshold: float | None = None, percentile: float | None = None
) -> tuple[torch.Tensor, float, int]:
    """Clamp `x` to [-T, T], with T given or taken as a percentile of |x|.

    Args:
        x: float tensor.
        threshold: T itself (> 0).
        percentile: T = this percentile (0 < p <= 100) of |x|; exactly one of the two must be given.

    Returns:
        `(clipped, T, count)`: the clamped tensor, the threshold used, and how many elements were clipped.

    Note:
        The percentile is taken on a strided sample of at most 2**24 elements (`torch.quantile`'s input limit);
        for large tensors this is an estimate of the exact percentile, and the count is exact for the T used.
    """
    check_float(x)
    t = clip_threshold(x, threshold, percentile)
    over = x.abs() > t
    return x.clamp(-t, t), t, int(over.sum())


def clip_threshold(x: torch.Tensor, threshold: float | None = None, percentile: float | None = None) -> float:
    """The threshold `clip` uses: `threshold`, or the `percentile` of |x| (see `clip`)."""
    if (threshold is None) == (percentile is None):
        raise ValueError("give exactly one of threshold and percentile")
    if threshold is not None:
        if not threshold > 0:
            raise ValueError(f"clip threshold must be > 0, got {threshold}")
        return float(threshold)
    assert percentile is not None  # exactly one of the two, checked above
    if not 0 < percentile <= 100:
        raise ValueError(f"clip percentile must be in (0, 100], got {percentile}")
    flat = x.detach().reshape(-1).float().abs()
    step = max(1, -(-flat.numel() // 2**24))
    return float(torch.quantile(flat[::step], percentile / 100))

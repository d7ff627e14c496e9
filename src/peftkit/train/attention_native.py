"""Causal attention of packed training rows on CPU by a compiled kernel (`kernels/attention.c`).

`PackedCausalAttention` pads the examples of a batch into groups and runs batched matmuls: simple and general,
but it computes every padded and masked (query, key) pair, gathers and scatters q, k, v around each group, and
the many small products run far below the matmul peak. The kernel visits each example's own pairs only (causal,
after its row's shared prefix), in place in the flattened (tokens x heads, d) rows, 4 queries x 16 keys at a time,
and recomputes the weights in backward from each query's log-sum-exp (as flash attention does; nothing n x m is
stored). Results equal the PyTorch path's within fp32 rounding (another summation order; tests check both).

Used for fp32 CPU tensors without a sliding window, with a head size that is a multiple of 8; everything else
(bf16, CUDA, windows, no compiler, ``PEFTKIT_NATIVE=0``) takes the PyTorch path. Threads: ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch

from peftkit.core import native as builder

__all__ = ["attention_kernel", "backward", "describe", "forward", "usable"]

SOURCE = Path(__file__).with_name("kernels") / "attention.c"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")


class _Kernel:
    """The library's two functions, typed."""

    def __init__(self, library: ctypes.CDLL):
        p, i, f, n = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        self.forward = library.peftkit_attention_forward
        self.forward.argtypes, self.forward.restype = [p, p, p, p, p, p, i, i, i, i, i, f, n], n
        self.backward = library.peftkit_attention_backward
        self.backward.argtypes = [p, p, p, p, p, p, p, p, p, p, i, i, i, i, i, i, f, n]
        self.backward.restype = n


@cache
def _kernel() -> tuple[_Kernel | None, str]:
    return builder.cached_kernel("attention", SOURCE, FLAGS, _Kernel, "packed attention CPU")


def attention_kernel() -> _Kernel | None:
    """The compiled functions, or None where they are unavailable (then packed attention uses PyTorch)."""
    return _kernel()[0]


def describe() -> str:
    """One line for `peftkit info`: what runs packed training attention on CPU here, and why."""
    kernel, why = _kernel()
    return ("compiled kernel" if kernel is not None else "PyTorch batched matmuls") + f" ({why})"


def usable(window: int | None, *tensors: torch.Tensor) -> bool:
    """Whether the kernel takes this attention: no window, fp32 CPU tensors, one head size (a multiple of 8) for
    all, built."""
    return (window is None and attention_kernel() is not None and len({t.shape[-1] for t in tensors}) == 1
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.shape[-1] % 8 == 0 for t in tensors))


def pieces_tensor(pieces: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
    """(row, start, end, prefix) per example as the (count, 4) int64 tensor the kernel reads."""
    return torch.tensor(list(pieces), dtype=torch.int64).view(-1, 4)


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: torch.Tensor, width: int, heads: int,
              kv_heads: int) -> int:
    """The C code trusts sizes: rows of (tokens x heads, d) and (tokens x kv_heads, d), examples inside their
    rows. Returns the token count."""
    d = q.shape[-1]
    tokens = q.shape[0] // heads if q.dim() == 2 and heads > 0 else 0
    problems = []
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        problems.append(f"heads {heads} must be a positive multiple of kv_heads {kv_heads}")
    for name, t, h in (("q", q, heads), ("k", k, kv_heads), ("v", v, kv_heads)):
        if not (t.dim() == 2 and t.is_contiguous() and t.dtype == torch.float32 and t.device.type == "cpu"
                and t.shape == (tokens * h, d) and d % 8 == 0):
            problems.append(f"{name} must be a contiguous fp32 CPU ({tokens * h}, {d}) tensor (d a multiple of 8), "
                            f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    if width <= 0 or tokens % width:
        problems.append(f"{tokens} tokens are not whole rows of width {width}")
    if not (pieces.dtype == torch.int64 and pieces.dim() == 2 and pieces.shape[1] == 4 and pieces.is_contiguous()):
        problems.append(f"pieces must be a contiguous (count, 4) int64 tensor, got {tuple(pieces.shape)}")
    elif len(pieces):
        row, start, end, prefix = pieces.unbind(1)
        bad = ((row < 0) | (row * width >= max(tokens, 1)) | (start < 0) | (end <= start) | (end > width)
               | (prefix < 0) | (prefix > start))
        if bool(bad.any()):
            problems.append(f"piece {pieces[bad.nonzero()[0, 0]].tolist()} is not (row, start, end, prefix) inside "
                            f"{tokens // width} rows of width {width}")
    if problems:
        raise ValueError("attention_native: " + "; ".join(problems))
    return tokens


def _threads() -> int:
    return torch.get_num_threads()


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("packed attention kernel: no memory for its work buffers")


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: torch.Tensor, width: int, heads: int,
            kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The output (tokens x heads, d; zero on padding) and each query's log-sum-exp (tokens x heads)."""
    _validate(q, k, v, pieces, width, heads, kv_heads)
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[0])
    _check(attention_kernel().forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                      pieces.data_ptr(), len(pieces), width, heads, kv_heads, q.shape[1], scale,
                                      _threads()))
    return out, lse


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad: torch.Tensor,
             lse: torch.Tensor, pieces: torch.Tensor, width: int, heads: int, kv_heads: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (the layouts of q, k, v; zero on padding) from `forward`'s output and log-sum-exp."""
    tokens = _validate(q, k, v, pieces, width, heads, kv_heads)
    for name, t in (("out", out), ("grad", grad)):
        if not (t.shape == q.shape and t.dtype == torch.float32 and t.is_contiguous()):
            raise ValueError(f"attention_native: {name} must be a contiguous fp32 {tuple(q.shape)} tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if not (lse.shape == (q.shape[0],) and lse.dtype == torch.float32 and lse.is_contiguous()):
        raise ValueError(f"attention_native: lse must be a contiguous fp32 ({q.shape[0]},) tensor")
    dq, dk, dv = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)
    _check(attention_kernel().backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), grad.data_ptr(),
                                       lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), pieces.data_ptr(),
                                       len(pieces), width, tokens, heads, kv_heads, q.shape[1], scale,
                                       _threads()))
    return dq, dk, dv

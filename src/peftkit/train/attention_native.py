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

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

from peftkit.core.native import Library, present
from peftkit.core.native import threads as _threads
from peftkit.core.operands import ANY, Operand, buffer, check, fits

__all__ = ["attention_kernel", "backward", "describe", "forward", "usable"]

SOURCE = Path(__file__).with_name("kernels") / "attention.c"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")

LIBRARY = Library("attention", SOURCE, FLAGS, {
    "forward": "peftkit_attention_forward: ptr ptr ptr ptr ptr ptr i64 i64 i64 i64 i64 f32 int -> int",
    "backward": "peftkit_attention_backward: ptr ptr ptr ptr ptr ptr ptr ptr ptr ptr i64 i64 i64 i64 i64 i64 f32 int"
                " -> int",
}, "packed attention CPU")


def attention_kernel() -> SimpleNamespace | None:
    """The compiled functions, or None where they are unavailable (then packed attention uses PyTorch)."""
    return LIBRARY.functions()


def describe() -> str:
    """One line for `peftkit info`: what runs packed training attention on CPU here, and why."""
    return LIBRARY.describe("compiled kernel", "PyTorch batched matmuls")


def usable(window: int | None, *tensors: torch.Tensor) -> bool:
    """Whether the kernel takes this attention: no window, fp32 CPU tensors, one head size (a multiple of 8) for
    all, built."""
    return (window is None and attention_kernel() is not None and len({t.shape[-1] for t in tensors}) == 1
            and tensors[0].shape[-1] % 8 == 0 and fits(*(Operand("t", t, layout=ANY) for t in tensors)))


def pieces_tensor(pieces: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
    """(row, start, end, prefix) per example as the (count, 4) int64 tensor the kernel reads."""
    return torch.tensor(list(pieces), dtype=torch.int64, device="cpu").view(-1, 4)


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: torch.Tensor, width: int, heads: int,
              kv_heads: int) -> int:
    """The C code trusts sizes: rows of (tokens x heads, d) and (tokens x kv_heads, d), d a multiple of 8, examples
    inside their rows. Returns the token count."""
    d = q.shape[-1] if q.dim() else 0
    tokens = q.shape[0] // heads if q.dim() == 2 and heads > 0 else 0
    problems = []
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        problems.append(f"heads {heads} must be a positive multiple of kv_heads {kv_heads}")
    if d % 8:
        problems.append(f"the head size {d} must be a multiple of 8")
    if width <= 0 or tokens % width:
        problems.append(f"{tokens} tokens are not whole rows of width {width}")
    try:
        check("attention_native", Operand("q", q, (tokens * heads, d)), Operand("k", k, (tokens * kv_heads, d)),
              Operand("v", v, (tokens * kv_heads, d)), Operand("pieces", pieces, (None, 4), torch.int64))
    except ValueError as err:
        problems.append(str(err).removeprefix("attention_native: "))
    if not problems and len(pieces):
        row, start, end, prefix = pieces.unbind(1)
        bad = ((row < 0) | (row * width >= max(tokens, 1)) | (start < 0) | (end <= start) | (end > width)
               | (prefix < 0) | (prefix > start))
        if bool(bad.any()):
            problems.append(f"piece {pieces[bad.nonzero()[0, 0]].tolist()} is not (row, start, end, prefix) inside "
                            f"{tokens // width} rows of width {width}")
    if problems:
        raise ValueError("attention_native: " + "; ".join(problems))
    return tokens


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: torch.Tensor, width: int, heads: int,
            kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The output (tokens x heads, d; zero on padding) and each query's log-sum-exp (tokens x heads), fp32."""
    _validate(q, k, v, pieces, width, heads, kv_heads)
    out, lse = buffer(*q.shape, zero=True), buffer(q.shape[0], zero=True)
    kernel = present(attention_kernel(), "attention_native.forward")
    LIBRARY.status(kernel.forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                  pieces.data_ptr(), len(pieces), width, heads, kv_heads, q.shape[1], scale,
                                  _threads()), "its work buffers")
    return out, lse


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad: torch.Tensor,
             lse: torch.Tensor, pieces: torch.Tensor, width: int, heads: int, kv_heads: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (the layouts of q, k, v, fp32; zero on padding) from `forward`'s output and log-sum-exp."""
    tokens = _validate(q, k, v, pieces, width, heads, kv_heads)
    check("attention_native.backward", Operand("out", out, q.shape), Operand("grad", grad, q.shape),
          Operand("lse", lse, (q.shape[0],)))
    dq, dk, dv = buffer(*q.shape, zero=True), buffer(*k.shape), buffer(*v.shape)
    kernel = present(attention_kernel(), "attention_native.backward")
    LIBRARY.status(kernel.backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), grad.data_ptr(),
                                   lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), pieces.data_ptr(),
                                   len(pieces), width, tokens, heads, kv_heads, q.shape[1], scale, _threads()),
                   "its work buffers")
    return dq, dk, dv

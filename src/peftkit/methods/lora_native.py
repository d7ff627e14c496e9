"""LoRA's skinny products on CPU by a compiled kernel (`kernels/lora.c`): the r-wide work around the base matmul.

Around the frozen base product, a LoRA layer computes ``h = s x A^T`` and adds ``h B^T`` in forward, and in
backward ``g B``, B's gradient ``h^T g``, A's gradient ``(g B)^T x`` and the input gradient's share ``(g B) A``.
With r = 8 these are memory-bound passes over T x d tensors, and BLAS runs them poorly: the products that reduce
over the T rows (the two weight gradients) mostly on one thread, each product reading its T x d operand again. The
kernel reads g once for its two products and x with the input gradient once for theirs, streams rows on every
thread, and sums the reductions per thread (``PEFTKIT_NATIVE=0 peftkit train ...`` against the default shows what
it saves on a machine; ``python bench/lora_kernel.py`` times the products alone). Results equal PyTorch's within
fp32 rounding (another summation order): tests check both paths against each other.

Used for fp32 CPU tensors whose rows are contiguous, up to rank `MAX_RANK` (the forward's ``out += h B^T``, a pass
over the d_out-wide output that BLAS does as fast at wider ranks, up to `UP_ADD_MAX_RANK`); everything else (bf16,
CUDA, wider ranks, no compiler, ``PEFTKIT_NATIVE=0``) takes the PyTorch path. Threads: ``torch.get_num_threads()``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from peftkit.core.native import Library, present
from peftkit.core.native import threads as _threads
from peftkit.core.operands import ROWS, Operand, buffer, check, fits
from peftkit.core.operands import size as _size

__all__ = ["MAX_RANK", "UP_ADD_MAX_RANK", "describe", "down", "grad_in", "grad_out", "lora_kernel", "up_add", "usable"]

SOURCE = Path(__file__).with_name("kernels") / "lora.c"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")  # FMA contraction on: sums need not match BLAS bit for bit
# Above this rank the products are wide enough for BLAS to run them faster (`bench/lora_kernel.py` times ranks)
MAX_RANK = 16
UP_ADD_MAX_RANK = 8  # forward's out += h B^T: the kernel only up to this rank

LIBRARY = Library("lora", SOURCE, FLAGS, {
    "down": "peftkit_lora_down: ptr i64 ptr ptr i64 i64 i64 f32 int -> void",
    "up_add": "peftkit_lora_up_add: ptr i64 ptr ptr i64 i64 i64 int -> void",
    "grad_out": "peftkit_lora_grad_out: ptr i64 ptr ptr ptr ptr i64 i64 i64 f32 int -> int",
    "grad_in": "peftkit_lora_grad_in: ptr i64 ptr i64 ptr ptr ptr i64 i64 i64 int -> int",
}, "LoRA CPU")


def lora_kernel() -> SimpleNamespace | None:
    """The compiled functions, or None where they are unavailable (then LoRA uses PyTorch's matmuls)."""
    return LIBRARY.functions()


def describe() -> str:
    """One line for `peftkit info`: what runs LoRA's skinny products on CPU here, and why."""
    return LIBRARY.describe("compiled kernel", "PyTorch matmuls")


def usable(rank: int, *tensors: torch.Tensor) -> bool:
    """Whether the kernel takes a rank-`rank` branch over these tensors: rank <= `MAX_RANK`, fp32 on CPU, 2-D with
    contiguous rows, none empty, and the kernel built."""
    return (0 < rank <= MAX_RANK and lora_kernel() is not None
            and fits(*(Operand("t", t, layout=ROWS, nonempty=True) for t in tensors)))


def down(x: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * x @ a^T``: x (T, d) with contiguous rows, a (r, d) contiguous; a new (T, r) fp32 tensor."""
    check("lora_native.down", Operand("x", x, (None, None), layout=ROWS), Operand("a", a, (_size(a, 0), _size(x, 1))))
    h = buffer(x.shape[0], a.shape[0])
    kernel = present(lora_kernel(), "lora_native.down")
    kernel.down(x.data_ptr(), x.stride(0), a.data_ptr(), h.data_ptr(), x.shape[0], x.shape[1], a.shape[0], scale,
                _threads())
    return h


def up_add(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
    """``out += h @ w`` in place: out (T, d) with contiguous rows, h (T, r), w (r, d) contiguous."""
    check("lora_native.up_add", Operand("out", out, (None, None), layout=ROWS),
          Operand("h", h, (_size(out, 0), _size(w, 0))), Operand("w", w, (_size(w, 0), _size(out, 1))))
    kernel = present(lora_kernel(), "lora_native.up_add")
    kernel.up_add(out.data_ptr(), out.stride(0), h.data_ptr(), w.data_ptr(), out.shape[0], out.shape[1], w.shape[0],
                  _threads())


def grad_out(g: torch.Tensor, bt: torch.Tensor, h: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale * g @ bt^T, h^T @ g)`` in one pass over g: g (T, d) with contiguous rows, bt = B^T (r, d) and h
    (T, r) contiguous; two new fp32 tensors."""
    check("lora_native.grad_out", Operand("g", g, (None, None), layout=ROWS),
          Operand("bt", bt, (_size(bt, 0), _size(g, 1))), Operand("h", h, (_size(g, 0), _size(bt, 0))))
    rows, d, r = g.shape[0], g.shape[1], bt.shape[0]
    gh, gbt = buffer(rows, r), buffer(r, d)
    kernel = present(lora_kernel(), "lora_native.grad_out")
    LIBRARY.status(kernel.grad_out(g.data_ptr(), g.stride(0), bt.data_ptr(), h.data_ptr(), gh.data_ptr(),
                                   gbt.data_ptr(), rows, d, r, scale, _threads()),
                   "the per-thread sums of B's gradient")
    return gh, gbt


def grad_in(gx: torch.Tensor | None, x: torch.Tensor, gh: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``gx += gh @ a`` in place (unless gx is None) and ``gh^T @ x``, in one pass over x and gx: x and gx (T, d)
    with contiguous rows, gh (T, r) and a (r, d) contiguous; a new fp32 tensor."""
    rows, d, r = _size(x, 0), _size(x, 1), _size(a, 0)
    check("lora_native.grad_in", Operand("x", x, (None, None), layout=ROWS),
          None if gx is None else Operand("gx", gx, (rows, d), layout=ROWS), Operand("gh", gh, (rows, r)),
          Operand("a", a, (r, d)))
    ga = buffer(a.shape[0], x.shape[1])
    kernel = present(lora_kernel(), "lora_native.grad_in")
    LIBRARY.status(kernel.grad_in(None if gx is None else gx.data_ptr(), 0 if gx is None else gx.stride(0),
                                  x.data_ptr(), x.stride(0), gh.data_ptr(), a.data_ptr(), ga.data_ptr(), x.shape[0],
                                  x.shape[1], a.shape[0], _threads()), "the per-thread sums of A's gradient")
    return ga

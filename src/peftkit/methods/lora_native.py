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

import ctypes
from functools import cache
from pathlib import Path

import torch

from peftkit.core import native as builder

__all__ = ["MAX_RANK", "UP_ADD_MAX_RANK", "describe", "down", "grad_in", "grad_out", "lora_kernel", "up_add", "usable"]

SOURCE = Path(__file__).with_name("kernels") / "lora.c"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")  # FMA contraction on: sums need not match BLAS bit for bit
# Above this rank the products are wide enough for BLAS to run them faster (`bench/lora_kernel.py` times ranks)
MAX_RANK = 16
UP_ADD_MAX_RANK = 8  # forward's out += h B^T: the kernel only up to this rank


class _Kernel:
    """The library's four functions, typed."""

    def __init__(self, library: ctypes.CDLL):
        p, i, f, n = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        self.down = library.peftkit_lora_down
        self.down.argtypes, self.down.restype = [p, i, p, p, i, i, i, f, n], None
        self.up_add = library.peftkit_lora_up_add
        self.up_add.argtypes, self.up_add.restype = [p, i, p, p, i, i, i, n], None
        self.grad_out = library.peftkit_lora_grad_out
        self.grad_out.argtypes, self.grad_out.restype = [p, i, p, p, p, p, i, i, i, f, n], ctypes.c_int
        self.grad_in = library.peftkit_lora_grad_in
        self.grad_in.argtypes, self.grad_in.restype = [p, i, p, i, p, p, p, i, i, i, n], ctypes.c_int


@cache
def _kernel() -> tuple[_Kernel | None, str]:
    return builder.cached_kernel("lora", SOURCE, FLAGS, _Kernel, "LoRA CPU")


def lora_kernel() -> _Kernel | None:
    """The compiled functions, or None where they are unavailable (then LoRA uses PyTorch's matmuls)."""
    return _kernel()[0]


def describe() -> str:
    """One line for `peftkit info`: what runs LoRA's skinny products on CPU here, and why."""
    kernel, why = _kernel()
    return ("compiled kernel" if kernel is not None else "PyTorch matmuls") + f" ({why})"


def _rows(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]


def usable(rank: int, *tensors: torch.Tensor) -> bool:
    """Whether the kernel takes a rank-`rank` branch over these tensors: rank <= `MAX_RANK`, fp32 on CPU, 2-D with
    contiguous rows, none empty, and the kernel built."""
    return (0 < rank <= MAX_RANK and lora_kernel() is not None
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and _rows(t) and t.numel() > 0
                    for t in tensors))


def _validate(name: str, rows: dict[str, tuple[torch.Tensor, int, int]],
           dense: dict[str, tuple[torch.Tensor, int, int]]) -> None:
    """The C code trusts sizes and layouts: `rows` tensors need contiguous rows, `dense` ones full contiguity, all
    fp32 on CPU with the (rows, columns) given."""
    for label, (t, n, m) in {**rows, **dense}.items():
        ok = (t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2 and tuple(t.shape) == (n, m)
              and (t.is_contiguous() if label in dense else _rows(t)))
        if not ok:
            layout = "contiguous" if label in dense else "with contiguous rows"
            raise ValueError(f"lora_native.{name}: {label} must be a ({n}, {m}) fp32 CPU tensor {layout}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device} with strides {t.stride()}")


def _threads() -> int:
    return torch.get_num_threads()


def down(x: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * x @ a^T``: x (T, d), a (r, d) contiguous; a new (T, r) tensor."""
    _validate("down", {"x": (x, x.shape[0], x.shape[1])}, {"a": (a, a.shape[0], x.shape[1])})
    h = torch.empty(x.shape[0], a.shape[0])
    lora_kernel().down(x.data_ptr(), x.stride(0), a.data_ptr(), h.data_ptr(), x.shape[0], x.shape[1], a.shape[0],
                       scale, _threads())
    return h


def up_add(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
    """``out += h @ w`` in place: out (T, d), h (T, r), w (r, d) contiguous."""
    rows, d, r = out.shape[0], out.shape[1], w.shape[0]
    _validate("up_add", {"out": (out, rows, d)}, {"h": (h, rows, r), "w": (w, r, d)})
    lora_kernel().up_add(out.data_ptr(), out.stride(0), h.data_ptr(), w.data_ptr(), out.shape[0], out.shape[1],
                         w.shape[0], _threads())


def _check(status: int, what: str) -> None:
    if status != 0:
        raise MemoryError(f"LoRA kernel: no memory for the per-thread sums of {what}")


def grad_out(g: torch.Tensor, bt: torch.Tensor, h: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale * g @ bt^T, h^T @ g)`` in one pass over g: g (T, d), bt = B^T (r, d) and h (T, r) contiguous."""
    rows, d, r = g.shape[0], g.shape[1], bt.shape[0]
    _validate("grad_out", {"g": (g, rows, d)}, {"bt": (bt, r, d), "h": (h, rows, r)})
    gh, gbt = torch.empty(rows, r), torch.empty(r, d)
    _check(lora_kernel().grad_out(g.data_ptr(), g.stride(0), bt.data_ptr(), h.data_ptr(), gh.data_ptr(),
                                  gbt.data_ptr(), rows, d, r, scale, _threads()), "B's gradient")
    return gh, gbt


def grad_in(gx: torch.Tensor | None, x: torch.Tensor, gh: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``gx += gh @ a`` in place (unless gx is None) and ``gh^T @ x``, in one pass over x and gx: x (T, d),
    gh (T, r) and a (r, d) contiguous."""
    rows, d, r = x.shape[0], x.shape[1], a.shape[0]
    _validate("grad_in", {"x": (x, rows, d), **({} if gx is None else {"gx": (gx, rows, d)})},
              {"gh": (gh, rows, r), "a": (a, r, d)})
    ga = torch.empty(r, d)
    _check(lora_kernel().grad_in(None if gx is None else gx.data_ptr(), 0 if gx is None else gx.stride(0),
                                 x.data_ptr(), x.stride(0), gh.data_ptr(), a.data_ptr(), ga.data_ptr(), rows, d, r,
                                 _threads()), "A's gradient")
    return ga

"""The decode step's compiled kernels (`kernels/decode.c`): a few rows times a weight matrix, and each row's
attention over its own KV cache, both batch-invariant by construction (one thread per output element, a summation
order fixed by the row's own sizes).

`step` runs a whole decode step of a Llama-shaped model (`peftkit.serve.fast` writes its plan). `linear` and
`attention` check their operands (`peftkit.core.operands`) and call the kernel; `linear_reference` and
`attention_reference` are the PyTorch computations they stand for (tests compare the two). Without a compiler,
off Linux, or with ``PEFTKIT_NATIVE=0``, `available()` is False and the server decodes through the model's own
forward pass (`peftkit.serve.rows`).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch

from peftkit.core.native import Library, present
from peftkit.core.native import threads as _threads
from peftkit.core.operands import ROWS, Operand, buffer, check
from peftkit.core.operands import size as _size

__all__ = ["LIBRARY", "attention", "attention_reference", "available", "describe", "linear", "linear_reference", "step"]

SOURCE = Path(__file__).with_name("kernels") / "decode.c"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
LIBRARY = Library("decode", SOURCE, FLAGS, {
    "linear_f32": "peftkit_decode_linear_f32: ptr i64 ptr ptr i64 i64 i64 i64 int -> int",
    "linear_bf16": "peftkit_decode_linear_bf16: ptr i64 ptr ptr i64 i64 i64 i64 int -> int",
    "attention": "peftkit_decode_attention: ptr ptr ptr ptr ptr ptr ptr i64 i64 i64 i64 i64 f32 int -> int",
    "isa": "peftkit_decode_isa: -> str",
    "step": "peftkit_decode_step: ptr ptr i64 ptr ptr ptr ptr ptr ptr ptr ptr f32 f32 int -> int",
}, "decode step")
DTYPES = (torch.float32, torch.bfloat16)


def kernel() -> SimpleNamespace | None:
    return LIBRARY.functions()


def available() -> bool:
    """Whether the kernels are built and loaded here."""
    return kernel() is not None


def describe() -> str:
    """One line for `peftkit info`: what runs the server's decode step here, and why."""
    return LIBRARY.describe("compiled kernels", "the model's forward pass")


def linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T`` for the rows of `x` (m x k, contiguous rows) and `weight` (n x k, contiguous), both fp32 or
    both bf16; sums in fp32. Writes `out` (m x n, contiguous rows, x's dtype) if given, else a new tensor."""
    if out is None:
        out = buffer(x.shape[0], weight.shape[0], dtype=x.dtype)
    check("serve.native.linear", Operand("x", x, (None, None), DTYPES, ROWS),
          Operand("weight", weight, (None, _size(x, 1)), x.dtype),
          Operand("out", out, (_size(x, 0), _size(weight, 0)), x.dtype, ROWS))
    fn = present(kernel(), "serve.native.linear")
    m, k = x.shape
    args = (x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), out.stride(0), m, k, weight.shape[0],
            _threads())
    run = fn.linear_f32 if x.dtype == torch.float32 else fn.linear_bf16
    LIBRARY.status(run(*args), "a linear layer's rows")
    return out


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What `linear` computes, in PyTorch: fp32 sums, rounded to x's dtype."""
    return (x.float() @ weight.float().T).to(x.dtype)


def attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, caches: torch.Tensor,
              capacities: torch.Tensor, positions: torch.Tensor, layer: int,
              scale: float | None = None) -> torch.Tensor:
    """One decode step's attention (fp32): row b writes its new key and value at ``positions[b]`` of its cache at
    address ``caches[b]`` ((layers, 2, kv_heads, capacities[b], dim) fp32, contiguous, owned by the caller) in
    `layer`, then attends over positions 0..positions[b]. q: rows x heads x dim; k_new, v_new: rows x kv_heads x dim.
    Returns rows x heads x dim.

    Note:
        `caches` holds raw addresses: the caller keeps the cache tensors alive and made them with these shapes
        (`peftkit.serve.fast.FastCache`); this function checks what it can see.
    """
    rows, heads, dim = q.shape
    kv_heads = k_new.shape[1] if k_new.dim() == 3 else 0
    check("serve.native.attention", Operand("q", q, (None, None, None)),
          Operand("k_new", k_new, (rows, None, dim)), Operand("v_new", v_new, (rows, kv_heads, dim)),
          Operand("caches", caches, (rows,), torch.int64), Operand("capacities", capacities, (rows,), torch.int64),
          Operand("positions", positions, (rows,), torch.int64))
    if kv_heads == 0 or heads % kv_heads or bool((positions >= capacities).any()) or bool((positions < 0).any()):
        raise ValueError(f"serve.native.attention: {heads} heads over {kv_heads} kv heads, positions "
                         f"{positions.tolist()} in caches of {capacities.tolist()}")
    out = buffer(rows, heads, dim)
    fn = present(kernel(), "serve.native.attention")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    LIBRARY.status(fn.attention(q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), out.data_ptr(), caches.data_ptr(),
                                capacities.data_ptr(), positions.data_ptr(), rows, heads, kv_heads, dim, layer, scale,
                                _threads()), "attention scores")
    return out


def attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """What `attention` computes for one row, in PyTorch: q (heads x dim) over keys and values
    (kv_heads x length x dim), fp32; returns heads x dim."""
    group = q.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    weights = torch.softmax((keys @ q[:, :, None])[:, :, 0] * scale, dim=-1)
    return (weights[:, None, :] @ values)[:, 0]


def step(plan: torch.Tensor, book: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
         rope: tuple[torch.Tensor, torch.Tensor], caches: tuple[torch.Tensor, torch.Tensor], lora: torch.Tensor,
         logits: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
    """One decode step of every row through the model `plan` describes (int64 words, `kernels/decode.c`, written by
    `peftkit.serve.fast`): ids, positions, lora (each row's adapter table address or 0): rows, int64; rope: (cos,
    sin), rows x head_dim fp32; caches: (addresses, capacities) as `attention` reads them; book: the 16 NF4 values.
    Writes and returns `logits` (rows x vocabulary, fp32).

    Note:
        `plan` and the adapter tables hold raw addresses of tensors the caller keeps alive; shapes inside them were
        checked when the plan was written. This checks the per-step operands.
    """
    rows = ids.shape[0] if ids.dim() == 1 else 0
    dim = int(plan[4]) if plan.dim() == 1 and plan.numel() > 4 else 0
    check("serve.native.step", Operand("plan", plan, (None,), torch.int64), Operand("book", book, (16,)),
          Operand("ids", ids, (None,), torch.int64), Operand("positions", positions, (rows,), torch.int64),
          Operand("cos", rope[0], (rows, dim)), Operand("sin", rope[1], (rows, dim)),
          Operand("caches", caches[0], (rows,), torch.int64), Operand("capacities", caches[1], (rows,), torch.int64),
          Operand("lora", lora, (rows,), torch.int64), Operand("logits", logits, (rows, int(plan[6]))))
    if bool((positions >= caches[1]).any()) or bool((positions < 0).any()):
        raise ValueError(f"serve.native.step: positions {positions.tolist()} in caches of {caches[1].tolist()}")
    fn = present(kernel(), "serve.native.step")
    code = fn.step(plan.data_ptr(), book.data_ptr(), rows, ids.data_ptr(), positions.data_ptr(), rope[0].data_ptr(),
                   rope[1].data_ptr(), caches[0].data_ptr(), caches[1].data_ptr(), lora.data_ptr(), logits.data_ptr(),
                   eps, scale, _threads())
    LIBRARY.status(code, "a decode step")
    return logits

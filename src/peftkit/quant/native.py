"""The compiled CPU kernel for 4-bit dequantization (`kernels/dequant4.c`), built on first use.

Why a kernel: in PyTorch eager, decoding is one gather per byte, then a multiply by the block scales, each a pass
over memory (a 4096x4096 NF4 weight: ~6 ms once its memory is mapped, bitsandbytes' C++ kernel ~2.4 ms: the
"memory kept mapped" column of `python bench/quant.py`).
The C file decodes and scales in one pass (a 16-entry table lookup: AVX-512 `vpermps`/`vpermw`, AVX2 `vpermps`
on two halves and `vpshufb`, or a scalar loop, whichever the CPU has; `describe` names it) and matches it. Its
results are bit-identical to the PyTorch path, which stays the reference and the fallback (tests run both, and
`build_kernel` builds each instruction-set path this CPU can run).

The file is plain C, built on first use by `peftkit.core.native` (cached per source, compiler and CPU), with
`-march=native` for this CPU and `-fopenmp`; its parallel loop follows `torch.set_num_threads`. Without a compiler,
off Linux, or with `PEFTKIT_NATIVE=0`, peftkit uses the PyTorch path.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftkit.core import native as builder

from .codebooks import codebook

if TYPE_CHECKING:
    from .blockwise import QuantState

SOURCE = Path(__file__).with_name("kernels") / "dequant4.c"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC")  # no FMA: bit-identical to PyTorch
COMPILE_TIMEOUT_S = 120

__all__ = ["dequant4_kernel", "dequantize_4bit_blocks", "describe"]

_cpu_flags = builder.cpu_flags


def _function(library: ctypes.CDLL) -> Any:
    """The library's kernel function, typed, with `.isa` naming the instruction set it was built for."""
    fn, isa = library.peftkit_dequant4, library.peftkit_dequant4_isa
    pointer = ctypes.c_void_p
    fn.argtypes = [pointer] * 4 + [ctypes.c_float] + [pointer] * 2 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = None
    isa.restype = ctypes.c_char_p
    fn.isa = isa().decode()  # "AVX-512", "AVX2" or "scalar"
    return fn


def build_kernel(folder: Path, extra: tuple[str, ...] = ()) -> Any:
    """The kernel built into `folder` with the `extra` compiler flags, as `dequant4_kernel` returns it.

    Tests build each instruction-set path this way: `-mno-avx512f` gives the AVX2 one on an AVX-512 CPU,
    `-DPEFTKIT_SCALAR` the scalar loop anywhere; `.isa` says which one was built.

    Raises:
        RuntimeError: the build failed.
    """
    return builder.build_kernel(folder, "dequant4", SOURCE, FLAGS, _function, extra, COMPILE_TIMEOUT_S)


def dequant4_kernel() -> Any | None:
    """The kernel's C function, or None where it is unavailable (then peftkit uses the PyTorch path)."""
    return _kernel()[0]


def describe() -> str:
    """One line for `peftkit info`: what dequantizes 4-bit weights on CPU here, and why."""
    kernel, why = _kernel()
    return (f"compiled kernel, {kernel.isa}" if kernel is not None else "PyTorch path") + f" ({why})"


@cache
def _kernel() -> tuple[Any | None, str]:
    """Build (once) and load the kernel: its C function or None, and why (the library's path, or the reason)."""
    return builder.cached_kernel("dequant4", SOURCE, FLAGS, _function, "4-bit dequantization", COMPILE_TIMEOUT_S)


def dequantize_4bit_blocks(packed: torch.Tensor, state: QuantState, out: torch.Tensor) -> bool:
    """Write `value[code] * scale` for the full blocks of `out` with the kernel; False if it cannot here.

    `packed` holds two codes per byte (high nibble first) of a 4-bit `state`; `out` (float32 or bfloat16) gets
    the first `out.numel() // block_size` blocks. The kernel also undoes double quantization of the scales.
    """
    state.validate(packed)  # the C code trusts sizes and dtypes: check them here
    if out.numel() > state.numel:
        raise ValueError(f"dequantize_4bit_blocks: out has {out.numel()} elements, the quantized tensor {state.numel}")
    return dequantize_validated(packed, state, out)


def dequantize_validated(packed: torch.Tensor, state: QuantState, out: torch.Tensor) -> bool:
    """`dequantize_4bit_blocks` for inputs already checked (`dequantize` validates the state against `packed`)."""
    kernel = dequant4_kernel()
    values = codebook(state.format).values
    tensors = [packed, state.absmax, values, out]
    dyn = scale2 = None
    if state.double_quant:
        dyn, scale2 = codebook("dynamic8").values, state.absmax_scale
        tensors += [dyn, scale2, state.absmax_offset]
    if (
        kernel is None
        or values.numel() != 16
        or out.dtype not in (torch.float32, torch.bfloat16)
        or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors)
    ):
        return False
    blocks = out.numel() // state.block_size
    offset = float(state.absmax_offset) if state.double_quant else 0.0
    ptr = [t.data_ptr() if t is not None else None for t in (packed, state.absmax, dyn, scale2)]
    is_bf16 = int(out.dtype == torch.bfloat16)
    kernel(*ptr, offset, values.data_ptr(), out.data_ptr(), is_bf16, state.block_size, blocks)
    return True

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

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from peftkit.core import native as builder
from peftkit.core.operands import Operand, check, fits

from .codebooks import codebook

if TYPE_CHECKING:
    from .blockwise import QuantState

SOURCE = Path(__file__).with_name("kernels") / "dequant4.c"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC")  # no FMA: bit-identical to PyTorch
COMPILE_TIMEOUT_S = 120

LIBRARY = builder.Library("dequant4", SOURCE, FLAGS, {
    "dequant4": "peftkit_dequant4: ptr ptr ptr ptr f32 ptr ptr int i64 i64 -> void",
    "isa_name": "peftkit_dequant4_isa: -> str",
}, "4-bit dequantization", COMPILE_TIMEOUT_S)

__all__ = ["LIBRARY", "build_kernel", "dequant4_kernel", "dequantize_4bit_blocks", "describe", "isa"]

OUT_DTYPES = (torch.float32, torch.bfloat16)  # what the kernel writes (bfloat16 as its 16-bit pattern)


def isa(kernel: SimpleNamespace) -> str:
    """The instruction set `kernel` was built for: "AVX-512", "AVX2" or "scalar"."""
    return kernel.isa_name().decode()


def build_kernel(folder: Path, extra: tuple[str, ...] = ()) -> SimpleNamespace:
    """The kernel built into `folder` with the `extra` compiler flags, as `dequant4_kernel` returns it.

    Tests build each instruction-set path this way: `-mno-avx512f` gives the AVX2 one on an AVX-512 CPU,
    `-DPEFTKIT_SCALAR` the scalar loop anywhere; `isa` says which one was built.

    Raises:
        RuntimeError: the build failed.
    """
    return LIBRARY.build(folder, extra)


def dequant4_kernel() -> SimpleNamespace | None:
    """The kernel's C functions, or None where it is unavailable (then peftkit uses the PyTorch path)."""
    return LIBRARY.functions()


def describe() -> str:
    """One line for `peftkit info`: what dequantizes 4-bit weights on CPU here, and why."""
    kernel = dequant4_kernel()
    return LIBRARY.describe(f"compiled kernel, {isa(kernel)}" if kernel is not None else "", "PyTorch path")


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
    """`dequantize_4bit_blocks` for inputs already checked (`dequantize` validates the state against `packed`):
    False where the kernel does not take them (none built, another device, layout or output dtype)."""
    kernel = dequant4_kernel()
    values = codebook(state.format).values
    dq = state.double_quant
    dyn = codebook("dynamic8").values if dq else None
    operands = [Operand("packed", packed, dtype=torch.uint8), Operand("out", out, dtype=OUT_DTYPES),
                Operand("absmax", state.absmax, dtype=torch.uint8 if dq else torch.float32)]
    if dq:
        operands += [Operand("absmax_scale", state.absmax_scale), Operand("absmax_offset", state.absmax_offset)]
    if kernel is None or values.numel() != 16 or not fits(*operands):
        return False
    # the tables the C code indexes: float32, 16 and 256 entries (an internal error if not: raise, never read past)
    check("dequant4", Operand("values", values, (16,)), None if dyn is None else Operand("dynamic8", dyn, (256,)))
    blocks = out.numel() // state.block_size
    offset = float(state.absmax_offset) if state.absmax_offset is not None else 0.0
    scale2 = state.absmax_scale if dq else None
    ptr = [None if t is None else t.data_ptr() for t in (packed, state.absmax, dyn, scale2)]
    is_bf16 = int(out.dtype == torch.bfloat16)
    kernel.dequant4(*ptr, offset, values.data_ptr(), out.data_ptr(), is_bf16, state.block_size, blocks)
    return True

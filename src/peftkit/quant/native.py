"""The compiled CPU kernel for 4-bit dequantization (`kernels/dequant4.c`), built on first use.

Why a kernel: in PyTorch eager, decoding is one gather per byte, then a multiply by the block scales, each a pass
over memory (a 4096x4096 NF4 weight: ~6 ms once its memory is mapped, bitsandbytes' C++ kernel ~2.4 ms: the
"memory kept mapped" column of `python bench/quant.py`).
The C file decodes and scales in one pass (a 16-entry table lookup: AVX-512 `vpermps`/`vpermw`, AVX2 `vpermps`
on two halves and `vpshufb`, or a scalar loop, whichever the CPU has; `describe` names it) and matches it. Its
results are bit-identical to the PyTorch path, which stays the reference and the fallback (tests run both, and
`build_kernel` builds each instruction-set path this CPU can run).

The file is plain C (no PyTorch headers): the system C compiler builds it in well under a second, once per
source, compiler and CPU, into `$PEFTKIT_CACHE/kernels` (or a folder in the temp dir if that is not writable;
written to a temporary name, then renamed: concurrent processes never load a half-written library; a cached file
that does not load is built again). It is built with `-march=native` for this CPU and `-fopenmp`, and
its parallel loop runs on the OpenMP runtime PyTorch has already loaded (same soname), so it follows
`torch.set_num_threads`. Without a compiler, off Linux, or with `PEFTKIT_NATIVE=0`, peftkit uses the PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .codebooks import codebook

if TYPE_CHECKING:
    from .blockwise import QuantState

SOURCE = Path(__file__).with_name("kernels") / "dequant4.c"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC")
OPENMP = "-fopenmp"
COMPILE_TIMEOUT_S = 120

__all__ = ["dequant4_kernel", "dequantize_4bit_blocks", "describe"]


def _cpu_flags() -> str:
    """The CPU's feature flags (part of the cache key: the library is built for this CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _compile(compiler: str, target: Path, extra: tuple[str, ...] = ()) -> None:
    """Build the shared library at `target` (`extra` flags after the usual ones), atomically: with OpenMP if the
    compiler has it, and without `-march=native` as the last resort (a compiler that refuses it gets the portable
    scalar loop)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    os.close(fd)
    portable = [f for f in FLAGS if f != "-march=native"]
    try:
        errors = ""
        for flags in ([*FLAGS, OPENMP], [*FLAGS], [*portable, OPENMP], portable):
            cmd = [compiler, *flags, *extra, str(SOURCE), "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if done.returncode == 0:
                os.replace(tmp, target)
                return
            errors = done.stderr.strip()
        raise RuntimeError(f"{compiler} failed: {errors[-500:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(compiler: str, target: Path, extra: tuple[str, ...] = ()) -> Any:
    """The kernel function from the library at `target`, built first if it is missing or does not load."""
    if target.exists():
        try:
            return _function(ctypes.CDLL(str(target)))
        except (OSError, AttributeError):
            pass  # a damaged or foreign file under our name: build it again
    _compile(compiler, target, extra)
    return _function(ctypes.CDLL(str(target)))


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
    name = hashlib.sha256("\0".join(extra).encode()).hexdigest()[:16]
    return _load(os.environ.get("CC", "cc"), folder / f"dequant4-{name}.so", extra)


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
    if os.environ.get("PEFTKIT_NATIVE", "1") == "0":
        return None, "PEFTKIT_NATIVE=0"
    if not sys.platform.startswith("linux"):
        return None, f"built on Linux only, this is {sys.platform}"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, f"no C compiler: {os.environ.get('CC', 'cc')!r} is not on PATH"
    from peftkit.models import cache_dir

    key = hashlib.sha256(b"\0".join(s.encode() for s in (SOURCE.read_text(), compiler, *FLAGS, _cpu_flags())))
    name = f"dequant4-{key.hexdigest()[:16]}.so"
    # the cache, or where it cannot be written (a read-only home), a folder of this user's in the temp dir
    folders = (cache_dir() / "kernels", Path(tempfile.gettempdir()) / f"peftkit-kernels-{os.getuid()}")
    error: Exception | None = None
    for folder in folders:
        try:
            fn = _load(compiler, folder / name)
        except OSError as err:
            error = err
            continue
        except (RuntimeError, AttributeError, subprocess.SubprocessError) as err:
            error = err
            break  # the build itself failed: another folder will not help
        return fn, str(folder / name)
    warnings.warn(f"peftkit: 4-bit dequantization kernel unavailable, using the PyTorch path ({error})", stacklevel=3)
    return None, f"the build failed: {error}"


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

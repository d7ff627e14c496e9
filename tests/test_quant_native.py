"""The compiled 4-bit dequantization kernel: bit-identical to the PyTorch path, and a clean fallback without it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch

from peftkit.core.native import cpu_flags
from peftkit.quant import blockwise, codebook, dequantize, native, quantize, unpack_4bit


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def rebuild():
    """The kernel looked up afresh in this test (environment, flags, source), and again in the next one.

    Call it to look up once more within the test."""
    native.LIBRARY.cache_clear()
    yield native.LIBRARY.cache_clear
    native.LIBRARY.cache_clear()


def needs_compiler() -> None:
    if not sys.platform.startswith("linux") or shutil.which("cc") is None:
        pytest.skip("needs a C compiler (the kernel is built on Linux only)")


# Each instruction-set path of the kernel: the flags that build it, and the CPU flags it needs to run.
ISAS = {
    "scalar": (("-DPEFTKIT_SCALAR",), ()),
    "AVX2": (("-mno-avx512f",), ("avx2",)),
    "AVX-512": ((), ("avx512f", "avx512bw")),
}


@pytest.fixture(scope="module", params=list(ISAS))
def isa_kernel(request, tmp_path_factory):
    """The kernel built for one instruction set (once per module), skipped where this CPU cannot run it."""
    needs_compiler()
    extra, needs = ISAS[request.param]
    cpu = cpu_flags().split()
    if any(flag not in cpu for flag in needs):
        pytest.skip(f"the {request.param} path needs the CPU flags {', '.join(needs)}")
    kernel = native.build_kernel(tmp_path_factory.mktemp("kernels"), extra)
    assert native.isa(kernel) == request.param, "the flags built the intended path"
    return kernel


def torch_path(data: torch.Tensor, state: blockwise.QuantState, dtype: torch.dtype, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(native, "dequant4_kernel", lambda: None)
        return dequantize(data, state, dtype)


def test_kernel_builds_on_linux_with_a_compiler():
    needs_compiler()
    assert native.dequant4_kernel() is not None


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("block_size", [32, 64, 128, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_kernel_equals_torch_path(fmt, block_size, dtype, double_quant, isa_kernel, monkeypatch):
    # 3 * 4096 + 70 elements: full blocks for the kernel and a trailing partial block for every block size.
    x = randn(3 * 4096 + 70, seed=block_size) * 3
    data, state = quantize(x, fmt, block_size=block_size, double_quant=double_quant)
    calls = []
    spy = SimpleNamespace(dequant4=lambda *a: calls.append(a) or isa_kernel.dequant4(*a))
    monkeypatch.setattr(native, "dequant4_kernel", lambda: spy)
    fast = dequantize(data, state, dtype)
    monkeypatch.undo()
    if codebook(fmt).values.numel() == 16:
        assert len(calls) == 1, "the kernel ran"
    assert fast.dtype == dtype
    assert torch.equal(fast, torch_path(data, state, dtype, monkeypatch))


@pytest.mark.parametrize("block_size", [2, 16, 48, 80, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_any_even_block_size(block_size, dtype, isa_kernel):
    """The C function takes any even block size (`quantize` makes powers of two from 32): the vector loops' tail
    within a block runs the scalar loop."""
    blocks, generator = 7, torch.Generator().manual_seed(block_size)
    packed = torch.randint(0, 256, (blocks * block_size // 2,), dtype=torch.uint8, generator=generator)
    absmax = randn(blocks, seed=block_size).abs() * 1e3
    values = codebook("nf4").values
    out = torch.empty(blocks * block_size, dtype=dtype)
    pointers = [packed.data_ptr(), absmax.data_ptr(), None, None]  # no double quantization
    is_bf16 = int(dtype == torch.bfloat16)
    isa_kernel.dequant4(*pointers, 0.0, values.data_ptr(), out.data_ptr(), is_bf16, block_size, blocks)
    codes = unpack_4bit(packed, blocks * block_size).long()
    expected = (values[codes].view(blocks, block_size) * absmax[:, None]).view(-1).to(dtype)
    assert torch.equal(out, expected)


def test_kernel_bfloat16_rounds_to_nearest_even_like_torch(isa_kernel, monkeypatch):
    # Scales with many low mantissa bits: float32 products land on bfloat16 ties and near-ties.
    x = randn(1 << 16, seed=3) * torch.linspace(1e-30, 1e30, 1 << 16).pow(0.5)
    data, state = quantize(x, "nf4", block_size=64)
    monkeypatch.setattr(native, "dequant4_kernel", lambda: isa_kernel)
    assert torch.equal(dequantize(data, state, torch.bfloat16), torch_path(data, state, torch.bfloat16, monkeypatch))
    assert torch.equal(dequantize(data, state, torch.bfloat16), dequantize(data, state, torch.float32).bfloat16())


def test_other_dtypes_and_non_contiguous_fall_back(monkeypatch):
    data, state = quantize(randn(64, 64), "nf4")
    out16 = dequantize(data, state, torch.float16)  # the kernel writes float32/bfloat16 only
    assert torch.equal(out16, torch_path(data, state, torch.float32, monkeypatch).half())
    strided = torch.empty(2 * data.numel(), dtype=torch.uint8)[::2]
    assert not native.dequantize_4bit_blocks(strided, state, torch.empty(64 * 64))
    assert not native.dequantize_4bit_blocks(data, state, torch.empty(64 * 64, dtype=torch.float16))


def test_short_inputs_are_refused():
    data, state = quantize(randn(128), "nf4")
    with pytest.raises(ValueError, match="quantized data"):
        native.dequantize_4bit_blocks(data[:10], state, torch.empty(128))
    with pytest.raises(ValueError, match="out has 192 elements"):
        native.dequantize_4bit_blocks(data, state, torch.empty(192))


def test_disabled_by_environment(monkeypatch, rebuild):
    monkeypatch.setenv("PEFTKIT_NATIVE", "0")
    assert native.dequant4_kernel() is None
    data, state = quantize(randn(256), "nf4")
    assert (dequantize(data, state) - randn(256)).abs().max() < 0.5


def test_a_failing_build_warns_leaves_no_file_and_falls_back(tmp_path, monkeypatch, rebuild):
    needs_compiler()
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native.LIBRARY, "source", broken)
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="kernel unavailable"):
        assert native.dequant4_kernel() is None
    assert not any((tmp_path / "cache" / "kernels").iterdir()), "no half-written library is left behind"
    data, state = quantize(randn(256), "nf4")
    assert dequantize(data, state).shape == (256,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_build_equals_torch_path(dtype, tmp_path, monkeypatch, rebuild):
    """The last-resort build, without -march=native (the compiler's baseline instruction set)."""
    needs_compiler()
    monkeypatch.setattr(native.LIBRARY, "flags", tuple(f for f in native.FLAGS if f != "-march=native"))
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    assert native.dequant4_kernel() is not None
    data, state = quantize(randn(4096 + 70, seed=5), "nf4", block_size=64, double_quant=True)
    assert torch.equal(dequantize(data, state, dtype), torch_path(data, state, dtype, monkeypatch))


def test_a_hanging_compiler_times_out_and_falls_back(tmp_path, monkeypatch, rebuild):
    if not sys.platform.startswith("linux"):
        pytest.skip("the kernel is built on Linux only")
    compiler = tmp_path / "slowcc"
    compiler.write_text("#!/bin/sh\nsleep 30\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native.LIBRARY, "timeout", 0.5)
    with pytest.warns(UserWarning, match="kernel unavailable"):
        assert native.dequant4_kernel() is None


def test_unwritable_cache_and_damaged_library(tmp_path, monkeypatch, rebuild):
    needs_compiler()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PEFTKIT_CACHE", str(blocker / "cache"))  # mkdir fails under a regular file
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert native.dequant4_kernel() is not None
    (built,) = tmp_path.glob("peftkit-kernels-*/dequant4-*.so")
    data, state = quantize(randn(4096), "nf4")
    assert torch.equal(dequantize(data, state), torch_path(data, state, torch.float32, monkeypatch))
    # Another process finds a file under that name that does not load: it builds it again. (A new file replaces
    # the name; this process keeps its mapping, which rewriting the loaded library in place would crash.)
    damaged = built.with_suffix(".damaged")
    damaged.write_bytes(b"damaged")
    os.replace(damaged, built)
    code = "from peftkit.quant import native; print(native.dequant4_kernel() is not None)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True", done.stderr
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_describe_says_what_runs_and_why(monkeypatch, rebuild):
    monkeypatch.setenv("PEFTKIT_NATIVE", "0")
    assert native.describe() == "PyTorch path (PEFTKIT_NATIVE=0)"
    rebuild()
    monkeypatch.setenv("PEFTKIT_NATIVE", "1")
    monkeypatch.setenv("CC", "no-such-compiler-here")
    if sys.platform.startswith("linux"):
        assert native.describe() == "PyTorch path (no C compiler: 'no-such-compiler-here' is not on PATH)"
    rebuild()
    monkeypatch.delenv("CC")
    if sys.platform.startswith("linux") and shutil.which("cc"):
        isa = native.isa(native.dequant4_kernel())
        assert isa in ISAS
        assert native.describe().startswith(f"compiled kernel, {isa} (") and native.describe().endswith(".so)")

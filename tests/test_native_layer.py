"""The one native-binding layer (`peftkit.core.native`, `peftkit.core.operands`, `peftkit.paths`): every kernel
right under another default dtype, operands checked by name, and compiled code only from a private folder whose
library matches the hash recorded when it was built."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest
import torch

from peftkit import paths
from peftkit.core import native as builder
from peftkit.core.operands import ROWS, Operand, check
from peftkit.methods import lora_native
from peftkit.quant import dequantize, quantize
from peftkit.quant import native as quant_native
from peftkit.train import attention_native
from peftkit.train import packed_attention as pa

BINDINGS = {"lora": lora_native, "attention": attention_native, "dequant4": quant_native}


def needs_compiler() -> None:
    if not sys.platform.startswith("linux") or shutil.which("cc") is None:
        pytest.skip("needs a C compiler (the kernels are built on Linux only)")


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """Every kernel looked up afresh, with the cache and temp dir under `tmp_path` (and again after the test)."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    for module in BINDINGS.values():
        module.LIBRARY.cache_clear()
    yield tmp_path
    for module in BINDINGS.values():
        module.LIBRARY.cache_clear()


@pytest.fixture
def bfloat16_default():
    """torch's default dtype bfloat16 for the test (the kernels write float32: their buffers must say so)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# --- every kernel under torch.set_default_dtype(torch.bfloat16) equals its PyTorch reference ---


def test_lora_products_under_bfloat16_default(bfloat16_default):
    if lora_native.lora_kernel() is None:
        pytest.skip(f"no LoRA kernel here: {lora_native.describe()}")
    x, a, b, g = randn(37, 70, seed=0), randn(8, 70, seed=1), randn(50, 8, seed=2), randn(37, 50, seed=3)
    h = lora_native.down(x, a, 0.5)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, 0.5 * x @ a.t(), atol=1e-5, rtol=1e-5)
    out = randn(37, 50, seed=4)
    want = out + h @ b.t()
    lora_native.up_add(out, h, b.t().contiguous())
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    gh, gbt = lora_native.grad_out(g, b.t().contiguous(), h, 0.5)
    assert gh.dtype == gbt.dtype == torch.float32
    torch.testing.assert_close(gh, 0.5 * g @ b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gbt, h.t() @ g, atol=1e-4, rtol=1e-5)
    gx = randn(37, 70, seed=5)
    want = gx + gh @ a
    ga = lora_native.grad_in(gx, x, gh, a)
    assert ga.dtype == torch.float32
    torch.testing.assert_close(ga, gh.t() @ x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gx, want, atol=1e-5, rtol=1e-5)


def _attention(segments, tensors):
    out = pa.PackedCausalAttention.apply(*tensors, segments, tensors[0].shape[-1] ** -0.5, None)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return (out.detach(), *torch.autograd.grad(out, tensors, grad))


def test_attention_under_bfloat16_default(bfloat16_default, monkeypatch):
    if attention_native.attention_kernel() is None:
        pytest.skip(f"no attention kernel here: {attention_native.describe()}")
    segments = (40, (((0, 5), (5, 17), (17, 40)), ((0, 33),)), (5, 0))
    tensors = [randn(2, h, 40, 16, seed=h).requires_grad_() for h in (4, 2, 2)]
    calls = []
    forward = attention_native.forward
    monkeypatch.setattr(attention_native, "forward", lambda *a: calls.append(1) or forward(*a))
    mine = _attention(segments, tensors)
    assert calls, "the kernel ran"
    monkeypatch.setattr(attention_native, "attention_kernel", lambda: None)
    for a, b in zip(mine, _attention(segments, tensors), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantization_under_bfloat16_default(bfloat16_default, monkeypatch, dtype):
    if quant_native.dequant4_kernel() is None:
        pytest.skip(f"no dequantization kernel here: {quant_native.describe()}")
    data, state = quantize(randn(4096 + 70, seed=5), "nf4", block_size=64, double_quant=True)
    fast = dequantize(data, state, dtype)
    monkeypatch.setattr(quant_native, "dequant4_kernel", lambda: None)
    assert torch.equal(fast, dequantize(data, state, dtype))


# --- one checker: a wrong operand is a ValueError naming it ---


@pytest.mark.parametrize("bad,why", [
    (randn(5, 16, seed=0).double(), "float64"),  # dtype
    (randn(5, 12, seed=0), r"\(5, 12\)"),  # shape
    (randn(16, 5, seed=0).t(), r"strides \(1, 5\)"),  # layout: columns not contiguous
    (torch.empty(5, 16, device="meta"), "on meta"),  # device
])
def test_checker_names_the_operand(bad, why):
    good = randn(4, 16, seed=1)
    with pytest.raises(ValueError, match=f"^where: x must be a \\(5, 16\\) float32 CPU tensor.*{why}"):
        check("where", Operand("good", good, (4, 16)), Operand("x", bad, (5, 16), layout=ROWS))
    check("where", Operand("good", good, (4, 16)), None)  # a fitting operand, an absent one: no error


def test_each_binding_refuses_a_wrong_operand_by_name():
    if lora_native.lora_kernel() is not None:
        with pytest.raises(ValueError, match="lora_native.down: x must be"):
            lora_native.down(randn(5, 16, seed=0).bfloat16(), randn(4, 16, seed=1), 1.0)
        with pytest.raises(ValueError, match="lora_native.grad_in: gh must be"):
            lora_native.grad_in(None, randn(5, 16, seed=0), randn(4, 5, seed=1).t(), randn(4, 16, seed=2))
    if attention_native.attention_kernel() is not None:
        q, k, v = (randn(20 * h, 8, seed=h) for h in (4, 2, 2))
        pieces = attention_native.pieces_tensor([(0, 0, 10, 0)])
        with pytest.raises(ValueError, match="attention_native: q must be"):
            attention_native.forward(q.bfloat16(), k, v, pieces, 10, 4, 2, 0.5)
        with pytest.raises(ValueError, match="pieces must be"):
            attention_native.forward(q, k, v, pieces.int(), 10, 4, 2, 0.5)
    data, state = quantize(randn(256, seed=0), "nf4")
    assert not quant_native.dequantize_4bit_blocks(data, state, torch.empty(256, dtype=torch.float16))


# --- compiled code only from a private folder, and only the library that was built ---


def _built(folder, stem):
    (record,) = folder.glob(f"{stem}-*.sha256")
    (library,) = folder.glob(f"{stem}-*.so")
    return record, library


EVIL = """
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("PEFTKIT_TEST_MARKER"), "w");
    if (f) { fputs("loaded", f); fclose(f); }
}
void peftkit_lora_down(void) {}
void peftkit_lora_up_add(void) {}
int peftkit_lora_grad_out(void) { return 0; }
int peftkit_lora_grad_in(void) { return 0; }
"""

CHECK = textwrap.dedent("""
    import torch
    from peftkit.methods import lora_native
    x, a = torch.randn(9, 24), torch.randn(4, 24)
    print(lora_native.describe())
    print(bool(torch.allclose(lora_native.down(x, a, 1.0), x @ a.t(), atol=1e-5)))
""")


def test_a_planted_library_is_rebuilt_never_loaded(fresh, monkeypatch):
    needs_compiler()
    assert lora_native.lora_kernel() is not None
    folder = fresh / "cache" / "kernels"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    record, library = _built(folder, "lora")
    evil = fresh / "evil.c"
    evil.write_text(EVIL)
    subprocess.run(["cc", "-shared", "-fPIC", str(evil), "-o", str(fresh / "evil.so")], check=True)
    os.replace(fresh / "evil.so", library)  # the expected name, the recorded hash: different bytes
    marker = fresh / "marker"
    env = {**os.environ, "PEFTKIT_TEST_MARKER": str(marker)}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, check=True)
    assert not marker.exists(), "the planted library was loaded"
    assert done.stdout.split("\n")[1] == "True", done.stdout + done.stderr
    rebuilt = builder._verified(folder, record.name.removesuffix(".sha256"))
    assert rebuilt is not None and done.stdout.startswith(f"compiled kernel ({rebuilt})"), "built again, verified"
    # the planted file with the marker would have run: the check is real
    evil_copy = fresh / "evil-copy.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(evil), "-o", str(evil_copy)], check=True)
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(evil_copy)!r})"], env=env, check=True)
    assert marker.read_text() == "loaded"


def test_a_library_without_its_record_is_not_loaded(fresh):
    needs_compiler()
    assert lora_native.lora_kernel() is not None
    record, library = _built(fresh / "cache" / "kernels", "lora")
    record.unlink()
    planted = library.with_suffix(".new")  # a new file under the name: this process keeps its mapping
    planted.write_bytes(b"\x7fELF not this library")
    os.replace(planted, library)
    lora_native.LIBRARY.cache_clear()
    assert lora_native.lora_kernel() is not None
    rebuilt = builder._verified(library.parent, record.name.removesuffix(".sha256"))
    assert rebuilt is not None and lora_native.LIBRARY.loaded()[1] == str(rebuilt), "built again, recorded"


def _other_owner(folder, monkeypatch):
    """`folder` owned by another user: chown as root, else this process pretends to be another uid."""
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)
    else:
        uid = os.getuid()
        monkeypatch.setattr(paths.os, "getuid", lambda: uid + 1)


@pytest.mark.parametrize("unsafe", ["mode 0777", "another owner", "a link"])
def test_an_unsafe_cache_folder_is_refused_for_a_private_one(fresh, monkeypatch, unsafe):
    needs_compiler()
    folder = fresh / "cache" / "kernels"
    if unsafe == "a link":
        (fresh / "elsewhere").mkdir(mode=0o700)
        folder.parent.mkdir()
        folder.symlink_to(fresh / "elsewhere")
    else:
        folder.mkdir(parents=True, mode=0o700)
    if unsafe == "mode 0777":
        folder.chmod(0o777)
    elif unsafe == "another owner":
        _other_owner(folder, monkeypatch)
    with pytest.warns(UserWarning, match="unsafe folder"):
        assert lora_native.lora_kernel() is not None
    assert not list(folder.iterdir()), "nothing built into the refused folder"
    fallback = fresh / "tmp" / f"peftkit-kernels-{paths.os.getuid()}"
    assert lora_native.LIBRARY.loaded()[1].startswith(str(fallback))
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700


def test_both_folders_unsafe_is_the_pytorch_path(fresh, monkeypatch):
    needs_compiler()
    for folder in paths.kernel_folders():
        folder.mkdir(parents=True, mode=0o700)
        folder.chmod(0o777)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lora_native.lora_kernel() is None
    messages = [str(w.message) for w in caught]
    assert sum("unsafe folder" in m for m in messages) == 2 and any("kernel unavailable" in m for m in messages)
    assert not lora_native.usable(8, randn(4, 16, seed=0))


def test_private_folder_checks(tmp_path, monkeypatch):
    made = paths.private_folder(tmp_path / "a" / "kernels")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    (tmp_path / "group").mkdir(mode=0o700)
    (tmp_path / "group").chmod(0o770)
    with pytest.raises(paths.UnsafeFolder, match="writable by others"):
        paths.private_folder(tmp_path / "group")
    (tmp_path / "mine").mkdir(mode=0o755)  # readable by others is fine: they cannot plant anything
    paths.private_folder(tmp_path / "mine")
    (tmp_path / "file").write_text("")
    with pytest.raises(paths.UnsafeFolder, match="not a folder"):
        paths.private_folder(tmp_path / "file")
    _other_owner(tmp_path / "mine", monkeypatch)
    with pytest.raises(paths.UnsafeFolder, match="owned by uid"):
        paths.private_folder(tmp_path / "mine")


def test_the_header_is_part_of_the_build_key(tmp_path, monkeypatch):
    source = tmp_path / "k.c"
    source.write_text("int f(void) { return 1; }\n")
    before = builder._build_key("cc", source, ("-O2",), ())
    header = tmp_path / "peftkit_native.h"
    header.write_text(builder.HEADER.read_text() + "/* changed */\n")
    monkeypatch.setattr(builder, "HEADER", header)
    assert builder._build_key("cc", source, ("-O2",), ()) != before

"""The compiled LoRA kernel (`peftkit.methods.lora_native`): each product against PyTorch, and the fused LoRA node
with and without it."""

from __future__ import annotations

import pytest
import torch

from peftkit.methods import lora_native
from peftkit.methods.lora import LoRAConfig, LoRALayer


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def kernel():
    if lora_native.lora_kernel() is None:
        pytest.skip(f"no LoRA kernel here: {lora_native.describe()}")
    return lora_native.lora_kernel()


def strided(rows: int, d: int, seed: int) -> torch.Tensor:
    """(rows, d) whose rows are d + 3 elements apart (a column slice), as the kernel allows."""
    return randn(rows, d + 3, seed=seed)[:, 1:d + 1]


# rows: 1 (a decode step), odd, more than the threads; widths around the 8- and 32-wide loops; ranks odd and even
SHAPES = [(1, 8, 1), (3, 5, 3), (37, 70, 8), (64, 33, 4), (129, 200, 7)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,d,r", SHAPES)
def test_each_product_equals_pytorch(kernel, rows, d, r, threads, monkeypatch):
    monkeypatch.setattr(lora_native, "_threads", lambda: threads)
    x, w, h = strided(rows, d, 0), randn(r, d, seed=1), randn(rows, r, seed=2)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(lora_native.down(x, w, 0.5), 0.5 * x @ w.t(), **tol)
    out = strided(rows, d, 3)
    want = out + h @ w
    lora_native.up_add(out, h, w)
    torch.testing.assert_close(out, want, **tol)
    gh, gbt = lora_native.grad_out(x, w, h, 2.0)
    torch.testing.assert_close(gh, 2.0 * x @ w.t(), **tol)
    torch.testing.assert_close(gbt, h.t() @ x, **tol)
    gx = strided(rows, d, 4)
    want = gx + h @ w
    torch.testing.assert_close(lora_native.grad_in(gx, x, h, w), h.t() @ x, **tol)
    torch.testing.assert_close(gx, want, **tol)
    torch.testing.assert_close(lora_native.grad_in(None, x, h, w), h.t() @ x, **tol)


def test_usable_only_where_the_kernel_applies(kernel):
    x = torch.randn(4, 16)
    assert lora_native.usable(8, x) and lora_native.usable(lora_native.MAX_RANK, x)
    assert not lora_native.usable(lora_native.MAX_RANK + 1, x)  # BLAS is faster there
    assert not lora_native.usable(8, x.bfloat16())
    assert not lora_native.usable(8, x.t())  # columns, not rows, contiguous
    assert not lora_native.usable(8, x[:0])
    assert not lora_native.usable(8, x.view(2, 2, 16))


def fused_layer(d_in=40, d_out=72, r=8, bias=True):
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(d_in, d_out, bias=bias).requires_grad_(False)
    layer = LoRALayer.from_module(base, LoRAConfig(r=r, lora_alpha=16))
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(d_out, r, generator=g) * 0.1)
    return layer


def run(layer, x, grad):
    out = layer(x)
    return (out, *torch.autograd.grad(out, (x, layer.lora_A.weight, layer.lora_B.weight), grad))


@pytest.mark.parametrize("r", [8, 16])
def test_fused_node_with_and_without_the_kernel(kernel, monkeypatch, r):
    """The same output and gradients both ways, and the kernel really ran (forward and backward; above
    UP_ADD_MAX_RANK the forward's out += h B^T is BLAS's)."""
    layer = fused_layer(r=r)
    x = randn(3, 11, 40, seed=5).requires_grad_(True)
    grad = randn(3, 11, 72, seed=6)
    calls = []
    for name in ("down", "up_add", "grad_out", "grad_in"):
        fn = getattr(lora_native, name)
        monkeypatch.setattr(lora_native, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    with_kernel = run(layer, x, grad)
    assert calls == ["down", *(["up_add"] if r <= lora_native.UP_ADD_MAX_RANK else []), "grad_out", "grad_in"]
    monkeypatch.setattr(lora_native, "lora_kernel", lambda: None)
    calls.clear()
    without = run(layer, x, grad)
    assert calls == []
    for a, b in zip(with_kernel, without, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_node_without_input_gradient(kernel):
    """The first adapted layer of a frozen model: no input gradient, A's and B's still right."""
    layer = fused_layer(bias=False)
    x = randn(2, 9, 40, seed=7)
    out = layer(x)
    grad = randn(*out.shape, seed=8)
    ga, gb = torch.autograd.grad(out, (layer.lora_A.weight, layer.lora_B.weight), grad)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    ref = x @ layer.weight.t() + 2.0 * (x @ a.t()) @ b.t()
    want = torch.autograd.grad(ref, (a, b), grad)
    torch.testing.assert_close(ga, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, want[1], atol=1e-5, rtol=1e-5)


def test_noncontiguous_output_gradient_falls_back(kernel):
    """An output gradient whose rows are not contiguous takes the PyTorch backward (same numbers)."""
    layer = fused_layer()
    x = randn(4, 40, seed=9).requires_grad_(True)
    grad = randn(72, 4, seed=10).t()  # (4, 72) with columns contiguous
    assert not lora_native.usable(8, grad)
    got = run(layer, x, grad)
    ref_x = x.detach().requires_grad_(True)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    ref = ref_x @ layer.weight.t() + layer.bias + 2.0 * (ref_x @ a.t()) @ b.t()
    want = (ref, *torch.autograd.grad(ref, (ref_x, a, b), grad))
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_describe_and_switch_off(monkeypatch):
    lora_native.LIBRARY.cache_clear()
    try:
        monkeypatch.setenv("PEFTKIT_NATIVE", "0")
        assert lora_native.describe() == "PyTorch matmuls (PEFTKIT_NATIVE=0)"
        assert not lora_native.usable(8, torch.randn(2, 8))
    finally:
        lora_native.LIBRARY.cache_clear()
    monkeypatch.delenv("PEFTKIT_NATIVE")
    if lora_native.lora_kernel() is not None:
        assert lora_native.describe().startswith("compiled kernel (") and lora_native.describe().endswith(".so)")



def test_a_build_without_openmp_runs_serially_and_equals_pytorch(tmp_path, monkeypatch):
    """A compiler without OpenMP gets the serial loops (the pragmas are ignored, one partial sum)."""
    import shutil
    import sys

    if not sys.platform.startswith("linux") or shutil.which("cc") is None:
        pytest.skip("needs a C compiler (the kernel is built on Linux only)")
    serial = lora_native.LIBRARY.build(tmp_path, extra=("-fno-openmp",))
    monkeypatch.setattr(lora_native, "lora_kernel", lambda: serial)
    monkeypatch.setattr(lora_native, "_threads", lambda: 2)
    x, w, h = strided(45, 37, 0), randn(5, 37, seed=1), randn(45, 5, seed=2)
    gh, gbt = lora_native.grad_out(x, w, h, 2.0)
    torch.testing.assert_close(gh, 2.0 * x @ w.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gbt, h.t() @ x, atol=1e-5, rtol=1e-5)
    gx = strided(45, 37, 4)
    want = gx + h @ w
    torch.testing.assert_close(lora_native.grad_in(gx, x, h, w), h.t() @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, want, atol=1e-5, rtol=1e-5)


def test_mismatched_or_strided_operands_are_refused(kernel):
    """The C code trusts sizes and layouts: a wrong one is a clear error before it runs, not a crash."""
    x, a = torch.randn(5, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"down: a must be a \(4, 16\)"):
        lora_native.down(x, torch.randn(4, 12), 1.0)
    with pytest.raises(ValueError, match="bt must be .* contiguous"):
        lora_native.grad_out(x, torch.randn(16, 4).t(), torch.randn(5, 4), 1.0)
    with pytest.raises(ValueError, match="gx must be"):
        lora_native.grad_in(torch.randn(5, 15), x, torch.randn(5, 4), a)
    with pytest.raises(ValueError, match="h must be a"):
        lora_native.up_add(torch.randn(5, 16), torch.randn(5, 4).double(), a)

"""Frozen-weight products (peftkit.core.matmul): oneDNN's path gives F.linear's values and gradients."""

from __future__ import annotations

import pytest
import torch

from peftkit.core.matmul import FrozenLinear, frozen_linear, frozen_product, onednn_linear_enabled


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24)])
def test_frozen_linear_matches_f_linear_and_its_input_gradient(bias, shape, monkeypatch):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    x = torch.randn(shape, generator=g, requires_grad=True)
    got = frozen_linear(x, weight, b)
    assert (got.grad_fn.name() == "FrozenLinearBackward") == onednn_linear_enabled(x, weight.dtype, b)
    want = torch.nn.functional.linear(x, weight, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn(want.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])
    monkeypatch.setenv("PEFTKIT_ONEDNN_LINEAR", "0")
    assert not onednn_linear_enabled(x, weight.dtype)
    assert frozen_linear(x, weight, b).grad_fn.name() != "FrozenLinearBackward"
    for onednn in (True, False):
        torch.testing.assert_close(frozen_product(x.detach().reshape(-1, 24), weight, b, onednn),
                                   want.detach().reshape(-1, 40), atol=1e-5, rtol=1e-5)


def test_onednn_path_taken_for_fp32_cpu_training_only():
    """Inference keeps F.linear: a LoRA layer at init, or a merged model, gives the base's logits bit for bit."""
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert onednn_linear_enabled(x, w.dtype) == (torch.backends.mkldnn.is_available()
                                           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    assert not onednn_linear_enabled(x.bfloat16(), torch.bfloat16)
    with torch.no_grad():
        assert not onednn_linear_enabled(x, w.dtype)
        assert torch.equal(frozen_linear(x, w), torch.nn.functional.linear(x, w))


def test_trainable_weight_takes_autograd_path():
    """A weight that trains gets its gradient (F.linear), never FrozenLinear's None."""
    w = torch.randn(4, 8, requires_grad=True)
    out = frozen_linear(torch.randn(3, 8), w)
    assert out.grad_fn is not None and "FrozenLinear" not in type(out.grad_fn).__name__
    out.sum().backward()
    assert w.grad is not None
    x = torch.randn(3, 8, requires_grad=True)
    assert "FrozenLinear" in type(FrozenLinear.apply(x, w.detach(), None).grad_fn).__name__

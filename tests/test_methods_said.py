"""Intrinsic SAID: the fast Walsh-Hadamard transform, the Fastfood projection against its dense matrix and its
column norms, the per-tensor formula, and reproducible projections across save/load."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama

from peftkit.core.adapter_io import apply_method, load_adapter, save_adapter
from peftkit.core.delta import merge_and_unload
from peftkit.methods.intrinsic_said import Fastfood, SAIDLayer, fwht


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 64, 512, 2048])  # 1 to 3 rounds of Kronecker factors, even and uneven
def test_fwht_equals_dense_and_backward(n):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    H = hadamard(n)
    torch.testing.assert_close(fwht(x), x @ H.T)
    if n <= 64:
        torch.autograd.gradcheck(fwht, (x,))
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(6))


def dense(ff: Fastfood) -> torch.Tensor:
    """P as a D x d matrix, column by column."""
    return ff(torch.eye(ff.d, dtype=torch.float64)).T


@pytest.mark.parametrize("d, D", [(5, 16), (7, 40), (20, 12), (1, 8), (16, 100), (33, 33)])
def test_fastfood_equals_its_formula(d, D):
    ff = Fastfood(d, D, torch.Generator().manual_seed(0))
    L = ff.L
    assert L >= max(d, D) and L & (L - 1) == 0 and L < 2 * max(d, D)
    # B (L signs) and Pi (a permutation of L) drawn as Fastfood draws them; it keeps only what reaches the
    # zero-padded input: the first d signs, and the permutation modulo m (see its docstring)
    generator = torch.Generator().manual_seed(0)
    signs = (torch.randint(0, 2, (L,), generator=generator) * 2 - 1).double()
    torch.randn(L, generator=generator)  # G
    permutation = torch.randperm(L, generator=generator)
    assert torch.equal(ff.B.double(), signs[:d])
    assert torch.equal(ff.Pi.long(), permutation % ff.m) and ff.m >= d
    B = torch.diag(signs)
    G = torch.diag(ff.G.double())
    Pi = torch.eye(L, dtype=torch.float64)[permutation]  # (Pi v)_i = v_{pi(i)}
    H = hadamard(L)
    pad = torch.eye(L, d, dtype=torch.float64)
    norm = math.sqrt(L * float((ff.G.double() ** 2).sum())) * math.sqrt(D / L)
    expected = (H @ G @ Pi @ H @ B @ pad)[:D] / norm
    torch.testing.assert_close(dense(ff), expected)


def test_fastfood_columns_have_unit_norm():
    # D = L: every column has norm exactly 1 (H^T H = L I); D < L: 1 in expectation
    ff = Fastfood(16, 64, torch.Generator().manual_seed(1))
    torch.testing.assert_close(dense(ff).norm(dim=0), torch.ones(16, dtype=torch.float64))
    sq = [dense(Fastfood(32, 300, torch.Generator().manual_seed(s))).square().sum(0).mean() for s in range(20)]
    assert abs(float(torch.stack(sq).mean()) - 1.0) < 0.05


def test_said_formula_identity_and_round_trip(tmp_path):
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    apply_method(model, "intrinsic_said", {"d": 30, "seed": 3})
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)  # theta_d = 0
    said = model.peftkit_said
    assert said.theta_d.shape == (30,) and said.said_lambda.shape == (14,)
    with torch.no_grad():
        said.theta_d.normal_()
        said.said_lambda.uniform_(0.5, 1.5)
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, SAIDLayer))
    expected = layer.weight + said.said_lambda[layer.said_index] * layer.fastfood(said.theta_d).view_as(layer.weight)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ expected.T)
    with torch.no_grad():
        changed = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "s")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "s")  # the projections come back from the seed
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, changed, atol=0, rtol=0)
        plain = merge_and_unload(fresh)
        torch.testing.assert_close(plain(input_ids=ids).logits, changed, atol=1e-5, rtol=1e-5)
    assert set(plain.state_dict()) - set(tiny_llama().state_dict()) == {"peftkit_said.theta_d",
                                                                         "peftkit_said.said_lambda"}


def test_did_without_lambda():
    model = tiny_llama()
    apply_method(model, "intrinsic_said", {"d": 10, "said": False, "target_modules": ["q_proj"]})
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"peftkit_said.theta_d"}


def test_update_is_computed_once_while_no_gradient_is_taken(monkeypatch):
    model = tiny_llama()
    apply_method(model, "intrinsic_said", {"d": 12, "seed": 1})
    ids = torch.randint(3, 128, (1, 6))
    calls = []
    real = Fastfood.forward
    monkeypatch.setattr(Fastfood, "forward", lambda self, x: calls.append(1) or real(self, x))
    n_layers = sum(isinstance(m, SAIDLayer) for m in model.modules())
    with torch.no_grad():
        model.peftkit_said.theta_d.normal_()
        first = model(input_ids=ids).logits
        second = model(input_ids=ids).logits  # decoding: the cached weights, no projection
    assert len(calls) == n_layers and torch.equal(first, second)
    with_grad = model(input_ids=ids).logits  # a forward with gradients recomputes (and drops the cache)
    assert len(calls) == 2 * n_layers and torch.equal(with_grad.detach(), first)
    with torch.no_grad():
        model.peftkit_said.theta_d.mul_(2)  # an in-place change invalidates the cached weights
        assert not torch.equal(model(input_ids=ids).logits, first)
    assert len(calls) == 3 * n_layers


@pytest.mark.parametrize("method, settings", [("intrinsic_said", {"d": 16}), ("sparse", {"density": 0.05})])
def test_falcon_linear_layers_are_adapted(method, settings):
    """Falcon's FalconLinear (an nn.Linear subclass computing F.linear) is adapted; the output starts unchanged."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          new_decoder_architecture=True, num_kv_heads=2, bias=False)
    model = FalconForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    report = apply_method(model, method, settings)
    assert len(report.adapted) == 2 * 4  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h per block
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)
    model(ids).logits.square().mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    # (SAID's lambdas get no gradient while theta_d = 0: lambda * P(0) = 0; theta_d does)
    assert trained and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)

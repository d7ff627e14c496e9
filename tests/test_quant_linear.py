"""QuantLinear, quantize_model, save_quantized / load_quantized."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.quant import QuantLinear, load_quantized, quantize_model, save_quantized


def make_linear(in_f: int = 96, out_f: int = 80, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int8"])
def test_forward_equals_linear_on_dequantized_weight(compute_dtype, fmt):
    lin = make_linear()
    q = QuantLinear.from_linear(lin, fmt, 64, double_quant=True, compute_dtype=compute_dtype)
    x = torch.randn(3, 5, 96)
    w = q.dequantize_weight()
    assert w.shape == (80, 96) and w.dtype == compute_dtype
    out = q(x)
    assert out.dtype == compute_dtype
    ref = F.linear(x.to(compute_dtype), w) + lin.bias.detach().to(compute_dtype)
    assert torch.equal(out, ref)
    assert (q.dequantize_weight(torch.float32) - lin.weight).abs().max() < 0.25 * lin.weight.abs().max()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_and_no_weight_gradient(compute_dtype):
    lin = make_linear()
    q = QuantLinear.from_linear(lin, compute_dtype=compute_dtype)
    x = torch.randn(4, 96, requires_grad=True)
    grad = torch.randn(4, 80).to(compute_dtype)
    q(x).backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    w = q.dequantize_weight().detach()
    (F.linear(x_ref.to(compute_dtype), w) + q.bias.to(compute_dtype)).backward(grad)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, x_ref.grad)
    assert not q.weight.requires_grad and q.weight.grad is None
    assert q.bias.grad is None and all(not p.requires_grad for p in q.parameters())


def test_backward_saves_only_the_packed_weight():
    q = QuantLinear.from_linear(make_linear(256, 128), compute_dtype=torch.float32)
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = q(x)
    dense = [t for t in saved if t.is_floating_point() and t.numel() >= 128 * 256]
    assert not dense, "a dense copy of the weight was kept for backward"
    assert any(t.dtype == torch.uint8 and t.numel() == 128 * 256 // 2 for t in saved)
    out.sum().backward()
    assert x.grad is not None


def test_no_mode_switch_between_train_eval_and_no_grad():
    q = QuantLinear.from_linear(make_linear())
    x = torch.randn(2, 96)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()
    with torch.no_grad():
        eval_out = q(x)
    q.train()
    xg = x.clone().requires_grad_()
    train_out = q(xg)
    train_out.sum().backward()
    assert torch.equal(eval_out, train_out.detach())
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_state_dict_keys_and_buffers():
    q = QuantLinear.from_linear(make_linear())
    assert set(q.state_dict()) == {"weight", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset", "bias"}
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == 80 * 96 // 2
    q2 = QuantLinear.from_linear(make_linear(bias=False), double_quant=False)
    assert set(q2.state_dict()) == {"weight", "weight_absmax"}
    assert (q.in_features, q.out_features, q.compute_dtype) == (96, 80, torch.bfloat16)


def test_empty_layer_loads_a_state_dict_strictly():
    q = QuantLinear.from_linear(make_linear(), "fp4", 128, double_quant=True)
    fresh = QuantLinear(96, 80, bias=True, format="fp4", block_size=128, double_quant=True)
    fresh.load_state_dict(q.state_dict(), strict=True)
    assert torch.equal(fresh.dequantize_weight(), q.dequantize_weight())


def test_to_moves_buffers_without_casting_or_requantizing():
    q = QuantLinear.from_linear(make_linear())
    packed, absmax = q.weight.clone(), q.weight_absmax_scale.clone()
    q.to(torch.bfloat16)  # model.to(dtype) must not cast the quantization state
    assert q.weight_absmax_scale.dtype == torch.float32 and torch.equal(q.weight_absmax_scale, absmax)
    assert torch.equal(q.weight, packed) and q.bias.dtype == torch.bfloat16
    q.half()
    assert q.weight_absmax_offset.dtype == torch.float32
    m = q.to("meta")
    assert m.weight.device.type == "meta" and m.weight.dtype == torch.uint8
    assert m.weight_absmax_scale.device.type == "meta" and m.weight_absmax_scale.dtype == torch.float32


def test_conv1d_is_transposed():
    torch.manual_seed(0)
    conv = Conv1D(48, 32)  # nf=48 outputs, nx=32 inputs, weight (32, 48)
    nn.init.normal_(conv.weight, std=0.02)
    nn.init.normal_(conv.bias, std=0.02)
    q = QuantLinear.from_linear(conv, compute_dtype=torch.float32)
    assert (q.in_features, q.out_features) == (32, 48)
    x = torch.randn(2, 7, 32)
    w = q.dequantize_weight(torch.float32)
    assert (w - conv.weight.t()).abs().max() < 0.25 * conv.weight.abs().max()
    assert torch.allclose(q(x), conv(x), atol=0.1)
    assert torch.equal(q(x), F.linear(x, q.dequantize_weight(), q.bias))


def test_to_linear():
    lin = make_linear()
    q = QuantLinear.from_linear(lin)
    dense = q.to_linear(torch.float32)
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == torch.float32
    assert torch.equal(dense.weight, q.dequantize_weight(torch.float32)) and torch.equal(dense.bias, lin.bias)
    assert q.to_linear().weight.dtype == torch.float32  # the original weight dtype


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Embedding(10, 4))


# --- quantize_model --------------------------------------------------------------------------------------


def test_quantize_model_replaces_linears_but_not_head_or_embeddings(tiny_model):
    linears = [n for n, m in tiny_model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    embeddings = [n for n, m in tiny_model.named_modules() if isinstance(m, nn.Embedding)]
    report = quantize_model(tiny_model)
    assert report.skipped == ["lm_head"]
    assert sorted(report.quantized) == sorted(n for n in linears if n != "lm_head")
    modules = dict(tiny_model.named_modules())
    assert isinstance(modules["lm_head"], nn.Linear)
    assert all(isinstance(modules[n], nn.Embedding) for n in embeddings)
    assert all(isinstance(modules[n], QuantLinear) for n in report.quantized)
    assert 4.0 < report.bits_per_param < 4.5 and report.bytes_after < report.bytes_before / 7
    assert "quantized" in str(report)


def test_quantized_model_runs_close_to_the_original(llama):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = llama(ids).logits
    quantize_model(llama)
    llama.to(torch.bfloat16)  # bf16 compute: the QLoRA setup
    logits = llama(ids).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_quantize_model_skip_by_suffix_and_regex(llama):
    report = quantize_model(llama, skip=("lm_head", "down_proj", r"model\.layers\.1\..*"))
    assert "lm_head" in report.skipped
    assert all("down_proj" not in n and not n.startswith("model.layers.1.") for n in report.quantized)
    assert "model.layers.0.mlp.down_proj" in report.skipped and "model.layers.1.self_attn.q_proj" in report.skipped
    assert "model.layers.0.self_attn.q_proj" in report.quantized


def test_quantize_model_with_nothing_to_quantize():
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.Embedding(10, 4)))


# --- save / load -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pass_model", [True, False])
def test_save_load_round_trip(tiny_model, tmp_path, pass_model):
    fresh = type(tiny_model)(tiny_model.config) if pass_model else None
    quantize_model(tiny_model, compute_dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_model(ids).logits
    save_quantized(tiny_model, tmp_path)
    loaded = load_quantized(tmp_path, fresh).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {
        k: v.dtype for k, v in tiny_model.state_dict().items()
    }


def test_load_errors_name_the_problem(llama, tmp_path):
    with pytest.raises(ValueError, match="quantization.json is missing"):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(llama, tmp_path)
    quantize_model(llama)
    save_quantized(llama, tmp_path)
    weights, layout = tmp_path / "model.safetensors", tmp_path / "quantization.json"

    good_layout = layout.read_text()
    layout.write_text("{not json")
    with pytest.raises(ValueError, match="quantization.json is corrupt"):
        load_quantized(tmp_path)
    meta = json.loads(good_layout)
    meta["layers"]["model.layers.0.self_attn.q_proj"]["block_size"] = 48
    layout.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="q_proj.*block_size"):
        load_quantized(tmp_path)
    meta = json.loads(good_layout)
    meta["layers"]["model.layers.9.mlp.up_proj"] = meta["layers"]["model.layers.0.mlp.up_proj"]
    layout.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="layers.9.mlp.up_proj.*does not exist"):
        load_quantized(tmp_path)
    layout.write_text(good_layout)

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    bad = dict(tensors)
    bad["model.layers.0.self_attn.q_proj.weight_absmax"] = bad["model.layers.0.self_attn.q_proj.weight_absmax"][:-1]
    save_file(bad, str(weights))
    with pytest.raises(ValueError, match="(?s)does not match the model.*weight_absmax"):
        load_quantized(tmp_path)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        load_quantized(tmp_path)

"""LoRA: formula, init, merge/unmerge, config errors, and peft-format adapter files both ways."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from peftkit.core.adapter_io import apply_method, load_adapter, read_adapter, save_adapter
from peftkit.errors import PeftkitError
from peftkit.methods.lora import Dropout, LoRAConfig, lora_layers, merge, merge_and_unload, unmerge

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def test_identity_at_init_and_formula(tiny_model):
    base = logits(tiny_model)
    report = apply_method(tiny_model, "lora", {"r": 4, "lora_alpha": 8})
    assert report.adapted
    assert torch.equal(logits(tiny_model), base)  # B = 0
    name, layer = next(lora_layers(tiny_model))
    randomize_lora(tiny_model)
    x = torch.randn(3, layer.lora_A.in_features)
    w = layer.weight.T if layer.weight.shape[0] == layer.lora_A.in_features and "c_" in name else layer.weight
    expected = x @ (w + 2.0 * layer.lora_B.weight @ layer.lora_A.weight).T
    if layer.bias is not None:
        expected = expected + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_rate_scale_and_gradient(p, dtype):
    torch.manual_seed(0)
    drop = Dropout(p)
    x = torch.ones(1001, 257, dtype=dtype, requires_grad=True)  # odd sizes: lanes do not divide evenly
    y = drop(x)
    dropped = y.eq(0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 1 / 65536
    kept = y[y.ne(0)]
    assert torch.allclose(kept.float(), torch.full_like(kept.float(), 1 / (1 - p)), rtol=1e-2)
    y.sum().backward()
    assert torch.equal(x.grad.eq(0), y.eq(0))  # the gradient flows through the kept elements only
    assert not torch.equal(drop(x), drop(x))  # a fresh mask per call
    drop.eval()
    assert drop(x) is x
    torch.manual_seed(1)
    a = Dropout(p)(x)
    torch.manual_seed(1)
    assert torch.equal(a, Dropout(p)(x))  # the global generator drives it (resume restores it)


def test_only_lora_params_train_and_count(llama):
    apply_method(llama, "lora", {"r": 2, "target_modules": ["q_proj", "v_proj"]})
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r * (d_in + d_out) per matrix: q 32->32, v 32->16 (GQA), 2 layers
    assert sum(p.numel() for p in llama.parameters() if p.requires_grad) == 2 * 2 * ((32 + 32) + (32 + 16))
    llama.train()
    llama(input_ids=IDS, labels=IDS).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in llama.parameters())


def test_all_linear_skips_head(tiny_model):
    report = apply_method(tiny_model, "lora", {"r": 2, "target_modules": "all-linear"})
    assert not any(n.endswith("lm_head") for n in report.adapted)
    assert len(report.adapted) == (14 if "llama" in type(tiny_model).__name__.lower() else 8)


def test_regex_targets(llama):
    report = apply_method(llama, "lora", {"r": 2, "target_modules": r".*layers\.1\.self_attn\.(q|k)_proj"})
    assert report.adapted == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]


def test_merge_unmerge_idempotent(tiny_model):
    apply_method(tiny_model, "lora", {"r": 4})
    randomize_lora(tiny_model)
    unmerged = logits(tiny_model)
    merge(tiny_model)
    merge(tiny_model)  # idempotent
    torch.testing.assert_close(logits(tiny_model), unmerged, atol=1e-5, rtol=1e-5)
    unmerge(tiny_model)
    unmerge(tiny_model)
    torch.testing.assert_close(logits(tiny_model), unmerged, atol=1e-5, rtol=1e-5)
    plain = merge_and_unload(tiny_model)
    assert not list(lora_layers(plain))
    assert not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(logits(plain), unmerged, atol=1e-5, rtol=1e-5)


def test_state_dict_keeps_base_keys(llama):
    keys = set(llama.state_dict())
    apply_method(llama, "lora", {"r": 2})
    assert keys <= set(llama.state_dict())  # base checkpoint keys unchanged, no base_layer churn


@pytest.mark.parametrize(
    "bad, match",
    [({"r": 0}, "r must be"), ({"lora_alpha": -1}, "lora_alpha"), ({"r": "8"}, "r: expected int"),
     ({"rank": 8}, "unknown key 'rank'"), ({"lora_dropout": 1.5}, "lora_dropout")],
)
def test_bad_configs(bad, match):
    with pytest.raises(PeftkitError, match=match):
        LoRAConfig.from_dict(bad)


def test_rank_larger_than_layer(llama):
    with pytest.raises(PeftkitError, match="larger than the layer"):
        apply_method(llama, "lora", {"r": 17, "target_modules": ["v_proj"]})


def test_unknown_target_lists_close_matches(llama):
    with pytest.raises(PeftkitError, match="q_proj"):
        apply_method(llama, "lora", {"target_modules": ["q_porj"]})


# --- adapter files: peftkit <-> Hugging Face peft -------------------------------------------------------------

peft = pytest.importorskip("peft")
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peftkit_adapter_loads_in_peft(arch, rslora, tmp_path):
    make = tiny_llama if arch == "llama" else tiny_gpt2
    model = make()
    apply_method(model, "lora", {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], "use_rslora": rslora})
    assert next(lora_layers(model))[1].scale == (8 / 2 if rslora else 8 / 4)
    randomize_lora(model)
    ours = logits(model)
    save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_adapter_loads_in_peftkit(arch, tmp_path):
    make = tiny_llama if arch == "llama" else tiny_gpt2
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], fan_in_fan_out=arch == "gpt2")
    theirs = peft.get_peft_model(make(), cfg)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    theirs.eval()
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "p")
    model = make()
    load_adapter(model, tmp_path / "p")
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


def test_corrupt_or_foreign_adapter_leaves_model_unchanged(tmp_path):
    model = tiny_llama()
    apply_method(model, "lora", {"r": 4})
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"

    fresh = tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}

    def unchanged():
        after = fresh.state_dict()
        return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(PeftkitError, match="corrupt or truncated"):
        load_adapter(fresh, tmp_path / "a")
    assert unchanged()

    gpt_model = tiny_gpt2()
    apply_method(gpt_model, "lora", {"r": 4, "target_modules": ["c_attn"]})
    save_adapter(gpt_model, tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is True
    with pytest.raises(PeftkitError, match="saved for a GPT2LMHeadModel"):
        load_adapter(fresh, tmp_path / "g")  # a GPT-2 adapter on a Llama
    assert unchanged()
    cfg.pop("auto_mapping")  # without the record, the module names still give it away
    (tmp_path / "g" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PeftkitError, match="c_attn"):
        load_adapter(fresh, tmp_path / "g")
    assert unchanged()
    assert all(p.requires_grad for p in fresh.parameters())

    (tmp_path / "g" / "adapter_config.json").write_text("{not json")
    with pytest.raises(PeftkitError, match="not valid JSON"):
        read_adapter(tmp_path / "g")


@pytest.mark.parametrize("autocast", [False, True])
def test_dropped_linear_gives_the_gradients_of_dropout_then_linear(autocast):
    from peftkit.methods.lora import _DroppedLinear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g, requires_grad=True)
    w = torch.randn(4, 12, generator=g, requires_grad=True)
    drop = torch.rand(3, 5, 12, generator=g) < 0.3
    grad = torch.randn(3, 5, 4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        mine = _DroppedLinear.apply(x, w, drop, 0.3)
        ref = torch.nn.functional.linear(x.masked_fill(drop, 0) / 0.7, w)
    tol = {"atol": 2e-2, "rtol": 2e-2} if autocast else {}
    torch.testing.assert_close(mine, ref, **tol)
    got = torch.autograd.grad(mine, (x, w), grad.to(mine.dtype))
    want = torch.autograd.grad(ref, (x, w), grad.to(ref.dtype))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("base_kind", ["linear", "linear-bias", "linear-bf16", "nf4", "nf4-bf16"])
def test_fused_lora_linear_matches_the_formula_and_its_gradients(base_kind):
    """The fused node (dense or 4-bit base) gives the output and gradients of x W0^T + b + s (x A^T) B^T."""
    from peftkit.methods.lora import LoRALayer, _FusedLoRALinear
    from peftkit.quant import QuantLinear

    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if base_kind.endswith("bf16") else torch.float32
    dense = torch.nn.Linear(24, 40, bias=base_kind == "linear-bias")
    base = QuantLinear.from_linear(dense, compute_dtype=dtype) if base_kind.startswith("nf4") else dense.to(dtype)
    base.requires_grad_(False)
    layer = LoRALayer.from_module(base, LoRAConfig(r=4, lora_alpha=8))
    with torch.no_grad():  # the trainer keeps LoRA weights in fp32 whatever the base dtype
        layer.lora_A.weight.copy_(torch.randn(4, 24, generator=g))
        layer.lora_B.weight.copy_(torch.randn(40, 4, generator=g) * 0.1)
    layer.lora_A.float(), layer.lora_B.float()
    x = torch.randn(2, 7, 24, generator=g).to(dtype).requires_grad_(True)
    calls = []
    original = _FusedLoRALinear.forward
    _FusedLoRALinear.forward = staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a))
    try:
        out = layer(x)
    finally:
        _FusedLoRALinear.forward = staticmethod(original)
    assert calls, "the fused path did not run"
    w0 = layer.dequantize_weight(dtype) if isinstance(base, QuantLinear) else base.weight
    a, b = layer.lora_A.weight, layer.lora_B.weight
    ref = torch.nn.functional.linear(x, w0, base.bias) + 2.0 * ((x.float() @ a.T) @ b.T).to(dtype)
    assert out.dtype == dtype and out.shape == (2, 7, 40)
    tol = {"atol": 3e-2, "rtol": 3e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out, ref, **tol)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    got = torch.autograd.grad(out, (x, a, b), grad)
    want = torch.autograd.grad(ref, (x, a, b), grad)
    for mine, theirs in zip(got, want, strict=True):
        assert mine.dtype == theirs.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(mine, theirs, **tol)
        else:  # bf16 sums (B's product as on the autograd path): compare as a whole, not element by element
            assert ((mine.float() - theirs.float()).norm() / theirs.float().norm()).item() < 1e-2


def test_fused_path_is_skipped_where_it_does_not_apply():
    """Active dropout, autocast and a trainable base weight take the autograd path (same numbers)."""
    from peftkit.methods.lora import LoRALayer

    base = torch.nn.Linear(16, 8).requires_grad_(False)
    layer = LoRALayer.from_module(base, LoRAConfig(r=2, lora_dropout=0.2))
    x = torch.randn(3, 16)
    assert layer._fused_base(x) is None  # training with dropout
    layer.eval()
    assert layer._fused_base(x) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fused_base(x) is None
    base.weight.requires_grad_(True)
    assert LoRALayer.from_module(base, LoRAConfig(r=2))._fused_base(x) is None

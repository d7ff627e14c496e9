"""LoRA's variants against Hugging Face peft on the same weights.

DoRA (``use_dora``): logits and gradients, adapter files both ways, an NF4 base, merge / unmerge, the cached column
norm following every change of A and B. LoRA+: the learning rate of every trained tensor as peft's
``create_loraplus_optimizer`` gives it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

import peftkit
from peftkit.core.adapter_io import apply_method, load_adapter, save_adapter
from peftkit.methods.dora import DoRAConfig, DoRALayer
from peftkit.methods.lora import LoRAConfig, LoRALayer
from peftkit.quant import QuantLinear

peft = pytest.importorskip("peft")



def no_dropout(model):
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.config.attn_pdrop = 0.0
    return model


MAKE = {"llama": lambda: no_dropout(tiny_llama()), "gpt2": lambda: no_dropout(tiny_gpt2())}
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def peftkit_dora(arch, tmp_path, **config):
    model = MAKE[arch]()
    apply_method(model, "dora", {"r": 4, "lora_alpha": 8, **config})
    perturb(model)
    save_adapter(model, tmp_path / "a")
    return model


def peft_model(arch, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(MAKE[arch](), str(folder), is_trainable=True)


def peft_name(name: str) -> str:
    """peft's parameter name -> peftkit's (``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``)."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    return name.removesuffix(".weight") if "lora_magnitude_vector" in name else name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_and_gradients_equal_peft(arch, tmp_path):
    ours = peftkit_dora(arch, tmp_path)
    theirs = peft_model(arch, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"] is True
    for model in (ours, theirs):
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {peft_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(grads) == set(theirs_grads) and any("magnitude" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_dora_adapters_load_in_peftkit(arch, tmp_path):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    theirs = get_peft_model(MAKE[arch](), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                     fan_in_fan_out=arch == "gpt2"))
    perturb(theirs, seed=3)
    theirs.save_pretrained(tmp_path / "p")
    ours = MAKE[arch]()
    load_adapter(ours, tmp_path / "p")
    assert ours.peftkit_method[0] == "dora"
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_a_plain_peft_lora_file_still_loads_as_lora(tmp_path):
    model = tiny_llama()
    apply_method(model, "lora", {"r": 2})
    save_adapter(model, tmp_path / "l")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "l")
    assert fresh.peftkit_method[0] == "lora"


@pytest.mark.parametrize("fused", [True, False])
def test_the_cached_norm_follows_every_optimizer_step(fused):
    """Training several steps with the cache gives the formula's output after every step (no stale norm), also with
    torch's fused AdamW, which updates parameters without bumping their version counters."""
    torch.manual_seed(0)
    base = nn.Linear(24, 16).requires_grad_(False)
    layer = DoRALayer.from_module(base, DoRAConfig(r=4, lora_alpha=8))
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.05, fused=fused)
    x = torch.randn(5, 24)
    for _ in range(3):
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        full = base.weight + layer.scale * layer.lora_B.weight @ layer.lora_A.weight
        want = x @ (layer.lora_magnitude_vector[:, None] * full / full.norm(dim=1, keepdim=True)).T + base.bias
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    assert layer.lora_B.weight.abs().sum() > 0


def test_the_norm_is_detached_as_in_the_paper():
    """m's gradient is (g . z) / n and A, B get no gradient through n (peft's section-4.3 choice)."""
    torch.manual_seed(0)
    layer = DoRALayer.from_module(nn.Linear(8, 6, bias=False).requires_grad_(False), DoRAConfig(r=2))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 8)
    layer(x).sum().backward()
    a, b, m = (t.detach().clone().requires_grad_(True) for t in (layer.lora_A.weight, layer.lora_B.weight,
                                                                    layer.lora_magnitude_vector))
    full = layer.weight + layer.scale * b @ a
    (x @ (m[:, None] * full / full.norm(dim=1, keepdim=True).detach()).T).sum().backward()
    for ours, want in ((layer.lora_A.weight, a), (layer.lora_B.weight, b), (layer.lora_magnitude_vector, m)):
        torch.testing.assert_close(ours.grad, want.grad, atol=1e-5, rtol=1e-5)


def test_nf4_base_equals_its_dequantized_weight_and_merges():
    """DoRA over a 4-bit QuantLinear == DoRA over an nn.Linear holding the dequantized weight (same A, B, m),
    forward and gradients; merge_and_unload gives that dense layer merged."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    quant = QuantLinear.from_linear(linear, "nf4", 64, False, torch.float32).requires_grad_(False)
    dense = quant.to_linear(torch.float32).requires_grad_(False)
    q_layer, d_layer = (DoRALayer.from_module(b, DoRAConfig(r=4)) for b in (quant, dense))
    torch.testing.assert_close(q_layer.lora_magnitude_vector, d_layer.lora_magnitude_vector)
    with torch.no_grad():
        d_layer.lora_A.weight.copy_(q_layer.lora_A.weight)
        for layer in (q_layer, d_layer):
            layer.lora_B.weight.copy_(torch.linspace(-1, 1, 128).view(32, 4))
            layer.lora_magnitude_vector.mul_(1.2)
    x = torch.randn(4, 64)
    outs = [layer(x) for layer in (q_layer, d_layer)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for out in outs:
        out.square().sum().backward()
    for name in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
        torch.testing.assert_close(q_layer.get_parameter(name).grad, d_layer.get_parameter(name).grad, atol=1e-4,
                                   rtol=1e-4)
    with pytest.raises(peftkit.PeftkitError, match="quantized"):
        q_layer.merge()
    merged = q_layer.to_base()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), outs[1], atol=1e-5, rtol=1e-5)


def test_merge_unmerge_restores_the_base_weight():
    model = tiny_gpt2()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    apply_method(model, "dora", {"r": 2})
    perturb(model)
    peftkit.merge(model)
    assert not torch.equal(model.state_dict()["transformer.h.0.attn.c_attn.weight"],
                           before["transformer.h.0.attn.c_attn.weight"])
    peftkit.unmerge(model)
    for name, value in before.items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments")
def test_loraplus_groups_equal_peft(method, tmp_path):
    """Each trained tensor gets the learning rate peft's create_loraplus_optimizer gives it (B and the magnitude at
    ratio x lr); the ratio stays in the adapter file for peftkit (peft ignores it, with a warning)."""
    from peft.optimizers import create_loraplus_optimizer

    from peftkit.core.registry import get_method
    from peftkit.optim import build_optimizer

    model = tiny_llama()
    config = get_method(method).config_cls(r=2, loraplus_lr_ratio=16.0)
    apply_method(model, method, config)
    ours = build_optimizer("adamw", config.optimizer_groups(model, lr=1e-3, weight_decay=0.01), lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: g["lr"] for g in ours.param_groups for p in g["params"]}
    save_adapter(model, tmp_path / "a")
    assert "loraplus_lr_ratio" in json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    theirs_model = peft_model("llama", tmp_path / "a")
    theirs = create_loraplus_optimizer(theirs_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    names = {id(p): peft_name(n) for n, p in theirs_model.named_parameters()}
    want = {names[id(p)]: g["lr"] for g in theirs.param_groups for p in g["params"]}
    assert got == want and sorted(set(got.values())) == [1e-3, 1.6e-2]
    assert get_method(method).config_cls(r=2).optimizer_groups(model, 1e-3) is None
    with pytest.raises(peftkit.PeftkitError, match="loraplus_lr_ratio must be > 0"):
        get_method(method).config_cls(loraplus_lr_ratio=0.0)


INITS = ["pissa", "pissa_niter_4", "olora"]


def peft_initialised(arch, how, targets):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(MAKE[arch](), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=how,
                                                   fan_in_fan_out=arch == "gpt2"))


@pytest.mark.parametrize("arch, how", [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")])
def test_pissa_and_olora_init_equal_peft(arch, how):
    """A, B and the residual base weight are peft's (exact SVD / QR: deterministic); the base layer given to apply
    keeps W0. (Not GPT-2 with OLoRA: peft 0.21.2 factors Conv1D's stored d_in x d_out weight without transposing it,
    giving A and B the wrong shapes; peftkit factors W0 as d_out x d_in, as for every other layer.)"""
    targets = ["q_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    theirs = dict(peft_initialised(arch, how, targets).named_parameters())
    model = MAKE[arch]()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = apply_method(model, "lora", {"r": 4, "lora_alpha": 8, "target_modules": targets,
                                          "init_lora_weights": how})
    for name, param in model.named_parameters():
        head, last = name.rsplit(".", 1)
        candidates = ["base_model.model." + name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B."
                                                                                                  "default."),
                      f"base_model.model.{head}.base_layer.{last}"]
        key = next(k for k in candidates if k in theirs)
        torch.testing.assert_close(param, theirs[key], atol=1e-5, rtol=1e-4, msg=name)
    for name, module in report.originals.items():
        torch.testing.assert_close(module.weight, original[name + ".weight"], atol=0, rtol=0)


@pytest.mark.parametrize("how", INITS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_residual_init_contract(arch, how, tmp_path):
    """Identity at init (to rounding), the estimator's count, merge == adapted, and the saved (converted, rank-2r)
    adapter gives the trained model's logits on the unchanged base in peft and in peftkit."""
    from peft import PeftModel

    from peftkit.memory import arch_from_config, trainable_tensors

    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": how}
    model = MAKE[arch]()
    with torch.no_grad():
        base = model(input_ids=IDS).logits
    apply_method(model, "lora", config)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, base, atol=1e-4, rtol=1e-4)
    geometry = arch_from_config(model.config.to_dict())
    assert sorted(k for _, k in trainable_tensors(geometry, "lora", config)) == sorted(
        p.numel() for p in model.parameters() if p.requires_grad)
    perturb(model)
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
    save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    theirs = PeftModel.from_pretrained(MAKE[arch](), str(tmp_path / "a")).eval()
    ours = MAKE[arch]()
    load_adapter(ours, tmp_path / "a")
    with torch.no_grad():
        for other in (theirs, ours):
            torch.testing.assert_close(other(input_ids=IDS).logits, trained, atol=1e-4, rtol=1e-4)
        peftkit.merge(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, trained, atol=1e-4, rtol=1e-4)
        peftkit.unmerge(model)
        plain = peftkit.merge_and_unload(model)
        torch.testing.assert_close(plain(input_ids=IDS).logits, trained, atol=1e-4, rtol=1e-4)


def test_randomized_svd_owns_its_generator_and_finds_the_top_subspace():
    from peftkit.methods.lora_init import randomized_svd

    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    w[:, :4] *= 20  # a clear top-4 subspace
    runs = [randomized_svd(w, 4, 4, torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=0, rtol=0)
    torch.testing.assert_close(runs[0][1], torch.linalg.svdvals(w)[:4], atol=1e-3, rtol=1e-3)


def test_residual_init_refusals():
    with pytest.raises(peftkit.PeftkitError, match="init_lora_weights='gaussian' is not supported"):
        apply_method(tiny_llama(), "lora", {"init_lora_weights": "gaussian"})
    with pytest.raises(peftkit.PeftkitError, match="not supported with DoRA"):
        apply_method(tiny_llama(), "dora", {"init_lora_weights": "pissa"})
    quant = QuantLinear.from_linear(nn.Linear(64, 32), "nf4", 64, False, torch.float32).requires_grad_(False)
    with pytest.raises(peftkit.PeftkitError, match="needs a full-precision base weight"):
        LoRALayer.from_module(quant, LoRAConfig(r=2, init_lora_weights="olora"))


def test_dora_under_bf16_autocast_follows_the_fp32_formula():
    torch.manual_seed(0)
    layer = DoRALayer.from_module(nn.Linear(32, 16).requires_grad_(False), DoRAConfig(r=4))
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
        layer.lora_magnitude_vector.mul_(1.5)
    x = torch.randn(6, 32)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    got.float().sum().backward()
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
    assert layer.lora_magnitude_vector.grad.abs().sum() > 0 and layer.lora_A.weight.grad.abs().sum() > 0


def test_the_trainer_uses_loraplus_groups_and_resumes_them(tmp_path):
    """loraplus_lr_ratio changes training (B at ratio x lr), and a resumed run keeps each group's learning rate."""
    from test_train import make_cfg, run

    kw = dict(max_steps=4, save_every=2, method="dora", lr=1e-3, warmup_ratio=0.5)
    plain, _ = run(make_cfg(tmp_path / "plain", method_config={"r": 4}, **kw))
    full, _ = run(make_cfg(tmp_path / "full", method_config={"r": 4, "loraplus_lr_ratio": 16.0}, **kw))
    cut = make_cfg(tmp_path / "cut", method_config={"r": 4, "loraplus_lr_ratio": 16.0}, **kw)
    run(cut, until=2)
    resumed, _ = run(cut, resume=True)
    losses = [[h["loss"] for h in t.history] for t in (plain, full, resumed)]
    assert losses[1] == losses[2] and losses[1][1:] != losses[0][1:]

"""(IA)³ against Hugging Face peft: adapter files both ways, logits and gradients on the same weights, merge."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

import peftkit
from peftkit.core.adapter_io import apply_method, load_adapter, save_adapter
from peftkit.methods.ia3 import IA3Layer

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
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peftkit_files_load_in_peft_with_equal_logits_and_gradients(arch, tmp_path):
    from peft import PeftModel

    ours = MAKE[arch]()
    apply_method(ours, "ia3")
    perturb(ours)
    save_adapter(ours, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["feedforward_modules"]
    theirs = PeftModel.from_pretrained(MAKE[arch](), str(tmp_path / "a"), is_trainable=True)
    for model in (ours, theirs):
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
    want = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
            for n, p in theirs.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and len(got) == 2 * (3 if arch == "llama" else 2)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], atol=1e-5, rtol=1e-4, msg=name)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_ia3_files_load_in_peftkit(arch, tmp_path):
    from peft import IA3Config, get_peft_model

    targets, ff = (["q_proj", "up_proj", "down_proj"], ["down_proj"]) if arch == "llama" else (["c_fc", "c_proj"],
                                                                                                   ["c_proj"])
    theirs = get_peft_model(MAKE[arch](), IA3Config(target_modules=targets, feedforward_modules=ff,
                                                    fan_in_fan_out=arch == "gpt2"))
    perturb(theirs, seed=4)
    theirs.save_pretrained(tmp_path / "p")
    ours = MAKE[arch]()
    load_adapter(ours, tmp_path / "p")
    assert ours.peftkit_method[0] == "ia3"
    assert sum(isinstance(m, IA3Layer) and m.is_feedforward for m in ours.modules()) == len(ff) * 2 * (
        1 if arch == "llama" else 2)  # GPT-2: c_proj is both attn.c_proj and mlp.c_proj
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)
        peftkit.merge(ours)
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_nf4_base_scales_and_merges_by_dequantizing():
    from peftkit.quant import QuantLinear

    torch.manual_seed(0)
    quant = QuantLinear.from_linear(nn.Linear(64, 32), "nf4", 64, False, torch.float32).requires_grad_(False)
    x = torch.randn(3, 64)
    for feedforward in (False, True):
        layer = IA3Layer.from_module(quant, feedforward)
        with torch.no_grad():
            layer.ia3_l.uniform_(0.5, 1.5)
            scale = layer.ia3_l.flatten()
            want = quant(x * scale) if feedforward else quant(x) * scale
            torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-6)
            with pytest.raises(peftkit.PeftkitError, match="quantized"):
                layer.merge()
            torch.testing.assert_close(layer.to_base()(x), want, atol=1e-5, rtol=1e-5)


def test_feedforward_must_be_a_subset_of_targets():
    with pytest.raises(peftkit.PeftkitError, match=r"feedforward_modules \['down_proj'\] are not in target_modules"):
        apply_method(tiny_llama(), "ia3", {"target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]})

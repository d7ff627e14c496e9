"""QLoRA = LoRA on a 4-bit base: gradients equal LoRA on the dequantized weight, training, merging."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from peftkit.core.adapter_io import apply_method, load_adapter, save_adapter
from peftkit.methods.lora import LoRALayer, lora_layers, merge_and_unload
from peftkit.quant import QuantLinear, quantize_model

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def dequantized_copy(quantized):
    """The same model with every QuantLinear replaced by an nn.Linear holding its dequantized weight."""
    dense = copy.deepcopy(quantized)
    for name, module in list(dense.named_modules()):
        if isinstance(module, QuantLinear):
            parent_name, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent_name), child, module.to_linear(torch.float32))
    return dense


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_qlora_gradients_equal_lora_on_dequantized_weights(make):
    model = make()
    quantize_model(model, "nf4", double_quant=True, compute_dtype=torch.float32)
    dense = dequantized_copy(model)
    for m in (model, dense):
        torch.manual_seed(0)
        apply_method(m, "lora", {"r": 4})
    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(dense), strict=True):
        assert isinstance(a, QuantLinear) and isinstance(a, LoRALayer)
        with torch.no_grad():
            b.lora_A.weight.copy_(a.lora_A.weight)
            a.lora_B.weight.normal_(0, 0.1)
            b.lora_B.weight.copy_(a.lora_B.weight)
    losses = [m(input_ids=IDS, labels=IDS).loss for m in (model, dense)]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for loss in losses:
        loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (model, dense)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)
    assert not any(b.requires_grad for b in model.buffers())  # the 4-bit base has no gradient


def test_qlora_adapter_round_trip_and_merge(tmp_path):
    model = tiny_llama()
    quantize_model(model, "nf4", compute_dtype=torch.float32)
    apply_method(model, "lora", {"r": 4})
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
        expected = model(input_ids=IDS).logits
    save_adapter(model, tmp_path / "a")
    other = tiny_llama()
    quantize_model(other, "nf4", compute_dtype=torch.float32)
    load_adapter(other, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=IDS).logits, expected)
        merged = merge_and_unload(other)  # dequantizes, then folds the update in
        assert not any(isinstance(m, QuantLinear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_qlora_trains_with_the_trainer(tmp_path):
    from test_train import make_cfg, run

    cfg = make_cfg(tmp_path, quantize="nf4", precision="bf16", max_steps=8, lr=1e-2, optimizer="paged_adamw_32bit",
                   gradient_checkpointing=True)
    trainer, result = run(cfg)
    assert sum(isinstance(m, QuantLinear) for m in trainer.model.modules()) == 14
    from peftkit.train import count_parameters

    assert count_parameters(trainer.model)["total"] == count_parameters(tiny_llama())["total"] + trainer.params[
        "trainable"]  # a 4-bit weight counts as the weight it stands for
    losses = [h["loss"] for h in trainer.history]
    assert min(losses[4:]) < losses[0]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)


def test_requantize_reports_measured_error():
    from peftkit.quant.requantize import requantize_with_report

    model = tiny_llama()
    apply_method(model, "lora", {"r": 4})
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    merged = merge_and_unload(model)

    def loss_fn(m):
        with torch.no_grad():
            return float(m(input_ids=IDS, labels=IDS).loss)

    report = requantize_with_report(merged, "nf4", compute_dtype=torch.float32, loss_fn=loss_fn)
    assert report.layers == 14 and 0.0 < report.mean_rel_error <= report.max_rel_error < 0.2
    assert report.loss_before != report.loss_after
    assert sum(isinstance(m, QuantLinear) for m in merged.modules()) == 14
    assert "relative weight error" in str(report)

"""The training loss (`peftkit.train.loss`) against the path it replaced, for every registered method.

The reference below is the loss as it was before it stopped touching the model: a forward pre-hook on the output
head gathered the hidden states that predict a target, and the head's forward was replaced for the call.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_qwen2, tiny_tokenizer
from torch import nn

from peftkit.core.adapter_io import apply_method
from peftkit.core.matmul import frozen_linear
from peftkit.core.registry import list_methods
from peftkit.data import collate, make_rows, read_conversations, tokenize_conversations
from peftkit.data.sequences import IGNORE
from peftkit.train.loss import SummedCrossEntropy, sequence_loss

SETTINGS = {"prompt_tuning": {"num_virtual_tokens": 3}, "prefix_tuning": {"num_virtual_tokens": 3},
            "sparse": {"density": 0.1}, "intrinsic_said": {"d": 64}, "bitfit": {"include_norms": True}}


def old_sequence_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The previous `sequence_loss` (hooks and a replaced head forward), kept as the reference."""
    core = getattr(model, "module", model)
    device = next(core.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "segment_ids", "prefix_lengths")}
    targets = batch["labels"][:, 1:].to(device)
    rows, cols = targets.ne(IGNORE).nonzero(as_tuple=True)
    tgt = targets[rows, cols]
    width = targets.shape[1] + 1

    def gather(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        offset = hidden.shape[1] - width
        return (hidden[rows, cols + offset].unsqueeze(0), *args[1:])

    head = core.get_output_embeddings()
    handle = head.register_forward_pre_hook(gather)
    fast_head = (type(head).forward is nn.Linear.forward and "forward" not in head.__dict__
                 and not head.weight.requires_grad)
    if fast_head:
        head.forward = functools.partial(lambda h, x: frozen_linear(x, h.weight, h.bias), head)
    try:
        logits = model(**inputs, use_cache=False).logits.flatten(0, 1)
    finally:
        handle.remove()
        if fast_head:
            del head.forward
    low = logits.dtype in (torch.bfloat16, torch.float16)
    return SummedCrossEntropy.apply(logits if low else logits.float(), tgt), tgt.numel()


def adapted(build, method: str) -> nn.Module:
    model = build()
    apply_method(model, method, SETTINGS.get(method, {}))
    with torch.no_grad():  # adapters away from their identity start, so that they matter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(packing: bool) -> dict[str, torch.Tensor]:
    rows = [{"instruction": "abc", "output": "xyz"}, {"instruction": "hello there", "output": "q"},
            {"instruction": "a longer prompt than the others", "output": "and its answer"}]
    examples = tokenize_conversations(tiny_tokenizer(), read_conversations(rows), 64)
    return collate(make_rows(examples, 64, packing), 0)


def loss_and_grads(loss_fn, model: nn.Module, b: dict[str, torch.Tensor]):
    model.zero_grad(set_to_none=True)
    loss, n = loss_fn(model, b)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), n, grads


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", list_methods())
def test_loss_and_gradients_equal_the_old_hooked_path(build, method):
    model = adapted(build, method)
    model.train()
    for packing in (False, True):
        b = batch(packing)
        torch.manual_seed(0)
        old_loss, old_n, old_grads = loss_and_grads(old_sequence_loss, model, b)
        torch.manual_seed(0)  # the same dropout draws
        new_loss, new_n, new_grads = loss_and_grads(sequence_loss, model, b)
        assert new_n == old_n == int(b["labels"][:, 1:].ne(IGNORE).sum())
        torch.testing.assert_close(new_loss, old_loss, atol=1e-6, rtol=1e-6)
        assert new_grads.keys() == old_grads.keys() and new_grads
        for name, g in new_grads.items():
            torch.testing.assert_close(g, old_grads[name], atol=1e-6, rtol=1e-6, msg=f"{method}: {name}")


def _ours(hooks: dict) -> dict:
    """The hooks that are not transformers' own: it installs dormant output recorders, once per model, the first
    time anyone asks for hidden states (`transformers.utils.output_capturing`); those are the library's."""
    return {k: f for k, f in hooks.items() if not getattr(f, "__module__", "").startswith("transformers.")}


def _surface(model: nn.Module) -> dict:
    """Everything a loss could patch: each module object, its forward, its hooks, the model's own forward."""
    return {name: (id(m), m.__dict__.get("forward"), type(m).forward, _ours(m._forward_pre_hooks),
                   _ours(m._forward_hooks), dict(m._backward_hooks)) for name, m in model.named_modules()}


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "full"])
def test_the_loss_leaves_the_model_as_it_was(method):
    model = adapted(tiny_llama, method)
    calls = []
    head = model.get_output_embeddings()
    seen = head.register_forward_hook(lambda m, a, out: calls.append(out.shape))  # the test's own hook
    before = _surface(model)
    assert before[""][3] or method != "prompt_tuning"  # the method's own hooks are seen (and must stay)
    loss, _ = sequence_loss(model, batch(True))
    loss.backward()
    assert _surface(model) == before
    seen.remove()
    assert calls[0][1] == 0  # in the model's forward its head projected no position (the loss does, on targets)


def test_the_loss_does_not_write_into_what_the_model_returns():
    """The model's own outputs keep their values through forward and backward (the loss owns its logits)."""
    model = adapted(tiny_llama, "full")
    kept = []
    model.register_forward_hook(lambda m, a, out: kept.append((out.logits, out.logits.detach().clone())))
    loss, _ = sequence_loss(model, batch(False))
    loss.backward()
    (logits, copy), = kept
    torch.testing.assert_close(logits.detach(), copy, atol=0, rtol=0)


def test_a_soft_capped_head_gives_the_models_own_loss():
    """Gemma's ``final_logit_softcapping`` (applied by the model's forward after its head) is applied here too."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    def tiny_gemma3() -> Gemma3ForCausalLM:
        torch.manual_seed(0)
        return Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, pad_token_id=0, final_logit_softcapping=0.5))

    model = adapted(tiny_gemma3, "lora")
    b = batch(False)
    old_loss, _, old_grads = loss_and_grads(old_sequence_loss, model, b)
    new_loss, _, new_grads = loss_and_grads(sequence_loss, model, b)
    torch.testing.assert_close(new_loss, old_loss, atol=1e-6, rtol=1e-6)
    for name, g in new_grads.items():
        torch.testing.assert_close(g, old_grads[name], atol=1e-6, rtol=1e-6)
    model.config.final_logit_softcapping = None  # the cap matters at this scale: without it, another loss
    assert abs(float(sequence_loss(model, b)[0].detach()) - float(old_loss)) > 1e-3

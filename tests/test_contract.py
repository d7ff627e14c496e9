"""The contract every registered method keeps, table-driven over `list_methods()` on a tiny Llama and a tiny GPT-2.

For each method: the trainable parameter count equals its formula; the adapted model equals the base model at
init where the method promises it; only the method's parameters get gradients; a save/load round trip gives the
same logits; merged == unmerged where the method can merge; a few AdamW steps on a fixed batch lower the loss;
``model.generate`` works. A newly registered method fails here until it has a row in `CASES`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from peftkit.core.adapter_io import apply_method, load_adapter, save_adapter
from peftkit.core.inject import AdapterModule, adapter_parameters
from peftkit.core.registry import get_method, list_methods

MAKE = {"llama": tiny_llama, "gpt2": tiny_gpt2}
IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@dataclasses.dataclass(frozen=True)
class Geo:
    """What the formulas need to know about a tiny model."""

    arch: str
    h: int = 32
    layers: int = 2
    vocab: int = 128

    @property
    def kv_dim(self) -> int:
        return 16 if self.arch == "llama" else 32  # Llama: 2 key/value heads of 8; GPT-2: 4 heads of 8

    def linears(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of the linear layers of one block."""
        h, kv = self.h, self.kv_dim
        if self.arch == "llama":
            return [(h, h), (h, kv), (h, kv), (h, h), (h, 64), (h, 64), (64, h)]
        return [(h, 3 * h), (h, h), (h, 4 * h), (4 * h, h)]

    def block_params(self) -> int:
        weights = sum(i * o for i, o in self.linears())
        if self.arch == "llama":
            return weights + 2 * self.h  # two RMSNorm weights
        return weights + sum(o for _, o in self.linears()) + 4 * self.h  # biases + two LayerNorms

    def final_norm(self) -> int:
        return self.h if self.arch == "llama" else 2 * self.h

    def norms(self) -> int:
        return self.layers * (2 if self.arch == "llama" else 4) * self.h + self.final_norm()

    def total(self) -> int:
        embed = self.vocab * self.h + (0 if self.arch == "llama" else 256 * self.h)  # GPT-2: positions too
        head = self.vocab * self.h if self.arch == "llama" else 0  # GPT-2 ties the head to the embedding
        return embed + head + self.layers * self.block_params() + self.final_norm()


def adapter(g: Geo, m: int, per_block: int) -> int:
    return g.layers * per_block * (2 * g.h * m + m + g.h)


@dataclasses.dataclass(frozen=True)
class Case:
    config: Callable[[str], dict]
    count: Callable[[Geo], int]
    identity: bool  # the adapted model starts equal to the base model
    lr: float = 1e-2


CASES: dict[str, Case] = {
    "lora": Case(lambda a: {"r": 2}, lambda g: g.layers * 2 * sum(i + o for i, o in g.linears()), True),
    "houlsby": Case(lambda a: {"reduction_factor": 8}, lambda g: adapter(g, 4, 2), True),
    "pfeiffer": Case(lambda a: {"reduction_factor": 8}, lambda g: adapter(g, 4, 1), True),
    "prompt_tuning": Case(lambda a: {"num_virtual_tokens": 4}, lambda g: 4 * g.h, False, lr=1e-1),
    "prefix_tuning": Case(
        lambda a: {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
        lambda g: 4 * g.h + (g.h * 16 + 16) + (16 + 1) * g.layers * 2 * g.kv_dim,
        False,
    ),
    "top_k_layers": Case(lambda a: {"k": 1}, lambda g: g.block_params() + g.final_norm(), True),
    # Llama has no biases: BitFit's documented fallback trains the norms
    "bitfit": Case(lambda a: {"include_norms": a == "llama"},
                   lambda g: g.norms() if g.arch == "llama" else g.layers * 11 * g.h + g.h, True),
    "norms": Case(lambda a: {}, lambda g: g.norms(), True),
    "sparse": Case(lambda a: {"density": 0.1},
                   lambda g: g.layers * sum(max(1, round(0.1 * i * o)) for i, o in g.linears()), True),
    "intrinsic_said": Case(lambda a: {"d": 20}, lambda g: 20 + g.layers * len(g.linears()), True, lr=5e-2),
    "full": Case(lambda a: {}, lambda g: g.total(), True, lr=1e-3),
}

PARAMS = [pytest.param(m, a, id=f"{m}-{a}") for m in list_methods() for a in MAKE]
IDENTITY = [p for p in PARAMS if p.values[0] in CASES and CASES[p.values[0]].identity]
MERGEABLE = [p for p in PARAMS if get_method(p.values[0]).can_merge]


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.attn_pdrop = 0.0
    return model


def adapted(method: str, arch: str):
    model = no_dropout(MAKE[arch]())
    apply_method(model, method, CASES[method].config(arch))
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_every_method_has_a_row():
    assert set(list_methods()) <= set(CASES), f"add {sorted(set(list_methods()) - set(CASES))} to CASES"


@pytest.mark.parametrize("method, arch", PARAMS)
def test_trainable_count_matches_formula(method, arch):
    model = adapted(method, arch)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == CASES[method].count(Geo(arch))


@pytest.mark.parametrize("method, arch", IDENTITY)
def test_identity_at_init(method, arch):
    base = logits(no_dropout(MAKE[arch]()))
    torch.testing.assert_close(logits(adapted(method, arch)), base, atol=0, rtol=0)


@pytest.mark.parametrize("method, arch", PARAMS)
def test_only_method_params_get_gradients(method, arch):
    model = adapted(method, arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if any(isinstance(m, AdapterModule) for m in model.modules()):  # adapter methods: exactly their own params
        assert trainable == {n for n, _ in adapter_parameters(model)}
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == trainable
    assert any(model.get_parameter(n).grad.abs().sum() > 0 for n in got)


@pytest.mark.parametrize("method, arch", PARAMS)
def test_save_load_round_trip(method, arch, tmp_path):
    model = adapted(method, arch)
    perturb(model)
    expected = logits(model)
    save_adapter(model, tmp_path / "a")
    fresh = no_dropout(MAKE[arch]())
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh), expected, atol=1e-6, rtol=0)
    assert fresh.peftkit_method[0] == method


@pytest.mark.parametrize("method, arch", MERGEABLE)
def test_merge_equals_unmerged(method, arch):
    """Mergeable methods expose ``merge(model)`` / ``unmerge(model)`` in the module that registers them."""
    module = importlib.import_module(get_method(method).apply.__module__)
    model = adapted(method, arch)
    perturb(model)
    unmerged = logits(model)
    module.merge(model)
    module.merge(model)  # idempotent
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    module.unmerge(model)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method, arch", PARAMS)
def test_a_few_steps_lower_the_loss(method, arch):
    torch.manual_seed(0)
    model = adapted(method, arch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=CASES[method].lr, weight_decay=0.0)
    with torch.no_grad():
        before = model(input_ids=IDS, labels=IDS).loss.item()
    model.train()
    for _ in range(8):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=IDS, labels=IDS).loss.item()
    assert after < before - 0.01, (before, after)


@pytest.mark.parametrize("method, arch", PARAMS)
def test_generate(method, arch):
    model = adapted(method, arch)
    perturb(model)
    with torch.no_grad():
        out = model.generate(IDS[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=4,
                             do_sample=False)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], IDS[:, :5])

"""The contract every registered method keeps, table-driven over `list_methods()` on a tiny Llama and a tiny GPT-2
(and a tiny Qwen2 for the estimator and the merge).

For each method: the trainable parameter count equals its formula, and the memory estimator's count (its registry
entry's, from the architecture alone) equals what applying it trains, tensor by tensor; the adapted model equals
the base model at init where the method promises it; only the method's parameters get gradients; a save/load round
trip gives the same logits; where the method can merge, merged == unmerged through `peftkit.merge` and
`peftkit.merge_and_unload`, and the model `peftkit merge` writes gives the adapted model's logits with exactly the
base model's tensors; where it cannot, both refuse with one line; a few AdamW steps on a fixed batch lower the loss;
``model.generate`` works; the estimator's activation bytes (its registry memory model) are within 15% of what one
training forward of the adapted tiny Llama keeps for backward. A newly registered method fails here until it has a
row in `CASES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_qwen2, tiny_tokenizer
from safetensors import safe_open

import peftkit
from peftkit.cli import main
from peftkit.core.adapter_io import apply_method, load_adapter, save_adapter
from peftkit.core.inject import AdapterModule, adapter_parameters
from peftkit.core.registry import get_method, list_methods
from peftkit.errors import PeftkitError
from peftkit.memory import TrainSetup, arch_from_config, estimate, trainable_tensors
from peftkit.models import load_model

MAKE = {"llama": tiny_llama, "gpt2": tiny_gpt2}
MAKE3 = {**MAKE, "qwen2": tiny_qwen2}
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
    "dora": Case(lambda a: {"r": 2}, lambda g: g.layers * sum(2 * (i + o) + o for i, o in g.linears()), True),
    "houlsby": Case(lambda a: {"reduction_factor": 8}, lambda g: adapter(g, 4, 2), True),
    "pfeiffer": Case(lambda a: {"reduction_factor": 8}, lambda g: adapter(g, 4, 1), True),
    # Llama: k and v scale their outputs (kv wide), down_proj its input (64); GPT-2: c_attn (3h), mlp.c_proj (4h)
    "ia3": Case(lambda a: {}, lambda g: g.layers * (2 * g.kv_dim + 64 if g.arch == "llama" else 7 * g.h), True,
                lr=5e-2),
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
PARAMS3 = [pytest.param(m, a, id=f"{m}-{a}") for m in list_methods() for a in MAKE3]
IDENTITY = [p for p in PARAMS if p.values[0] in CASES and CASES[p.values[0]].identity]
MERGEABLE = [p for p in PARAMS if get_method(p.values[0]).can_merge]
MERGEABLE3 = [p for p in PARAMS3 if get_method(p.values[0]).can_merge]
NOT_MERGEABLE = [m for m in list_methods() if not get_method(m).can_merge]


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.attn_pdrop = 0.0
    return model


def adapted(method: str, arch: str):
    model = no_dropout(MAKE3[arch]())
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


@pytest.mark.parametrize("settings", ["case", "defaults"])
@pytest.mark.parametrize("method, arch", PARAMS3)
def test_estimator_counts_what_apply_trains(method, arch, settings):
    """The registry's count from the architecture alone == the tensors applying the method makes trainable."""
    model = MAKE3[arch]()
    config = CASES[method].config(arch) if settings == "case" else {}
    geometry = arch_from_config(model.config.to_dict())
    try:
        apply_method(model, method, config)
    except PeftkitError as refused:  # then the estimator refuses too, for the same reason
        with pytest.raises(PeftkitError) as counted:
            trainable_tensors(geometry, method, config)
        assert str(counted.value).split(" ", 1)[1] == str(refused).split(" ", 1)[1]  # past the model's name
        return
    trained = sorted(p.numel() for p in model.parameters() if p.requires_grad)
    assert sorted(k for _, k in trainable_tensors(geometry, method, config)) == trained


def test_the_estimator_trains_what_training_trains_on_the_bundled_geometry():
    """LoRA's defaults are the config class's: all linear layers (2,442,240 on SmolLM2-135M), not q and v."""
    from peftkit.memory import count_trainable

    assert count_trainable("smollm2-135m-instruct", "lora") == 30 * 8 * (
        (576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 2 + (1536 + 576)) == 2_442_240


@pytest.mark.parametrize("method, arch", MERGEABLE3)
def test_python_merge_equals_adapted(method, arch):
    base_keys = set(MAKE3[arch]().state_dict())
    model = adapted(method, arch)
    perturb(model)
    expected = logits(model)
    peftkit.merge(model)
    peftkit.merge(model)  # idempotent
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    if get_method(method).merging.unmerge is not None:
        peftkit.unmerge(model)
        torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    else:  # the trained weights are the base weights: nothing separate to take out
        with pytest.raises(PeftkitError, match="trains the base weights themselves"):
            peftkit.unmerge(model)
    plain = peftkit.merge_and_unload(model)
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=1e-5)
    assert set(plain.state_dict()) == base_keys and not hasattr(plain, "peftkit_method")


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    for arch, make in MAKE3.items():
        make().save_pretrained(root / arch)
        tiny_tokenizer().save_pretrained(root / arch)
    return {arch: root / arch for arch in MAKE3}


def tensor_names(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("method, arch", MERGEABLE3)
def test_cli_merge_equals_adapted(method, arch, base_folders, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = load_model(base_folders[arch])
    apply_method(model, method, CASES[method].config(arch))
    perturb(model)
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--model", str(base_folders[arch])]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)
    assert tensor_names(tmp_path / "merged") == tensor_names(base_folders[arch])  # no adapter tensors left over


def test_info_all_methods_has_a_row_per_method(base_folders, capsys):
    """`peftkit info --all-methods`: every registered method's row, its count equal to applying it with defaults."""
    assert main(["info", "--model", str(base_folders["llama"]), "--all-methods"]) == 0
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert set(rows) == set(list_methods())
    for method in list_methods():
        model = MAKE["llama"]()
        try:
            apply_method(model, method, {})
        except PeftkitError:
            assert rows[method].startswith("error:")
            continue
        assert rows[method] == f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}", method


@pytest.mark.parametrize("method", NOT_MERGEABLE)
def test_methods_that_cannot_merge_say_so_in_one_line(method, base_folders, tmp_path, capsys):
    model, _ = load_model(base_folders["llama"])
    apply_method(model, method, CASES[method].config("llama"))
    save_adapter(model, tmp_path / "adapter")
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--model",
                 str(base_folders["llama"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"method {method!r} cannot be merged into the base weights" in err[0]
    assert not (tmp_path / "merged").exists()
    for fn in (peftkit.merge, peftkit.merge_and_unload):
        with pytest.raises(PeftkitError, match=f"method {method!r} cannot be merged"):
            fn(model)
    assert hasattr(model, "peftkit_method")  # refused before anything changed


def test_merging_a_model_without_an_adapter_is_refused():
    with pytest.raises(PeftkitError, match="no peftkit adapter"):
        peftkit.merge_and_unload(tiny_llama())


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


def saved_tensor_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward over one training forward of `model` (no loss): the unique storages of the
    saved tensors, the model's parameters and buffers excluded (the estimator counts those as weights)."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(seen.values())


@pytest.mark.parametrize("method", list_methods())
def test_estimated_activations_match_saved_tensors(method):
    """The estimator's activations (fp32, SDPA) + the weights the method rebuilds every step (autograd keeps them
    too; the estimator counts them as temporary weights) within 15% of the saved tensors of one forward."""
    b, s = 4, 32
    ids = torch.randint(3, 128, (b, s), generator=torch.Generator().manual_seed(0))
    measured = saved_tensor_bytes(adapted(method, "llama"), ids)
    config = CASES[method].config("llama")
    arch = arch_from_config(tiny_llama().config.to_dict())
    setup = TrainSetup(method=method, method_args=config, precision="fp32", batch_size=b, seq_len=s)
    rebuilt = 4 * get_method(method).memory.rebuilt_weights(arch, setup.config)
    assert estimate(arch, setup).activations + rebuilt == pytest.approx(measured, rel=0.15)

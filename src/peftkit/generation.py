"""Batched generation: greedy (or beam) decoding with the KV cache, stopping at the end of the turn.

Below train and eval: training's evaluator, the eval tools, the demo, the server and ``peftkit generate`` use it.

Prompts are rendered with the chat template, sorted by length (less padding), left-padded, and decoded with
`model.generate`, so every method that keeps `generate` working (all of peftkit's) is evaluated the same way.
A row stops at EOS or at the template's end-of-turn text (`turn_end`), also when that text is no special token of
the tokenizer (chatml's ``<|im_end|>`` on a Gemma tokenizer is plain text, several tokens); the answer ends before it.

Shared prefix: evaluation prompts usually begin with the same tokens (system prompt, instruction). The prefix common
to a batch is run once, its KV cache repeated for every row, and the rows are padded between the prefix and their
own tokens ([prefix][padding][rest]): positions come from the attention mask, so every row sees what it would see
alone (the demo's 60 prompts: 75 tokens each, 50 shared; the prefill was most of the generation time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.data.formats import Conversation
from peftkit.data.sequences import prompt_text, turn_end

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
    end = turn_end(tokenizer, template)
    stop = _stopping(tokenizer, end)
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
        rows = [encoded[i] for i in idx]
        shared = _common_prefix(rows) if len(rows) > 1 and num_beams == 1 and _plain_cache(model) else 0
        width = max(len(x) for x in rows)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, ids in enumerate(rows):  # left padding (after the shared prefix): every prompt ends at the end
            input_ids[r, :shared], mask[r, :shared] = torch.tensor(ids[:shared]), 1
            input_ids[r, width - len(ids) + shared:] = torch.tensor(ids[shared:])
            mask[r, width - len(ids) + shared:] = 1
        extra = {}
        with autocast:
            if shared:
                cache = model(input_ids=input_ids[:1, :shared].to(device), use_cache=True).cache
                cache.batch_repeat_interleave(len(idx))
                extra["cache"] = cache
            out = model.generate(  # type: ignore[operator]  # a transformers model
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=num_beams, pad_token_id=pad, use_cache=True, top_p=None, top_k=None,
                temperature=None, **stop, **extra,
            )
        for r, i in enumerate(idx):
            text = str(tokenizer.decode(out[r, width:], skip_special_tokens=True))
            answers[i] = (text.split(end, 1)[0] if end else text).strip()
    model.train(was_training)
    return answers


def _stopping(tokenizer: PreTrainedTokenizerBase, end: str) -> dict:
    """`model.generate` arguments that stop a row at EOS and at the end-of-turn text `end`: its token added to the
    EOS ids when it is one token, else a stop string (transformers matches it however the model spells it)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    if len(ids) == 1:
        return {"eos_token_id": list(dict.fromkeys(eos + ids))}
    stop: dict[str, Any] = {"eos_token_id": eos or None}
    if ids:
        stop |= {"stop_strings": [end], "tokenizer": tokenizer}
    return stop


MIN_SHARED = 16  # below this, running the prefix separately saves less than it costs


def _common_prefix(rows: list[list[int]]) -> int:
    """Tokens all rows begin with (each row keeps at least one of its own), 0 when under `MIN_SHARED`."""
    n, limit = 0, min(len(r) for r in rows) - 1
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n if n >= MIN_SHARED else 0


def _plain_cache(model: nn.Module) -> bool:
    """Whether a prefix can seed the model's generation cache: not when a method adds virtual tokens to it
    (prompt and prefix tuning attach their encoders as ``peftkit_*`` children)."""
    return not any(name.startswith("peftkit_") for name, _ in model.named_children())


def _has_bf16(model: nn.Module) -> bool:
    return any(p.dtype == torch.bfloat16 for p in model.parameters())

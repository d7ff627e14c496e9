"""The training loss: summed cross-entropy over target tokens, computed without touching the model.

    loss = sum_{t in targets} -log softmax(W h_{t-1} + b)[y_t]

The model runs once, as it is (its method's hooks included), and hands back its final hidden states
(``output_hidden_states``; ``logits_to_keep`` an empty index, so that its own head projects no position). The
hidden states that predict a target are gathered, and only they go through the output head and the cross-entropy:
for instruction data (short answers after long prompts) logit memory grows with the targets, not with the
positions. The cross-entropy runs in row chunks of `SummedCrossEntropy.CHUNK`.

Nothing here registers a hook, replaces a forward or writes into a tensor the model returned (STYLE.md 14).
"""

from __future__ import annotations

import inspect
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.matmul import frozen_linear
from peftkit.data.sequences import IGNORE
from peftkit.errors import PeftkitError
from peftkit.train.packed_attention import NAME as PACKED_ATTENTION
from peftkit.train.packed_attention import packing_problem, segment_bounds

__all__ = ["SummedCrossEntropy", "head_logits", "sequence_loss", "target_hidden_states"]

_NOT_MODEL_INPUTS = ("labels", "segment_ids", "prefix_lengths")


def sequence_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the target tokens of `batch`, and their count.

    `model` is a causal LM (or its DDP wrapper: the call goes through the wrapper, so gradients synchronise).
    With `packed_attention` switched on, the example boundaries go along so that attention runs per example.

    Raises:
        PeftkitError: for packed rows (a 4D mask) that would not give the model each example's own result
            (`packing_problem`: a sliding window without packed attention, a chunked or recurrent layer), or a
            model without an output head.
    """
    core = getattr(model, "module", model)  # under DDP, the head and config live on the wrapped model
    hidden, targets = target_hidden_states(model, batch)
    logits = head_logits(core, hidden)
    # 16-bit logits go in as they are (the loss widens them a chunk at a time); others as fp32. `logits` is this
    # function's own tensor (nothing else holds it), so the loss may turn it into its gradient in place.
    low = logits.dtype in (torch.bfloat16, torch.float16)
    return SummedCrossEntropy.apply(logits if low else logits.float(), targets), targets.numel()


def target_hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states that predict a target token (targets x hidden size), and those targets.

    Note:
        A method may lengthen the sequence it runs (prompt tuning prepends its virtual tokens); whatever it
        adds comes first, so the hidden state of input position i is at ``i + (hidden length - input length)``.
    """
    core = getattr(model, "module", model)
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4 and (problem := packing_problem(core)):
        raise PeftkitError(f"packed rows: {problem}; collate one example per row")
    device = next(core.parameters()).device
    inputs: dict[str, Any] = {k: v.to(device) for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
    if "segment_ids" in batch and getattr(core.config, "_attn_implementation", None) == PACKED_ATTENTION:
        inputs["peftkit_segments"] = segment_bounds(batch["segment_ids"], batch.get("prefix_lengths"))
    if _takes_logits_to_keep(type(core)):  # the model's own logits are not used: none are computed
        inputs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=device)
    out = model(**inputs, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # after the final norm: what the head projects
    labels = batch["labels"][:, 1:].to(device)
    rows, cols = labels.ne(IGNORE).nonzero(as_tuple=True)
    offset = hidden.shape[1] - (labels.shape[1] + 1)
    if offset < 0:
        raise PeftkitError(f"{type(core).__name__} returned {hidden.shape[1]} hidden states for "
                           f"{labels.shape[1] + 1} input positions")
    return hidden[rows, cols + offset], labels[rows, cols]


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's output head applied to `hidden` (n x hidden size), with the model's logit scaling."""
    head: Any = cast(Any, model).get_output_embeddings()  # a transformers model
    if head is None:
        raise PeftkitError(f"{type(model).__name__} has no output head (get_output_embeddings): not a causal LM")
    # a frozen plain head (every method but full fine-tuning): its product by `frozen_linear` (oneDNN on CPU fp32)
    if type(head) is nn.Linear and not head.weight.requires_grad and "forward" not in head.__dict__:
        logits = frozen_linear(hidden, head.weight, head.bias)
    else:
        logits = head(hidden)
    return _scaled(model.config, logits)


def _scaled(config, logits: torch.Tensor) -> torch.Tensor:
    """What a causal LM's forward does to its head's output, from its config: Cohere's ``logit_scale``, Granite's
    ``logits_scaling``, Gemma 2's ``final_logit_softcapping``."""
    if (scale := getattr(config, "logit_scale", None)) is not None:
        logits = logits * scale
    if (divisor := getattr(config, "logits_scaling", None)) is not None:
        logits = logits / divisor
    if cap := getattr(config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap
    return logits


_KEEPS: dict[type, bool] = {}


def _takes_logits_to_keep(cls: Any) -> bool:
    if cls not in _KEEPS:
        _KEEPS[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    return _KEEPS[cls]


class SummedCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits, targets, reduction="sum")`` without vocabulary-sized temporaries.

    Row chunks of `CHUNK` rows: each chunk's fp32 softmax is small enough to stay in cache between its passes
    (3 MiB for the bundled model's 49,152 words), forward keeps only each row's log-probability of its target, and
    backward recomputes the chunk's softmax and writes ``(softmax - onehot) * grad`` straight into the gradient.
    fp32 (or fp64) logits, the caller's own copy, become their gradient in place; 16-bit logits are saved as they are
    and get a 16-bit gradient, rounded once from fp32 (as autograd's cast back would). Against PyTorch's log_softmax +
    nll_loss this saves three (targets x vocabulary) fp32 buffers per step (the bundled model: 194 MB each for 1,000
    targets), and for 16-bit logits the fp32 copy and its cast back too. The logits are consumed: the backward runs
    once (no ``retain_graph``).
    """

    CHUNK = 16

    @staticmethod
    def _chunks(*tensors: torch.Tensor):
        return zip(*(t.split(SummedCrossEntropy.CHUNK) for t in tensors), strict=True)

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            wide = torch.promote_types(logits.dtype, torch.float32)
            picked = torch.cat([torch.log_softmax(c, -1, dtype=wide).gather(1, t[:, None])
                                for c, t in SummedCrossEntropy._chunks(logits, targets)])
        ctx.save_for_backward(logits, targets)
        return -picked.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets = ctx.saved_tensors
        wide = torch.promote_types(logits.dtype, torch.float32)
        out = logits if logits.dtype == wide else torch.empty_like(logits)
        rows = torch.arange(SummedCrossEntropy.CHUNK, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for c, t, o in SummedCrossEntropy._chunks(logits, targets, out):
                p = torch.softmax(c, -1, dtype=wide)
                p[rows[:len(t)], t] -= 1.0
                torch.mul(p, grad, out=o)
        return out, None

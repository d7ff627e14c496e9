"""Quantization report: storage, weight reconstruction error and model perplexity of each format.

`quantization_report` measures a set of weights; `model_report` quantizes a whole model's linear layers in each
format and adds the held-out perplexity (`peftkit quantize-report` on the command line); `plot_levels` draws real
weights against the INT4 and NF4 levels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .blockwise import dequantize, quantize, storage_bits
from .linear import _matches

IGNORE = -100  # label of positions that are not scored (as peftkit.data.sequences.IGNORE)


@dataclass(frozen=True)
class Variant:
    """One row of the report: a format and its options."""

    label: str
    format: str
    block_size: int = 64
    double_quant: bool = False
    clip_percentile: float | None = None


VARIANTS: tuple[Variant, ...] = (
    Variant("INT8", "int8"),
    Variant("INT4", "int4"),
    Variant("INT4 + clip p99.9", "int4", clip_percentile=99.9),
    Variant("FP4", "fp4"),
    Variant("NF4", "nf4"),
    Variant("NF4 + DQ", "nf4", double_quant=True),
)


def quantization_report(
    weights: Mapping[str, torch.Tensor], variants: Iterable[Variant] = VARIANTS
) -> list[dict[str, float | str]]:
    """Quantize every weight with every variant and measure it.

    Args:
        weights: name -> float weight tensor.
        variants: formats to compare.

    Returns:
        One dict per variant: `label`, `bits_per_param` (bytes of data and state, all tensors together),
        `rel_error` (||W - Q(W)||_F / ||W||_F over all weights together), `mean_abs_error`, and `clipped`
        (fraction of weights clipped).
    """
    rows = []
    for v in variants:
        bits = err2 = ref2 = abs_err = clipped = 0.0
        count = 0
        for w in weights.values():
            w = w.float()
            data, state = quantize(w, v.format, v.block_size, v.double_quant, clip_percentile=v.clip_percentile)
            diff = dequantize(data, state, torch.float32) - w
            bits += storage_bits(data, state) * w.numel()
            err2 += float(diff.square().sum())
            ref2 += float(w.square().sum())
            abs_err += float(diff.abs().sum())
            clipped += state.clipped
            count += w.numel()
        rows.append({
            "label": v.label, "bits_per_param": bits / count, "rel_error": (err2 / ref2) ** 0.5,
            "mean_abs_error": abs_err / count, "clipped": clipped / count,
        })  # fmt: skip
    return rows


def format_report(rows: list[dict[str, float | str]]) -> str:
    """The report as a Markdown table."""
    lines = ["| format | bits/param | relative error | mean abs error | clipped |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['bits_per_param']:.3f} | {r['rel_error']:.4f} | {r['mean_abs_error']:.2e} "
            f"| {r['clipped']:.4%} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Whole-model report: storage, reconstruction error and perplexity of each format
# --------------------------------------------------------------------------------------------------------------------

BASELINE_LABEL = "BF16 (unquantized)"


def quantized_linears(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> dict[str, nn.Linear]:
    """The linear layers `quantize_model` would replace: name -> module (the output head skipped by default)."""
    return {name: module for name, module in model.named_modules()
            if name and isinstance(module, nn.Linear) and not _matches(name, tuple(skip))}  # fmt: skip


def _as_batch(batch: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    out = {"input_ids": batch["input_ids"]}
    mask = batch.get("attention_mask")
    out["attention_mask"] = torch.ones_like(out["input_ids"]) if mask is None else mask
    labels = batch.get("labels")
    out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, IGNORE) if labels is None else labels
    return out


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor]) -> tuple[float, int]:
    """Token-level perplexity of a causal LM: ``exp(mean NLL)`` over every labelled next token.

    Args:
        model: a causal LM returning ``.logits``; run as it is (dtype, device).
        batches: token batches: ``(rows, length)`` LongTensors, or dicts with ``input_ids`` and optionally
            ``attention_mask`` (0 = padding) and ``labels`` (-100 = not scored; default: every real token).

    Returns:
        ``(perplexity, scored tokens)``.
    """
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for raw in batches:
        batch = {k: v.to(device) for k, v in _as_batch(raw).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        targets = batch["labels"][:, 1:]
        nll += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                     reduction="sum"))
        count += int(targets.ne(IGNORE).sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no labelled tokens to score")
    return math.exp(nll / count), count


def model_report(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor] | torch.Tensor],
    variants: Iterable[Variant] = VARIANTS,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: Iterable[str] = ("lm_head",),
) -> list[dict[str, Any]]:
    """Quantize a model's linear layers in each format and measure storage, weight error and perplexity.

    Each variant quantizes every linear layer `quantize_model` would (all but the output head; embeddings and norms
    are not linear layers and stay in `compute_dtype`) from the model's own weights, and evaluates a copy of the
    model in `compute_dtype` whose linear weights are the dequantized ones. That is exactly what a `QuantLinear`
    computes (dequantize to the compute dtype, then a dense matmul), and it also covers clipping, which
    `QuantLinear` does not offer. `model` itself is not modified.

    Args:
        model: a causal LM (any dtype; its weights are quantized from float32).
        batches: token batches for `perplexity`.
        variants: formats to compare.
        compute_dtype: dtype of the evaluated copy.
        skip: module names left unquantized (as `quantize_model`'s `skip`).

    Returns:
        One dict per row, the unquantized baseline first (`label` ``"BF16 (unquantized)"`` for bf16): `label`,
        `format`, `block_size`, `double_quant`, `clip_percentile`, `bits_per_param`, `rel_error`, `mean_abs_error`,
        `clipped` (as `quantization_report`, over the quantized layers together), `perplexity`, `tokens` (scored
        tokens) and `params` (quantized weights).

    Raises:
        ValueError: the model has no linear layer to quantize, or the batches no token to score.
    """
    originals = {name: m.weight.detach().float().clone() for name, m in quantized_linears(model, skip).items()}
    if not originals:
        raise ValueError(f"no nn.Linear module to quantize in {type(model).__name__} (skip={tuple(skip)})")
    n_params = sum(w.numel() for w in originals.values())
    work = copy.deepcopy(model).to(compute_dtype)
    targets = quantized_linears(work, skip)
    ppl, tokens = perplexity(work, batches)
    bits = float(torch.finfo(compute_dtype).bits)
    label = BASELINE_LABEL if compute_dtype == torch.bfloat16 else str(compute_dtype).removeprefix("torch.")
    rows: list[dict[str, Any]] = [{
        "label": label, "format": None, "block_size": None, "double_quant": False, "clip_percentile": None,
        "bits_per_param": bits, "rel_error": 0.0, "mean_abs_error": 0.0, "clipped": 0.0, "perplexity": ppl,
        "tokens": tokens, "params": n_params,
    }]  # fmt: skip
    for v in variants:
        errors = _apply_variant(v, originals, targets, compute_dtype)
        ppl, tokens = perplexity(work, batches)
        rows.append({
            "label": v.label, "format": v.format, "block_size": v.block_size, "double_quant": v.double_quant,
            "clip_percentile": v.clip_percentile, "bits_per_param": errors["bits"] / n_params,
            "rel_error": (errors["err2"] / errors["ref2"]) ** 0.5, "mean_abs_error": errors["abs_err"] / n_params,
            "clipped": errors["clipped"] / n_params, "perplexity": ppl, "tokens": tokens, "params": n_params,
        })  # fmt: skip
    return rows


def _apply_variant(v: Variant, originals: Mapping[str, torch.Tensor], targets: Mapping[str, nn.Linear],
                   compute_dtype: torch.dtype) -> dict[str, float]:
    """Quantize each original weight in variant `v`, copy its dequantized value into the target layer; the sums
    over all weights: storage ``bits``, squared error ``err2`` and norm ``ref2``, ``abs_err``, ``clipped``."""
    sums = dict.fromkeys(("bits", "err2", "ref2", "abs_err", "clipped"), 0.0)
    for name, w in originals.items():
        data, state = quantize(w, v.format, v.block_size, v.double_quant, clip_percentile=v.clip_percentile)
        restored = dequantize(data, state, torch.float32)
        diff = restored - w
        sums["bits"] += storage_bits(data, state) * w.numel()
        sums["err2"] += float(diff.square().sum())
        sums["ref2"] += float(w.square().sum())
        sums["abs_err"] += float(diff.abs().sum())
        sums["clipped"] += state.clipped
        with torch.no_grad():
            targets[name].weight.copy_(restored.to(compute_dtype))
    return sums


def format_model_report(rows: list[dict[str, Any]]) -> str:
    """`model_report` rows as a Markdown table (perplexity relative to the first, unquantized row)."""
    base = rows[0]["perplexity"]
    lines = ["| format | bits/param | relative error | mean abs error | clipped | perplexity | vs unquantized |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['bits_per_param']:.3f} | {r['rel_error']:.4f} | {r['mean_abs_error']:.2e} "
            f"| {r['clipped']:.4%} | {r['perplexity']:.3f} | {r['perplexity'] / base - 1:+.2%} |"
        )
    return "\n".join(lines)


def plot_levels(block: torch.Tensor, weight: torch.Tensor, path: str | Path, title: str = "",
                block_size: int = 64) -> Path:
    """Histogram of real weights with the INT4 and NF4 levels drawn over it (PNG).

    Left: one block of `block_size` weights in its own units, with the levels scaled by the block's absmax. Right:
    all of `weight`, each value divided by its block's absmax (what the 4-bit code sees), with the levels in [-1, 1].
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .codebooks import NF4_VALUES, int_values

    nf4 = torch.as_tensor(NF4_VALUES, dtype=torch.float32)
    int4 = int_values(4)
    int4 = int4[int4 >= -1]  # -8/7 lies outside [-1, 1]: absmax scaling never uses it
    block = block.detach().float().reshape(-1)
    absmax = float(block.abs().max())
    flat = weight.detach().float().reshape(-1)
    n = flat.numel() // block_size * block_size
    normed = (flat[:n].view(-1, block_size) / flat[:n].view(-1, block_size).abs().amax(1, keepdim=True)).reshape(-1)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    panels = ((axes[0], block, absmax, f"one block of {block.numel()} weights (absmax {absmax:.4f})"),
              (axes[1], normed, 1.0, f"all {n:,} weights / their block's absmax"))
    for ax, values, scale, subtitle in panels:
        ax.hist(values.numpy(), bins=64 if values.numel() < 1000 else 201, color="0.6")
        for i, x in enumerate((int4 * scale).tolist()):
            ax.axvline(x, color="tab:blue", lw=1.0, ls="--", label="INT4 levels" if i == 0 else None)
        for i, x in enumerate((nf4 * scale).tolist()):
            ax.axvline(x, color="tab:red", lw=1.0, alpha=0.8, label="NF4 levels" if i == 0 else None)
        ax.set_title(subtitle, fontsize=10)
        ax.set_xlabel("weight value")
    axes[0].set_ylabel("count")
    axes[1].legend(loc="upper right", fontsize=9)
    fig.suptitle(title or "weights vs 4-bit levels")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

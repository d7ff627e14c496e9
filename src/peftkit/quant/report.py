"""Quantization report: storage and weight reconstruction error of each format on a set of weights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .blockwise import dequantize, quantize, storage_bits


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

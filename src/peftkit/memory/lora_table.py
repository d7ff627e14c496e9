"""The lecture's generalised LoRA table (a model of N parameters as one sqrt(N) x sqrt(N) matrix) reproduced exactly,
next to the real per-architecture LoRA counts for the same ranks."""

from __future__ import annotations

import math
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.memory.arch import Arch, load_arch
from peftkit.memory.estimator import count_trainable

__all__ = ["LECTURE_LORA_TABLE", "LECTURE_RANKS", "LECTURE_SIZES", "LECTURE_TRUNCATED", "format_count",
           "generalized_lora_params", "lora_table"]


LECTURE_RANKS = (1, 2, 8, 16, 512, 1024, 8192)
LECTURE_SIZES = (7e9, 13e9, 70e9, 180e9)

# The lecture's table, verbatim (rows: rank, columns: 7B, 13B, 70B, 180B).
LECTURE_LORA_TABLE: dict[int | str, tuple[str, ...]] = {
    1: ("167K", "228K", "529K", "849K"),
    2: ("334K", "456K", "1M", "2M"),
    8: ("1M", "2M", "4M", "7M"),
    16: ("3M", "4M", "8M", "14M"),
    512: ("86M", "117M", "270M", "434M"),
    1024: ("171M", "233M", "542M", "869M"),
    8192: ("1.4B", "1.8B", "4.3B", "7B"),
    "Full": ("7B", "13B", "70B", "180B"),
}

# Cells where the lecture truncated instead of rounding (rank, column index) -> exact value shown there.
# No rounding rule of the exact 2*r*sqrt(N) gives all 32 strings: within one unit the lecture rounds
# .53, .75 and .85 up but .51, .66 and .92 down, so the rule below plus these four truncations is the table.
LECTURE_TRUNCATED = {(2, 0), (512, 2), (1024, 1), (8192, 1)}


def generalized_lora_params(n_params: float, r: int) -> float:
    """The lecture's generalisation: the model as one square matrix of side sqrt(N); LoRA adds ``2*r*sqrt(N)``."""
    return 2 * r * math.sqrt(n_params)


def format_count(n: float, truncate: bool = False) -> str:
    """Round like the lecture: K below 1e6, M below 1e9 (whole numbers), B with one decimal, a trailing ``.0``
    dropped; half-way rounds up. ``truncate`` cuts instead of rounding (the lecture's four odd cells).

    Examples: 167332 -> "167K", 1058301 -> "1M", 1370783787 -> "1.4B", 6951142502 -> "7B", 7e9 -> "7B".
    """
    cut = math.floor if truncate else (lambda x: math.floor(x + 0.5))
    if n < 1e6:
        return f"{cut(n / 1e3)}K"
    if n < 1e9:
        v = cut(n / 1e6)
        return f"{v}M" if v < 1000 else format_count(v * 1e6)
    tenths = cut(n / 1e8)
    return f"{tenths // 10}B" if tenths % 10 == 0 else f"{tenths / 10:.1f}B"


def _lora_count_or_none(arch: Arch, r: int, target_modules: list[str] | str) -> int | None:
    """LoRA's trainable count, or None where the rank is above an adapted layer's size."""
    try:
        return count_trainable(arch, "lora", r=r, target_modules=target_modules)
    except PeftkitError as e:
        if "is larger than the layer" in str(e):
            return None
        raise


def lora_table(lecture: bool = True) -> dict[str, Any]:
    """The generalised table and the real per-architecture LoRA counts for the same ranks.

    Args:
        lecture: reproduce the lecture's strings exactly (truncating its four odd cells); otherwise round all.

    Returns:
        ``{"generalised": {rank: [str x4]}, "real": {model: {"q,v": {rank: int}, "all-linear": {rank: int}}},
        "models": [...]}``; real counts are None for ranks above an adapted layer's size (LoRA refuses them).
    """
    gen: dict[Any, list[str]] = {}
    for r in LECTURE_RANKS:
        gen[r] = [format_count(generalized_lora_params(n, r), truncate=lecture and (r, j) in LECTURE_TRUNCATED)
                  for j, n in enumerate(LECTURE_SIZES)]
    gen["Full"] = [format_count(n) for n in LECTURE_SIZES]
    real: dict[str, dict[str, dict[int, int | None]]] = {}
    models = ("llama-2-7b", "llama-2-13b", "llama-2-70b", "falcon-180b")
    for name in models:
        arch = load_arch(name)
        qv = ("q_proj", "v_proj") if arch.family == "llama" else ("query_key_value",)
        real[name] = {
            "params": {0: arch.num_params},
            "q,v": {r: _lora_count_or_none(arch, r, list(qv)) for r in LECTURE_RANKS},
            "all-linear": {r: _lora_count_or_none(arch, r, "all-linear") for r in LECTURE_RANKS},
        }
    return {"generalised": gen, "real": real, "models": list(models)}

"""Analytical memory estimator for fine-tuning: pure functions over an architecture config, no weights loaded.

`estimate(arch_or_name, setup)` returns a `Breakdown` of the memory one training step needs, component by component.
Every number is derived from the architecture and the training setup (`TrainSetup`); parameter counts are exact
(tested against instantiated models).

* `peftkit.memory.arch`: the model geometry (`Arch`, `LinearSpec`) from a ``config.json``, a folder or a preset;
* `peftkit.memory.activations`: what a forward keeps for backward;
* `peftkit.memory.estimator`: the training setup, the trainable tensors (counted by each method's registry entry),
  and `estimate` / `compare`, which combine them (formulas and sources in its docstring);
* `peftkit.memory.lora_table`: the lecture's generalised LoRA table next to real counts.
"""

from peftkit.memory.arch import PRESETS, Arch, LinearSpec, arch_from_config, load_arch
from peftkit.memory.estimator import (
    ALIASES,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    QUANTS,
    Breakdown,
    TrainSetup,
    compare,
    count_trainable,
    estimate,
    method_config,
    parse_bytes,
    trainable_tensors,
)
from peftkit.memory.lora_table import (
    LECTURE_LORA_TABLE,
    LECTURE_RANKS,
    LECTURE_SIZES,
    LECTURE_TRUNCATED,
    format_count,
    generalized_lora_params,
    lora_table,
)

__all__ = [
    "ALIASES",
    "LECTURE_LORA_TABLE",
    "LECTURE_RANKS",
    "LECTURE_SIZES",
    "LECTURE_TRUNCATED",
    "METHODS",
    "OPTIMIZERS",
    "PRECISIONS",
    "PRESETS",
    "QUANTS",
    "Arch",
    "Breakdown",
    "LinearSpec",
    "TrainSetup",
    "arch_from_config",
    "compare",
    "count_trainable",
    "estimate",
    "format_count",
    "generalized_lora_params",
    "load_arch",
    "lora_table",
    "method_config",
    "parse_bytes",
    "trainable_tensors",
]

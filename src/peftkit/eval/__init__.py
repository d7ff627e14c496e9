"""Evaluation: the E2E NLG metrics and the E2E data set (more evaluation code will join here)."""

from peftkit.eval.e2e import E2E_INSTRUCTION, E2EItem, e2e_instruction_rows, load_e2e
from peftkit.eval.metrics import (
    JAVA_METRICS,
    METRIC_NAMES,
    JavaRequiredError,
    MeteorScorer,
    bleu,
    cider,
    e2e_metrics,
    java_available,
    meteor,
    nist,
    ptb_tokenize,
    rouge_l,
    tokenize_13a,
)

__all__ = [
    "E2E_INSTRUCTION",
    "JAVA_METRICS",
    "METRIC_NAMES",
    "E2EItem",
    "JavaRequiredError",
    "MeteorScorer",
    "bleu",
    "cider",
    "e2e_instruction_rows",
    "e2e_metrics",
    "java_available",
    "load_e2e",
    "meteor",
    "nist",
    "ptb_tokenize",
    "rouge_l",
    "tokenize_13a",
]

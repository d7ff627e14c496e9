"""Full fine-tuning: every parameter of the model trains.

    theta = theta0 + delta,   delta unconstrained (all N parameters)

The baseline every PEFT method is compared against (16 bytes per parameter with mixed-precision Adam, SPECS
section 4). The adapter file holds the whole model (its trainable parameters under their own names).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from torch import nn

from peftkit.core.config import Config
from peftkit.core.inject import InjectReport
from peftkit.core.registry import Capabilities, MemoryModel, Merging, register_method

if TYPE_CHECKING:
    from peftkit.memory import Arch

__all__ = ["FullConfig"]


@dataclasses.dataclass
class FullConfig(Config):
    """Full fine-tuning has no settings: everything trains."""


def count(arch: Arch, config: FullConfig) -> list[tuple[str, int]]:
    """Every parameter (a tied head once)."""
    return arch.param_tensors()


@register_method("full", FullConfig, count=count, merging=Merging.in_place(),
                 memory=MemoryModel(trains_block_linears=True, trains_head=lambda _: True),
                 capabilities=Capabilities(quantized_base=False))  # every weight trains: none to quantize
def apply(model: nn.Module, config: FullConfig) -> InjectReport:
    """Mark every parameter of `model` trainable."""
    for p in model.parameters():
        p.requires_grad_(True)
    n = sum(p.numel() for p in model.parameters())
    return InjectReport("full", adapted=[""], notes=[f"all {n:,} parameters train"])

"""Optimizers with small or paged state: 8-bit AdamW, paged AdamW (32-bit and 8-bit), and a factory.

See ``adamw.py`` for the update rule, ``dynamic8.py`` for the 8-bit state format and ``pager.py`` for paging.
"""

from .adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, adamw_foreach_
from .dynamic8 import (
    DynamicCodebook,
    create_dynamic_map,
    dequantize_blockwise_dynamic,
    quantize_blockwise_dynamic,
)
from .factory import OPTIMIZERS, build_optimizer, state_bytes
from .pager import Pager

__all__ = [
    "OPTIMIZERS",
    "AdamW8bit",
    "DynamicCodebook",
    "PagedAdamW",
    "PagedAdamW32bit",
    "PagedAdamW8bit",
    "Pager",
    "adamw_foreach_",
    "build_optimizer",
    "create_dynamic_map",
    "dequantize_blockwise_dynamic",
    "quantize_blockwise_dynamic",
    "state_bytes",
]

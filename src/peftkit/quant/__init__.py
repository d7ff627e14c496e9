"""Quantization as a weight format: codebooks, blockwise (double) quantization, frozen quantized layers.

`quantize(x) -> (data, state)` and `dequantize(data, state)` work on any float tensor; `QuantLinear` and
`quantize_model` turn a model's linear layers into frozen 4-bit (NF4 + double quantization by default) layers.
"""

from .blockwise import (
    FORMATS,
    QuantState,
    dequantize,
    double_dequantize,
    double_quantize,
    quantize,
    storage_bits,
)
from .codebooks import FP4_VALUES, NF4_VALUES, codebook, dynamic_map, int_values, lookup, nearest_code
from .linear import (
    QuantLinear,
    QuantReport,
    apply_quantization,
    dequantize_model,
    load_quantized,
    quantize_model,
    save_quantized,
)
from .packing import pack_4bit, unpack_4bit
from .scaling import absmax_per_block, absmax_per_row, absmax_per_tensor, clip, clip_threshold

__all__ = [
    "FORMATS", "FP4_VALUES", "NF4_VALUES", "QuantLinear", "QuantReport", "QuantState",
    "absmax_per_block", "absmax_per_row", "absmax_per_tensor", "apply_quantization", "clip", "clip_threshold",
    "codebook", "dequantize", "dequantize_model", "double_dequantize", "double_quantize", "dynamic_map", "int_values",
    "load_quantized", "lookup", "nearest_code", "pack_4bit", "quantize", "quantize_model", "save_quantized",
    "storage_bits", "unpack_4bit",
]  # fmt: skip

"""Quantized storage formats: pure functions over arrays (no Flax imports)."""

from qlora_jax._src.formats.blockwise import dequantize, dequantize_absmax, quantize
from qlora_jax._src.formats.bnb import from_bnb, to_bnb
from qlora_jax._src.formats.codebooks import DYNAMIC_SIGNED, FP4, INT4, NF4
from qlora_jax._src.formats.qarray import BLOCK_SIZES, FORMATS, NESTED_BLOCK_SIZE, QuantizedArray

__all__ = [
    "BLOCK_SIZES",
    "DYNAMIC_SIGNED",
    "FORMATS",
    "FP4",
    "INT4",
    "NESTED_BLOCK_SIZE",
    "NF4",
    "QuantizedArray",
    "dequantize",
    "dequantize_absmax",
    "from_bnb",
    "quantize",
    "to_bnb",
]

"""Flax Linen side: QLoRA layers, Dense conversion by params rewriting plus a method interceptor, optax mask."""

from qlora_jax._src.linen.convert import DenseLayer, convert_params, dense_layers
from qlora_jax._src.linen.interceptor import (
    SUPPORTED_MODULES,
    ProductParam,
    product_params,
    qlora_interceptor,
    unsupported_reason,
)
from qlora_jax._src.linen.layers import ADAPTER_NAMES, FROZEN, QLoRADense, QLoRADenseGeneral, dense_forward
from qlora_jax._src.linen.mask import lora_mask, masked

__all__ = [
    "ADAPTER_NAMES",
    "DenseLayer",
    "FROZEN",
    "ProductParam",
    "QLoRADense",
    "QLoRADenseGeneral",
    "SUPPORTED_MODULES",
    "convert_params",
    "dense_forward",
    "dense_layers",
    "lora_mask",
    "masked",
    "product_params",
    "qlora_interceptor",
    "unsupported_reason",
]

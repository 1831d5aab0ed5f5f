"""Flax NNX layers over frozen (quantized) kernels, LoRA as pure functions, variable types."""

from qlora_jax._src.nn.linear import QLoRALinear, QuantLinear
from qlora_jax._src.nn.lora import INITS, init_lora, lora_delta, lora_scale
from qlora_jax._src.nn.variables import FrozenWeight, QuantizedWeight

__all__ = [
    "INITS",
    "FrozenWeight",
    "QLoRALinear",
    "QuantLinear",
    "QuantizedWeight",
    "init_lora",
    "lora_delta",
    "lora_scale",
]

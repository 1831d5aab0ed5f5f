"""Flax NNX layers over frozen (quantized) kernels, LoRA as pure functions, variable types."""

from qlora_jax._src.nn.einsum import QLoRAEinsum, QuantEinsum
from qlora_jax._src.nn.general import QLoRALinearGeneral, QuantLinearGeneral
from qlora_jax._src.nn.linear import QLoRALinear, QuantLinear
from qlora_jax._src.nn.lora import init_lora, lora_delta, lora_einsum
from qlora_jax._src.nn.variables import FrozenWeight, QuantizedWeight

# Every layer type over a frozen kernel, and those of them with a LoRA adapter.
FROZEN_LAYERS: tuple[type, ...] = (QuantLinear, QuantLinearGeneral, QuantEinsum)
QLORA_LAYERS: tuple[type, ...] = (QLoRALinear, QLoRALinearGeneral, QLoRAEinsum)

__all__ = [
    "FROZEN_LAYERS",
    "QLORA_LAYERS",
    "FrozenWeight",
    "QLoRAEinsum",
    "QLoRALinear",
    "QLoRALinearGeneral",
    "QuantEinsum",
    "QuantLinear",
    "QuantLinearGeneral",
    "QuantizedWeight",
    "init_lora",
    "lora_delta",
    "lora_einsum",
]

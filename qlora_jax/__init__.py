"""qlora_jax: QLoRA fine-tuning in JAX.

Base weights are stored as packed 4-bit codes with per-block scales, in
bitsandbytes' exact format (Dettmers et al., 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs").

Example:
    >>> import jax, qlora_jax as qj
    >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (1024, 1024)), "nf4", double_quant=True)
    >>> round(q.nbytes / 1024**2, 4)
    0.5159
"""

import importlib
from typing import Any

from qlora_jax._src.config import LoraConfig, QuantConfig
from qlora_jax._src.formats import (
    BLOCK_SIZES,
    FORMATS,
    QuantizedArray,
    dequantize,
    dequantize_absmax,
    from_bnb,
    quantize,
    to_bnb,
)
from qlora_jax._src.nn import lora_delta, lora_einsum
from qlora_jax._src.nn.adapters import active_adapter, adapter_names, delete_adapter, set_adapter
from qlora_jax._src.ops import can_use_pallas_gpu, can_use_pallas_tpu, qdot_general, qeinsum, qmatmul, qmatmul_path
from qlora_jax._src.sharding import (
    STRATEGIES,
    batch_sharding,
    make_mesh,
    partition_specs,
    shard_batch,
    shard_model,
)
from qlora_jax._src.surgery import (
    MergeReport,
    QLoRAReport,
    apply_qlora,
    merge_lora,
    merge_report,
    qlora_report,
    register_linear,
    unmerge_lora,
)

__version__ = "0.1.0"

# Imported on first use (`qj.train`, `qj.lora_mask`, ...): Orbax, Flax Linen and the models cost import time that a
# script using only the 4-bit formats or layers does not need.
_LAZY_MODULES = ("checkpoint", "data", "linen", "models", "nnx", "train")
_LAZY_NAMES = {"lora_mask": "qlora_jax._src.linen", "masked": "qlora_jax._src.linen"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        module = importlib.import_module(f"qlora_jax.{name}")
    elif name in _LAZY_NAMES:
        module = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'qlora_jax' has no attribute {name!r}")
    globals()[name] = module
    return module


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

__all__ = [
    "checkpoint",
    "data",
    "linen",
    "models",
    "nnx",
    "train",
    "BLOCK_SIZES",
    "FORMATS",
    "STRATEGIES",
    "LoraConfig",
    "MergeReport",
    "QLoRAReport",
    "QuantConfig",
    "QuantizedArray",
    "active_adapter",
    "adapter_names",
    "apply_qlora",
    "batch_sharding",
    "can_use_pallas_gpu",
    "can_use_pallas_tpu",
    "delete_adapter",
    "dequantize",
    "dequantize_absmax",
    "from_bnb",
    "lora_delta",
    "lora_einsum",
    "lora_mask",
    "make_mesh",
    "masked",
    "merge_lora",
    "merge_report",
    "partition_specs",
    "qdot_general",
    "qeinsum",
    "qlora_report",
    "qmatmul",
    "qmatmul_path",
    "quantize",
    "register_linear",
    "set_adapter",
    "shard_batch",
    "shard_model",
    "to_bnb",
    "unmerge_lora",
]

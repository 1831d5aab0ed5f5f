"""Model surgery: configs, target matching, `apply_qlora` for NNX models, its report, and merge/unmerge."""

from qlora_jax._src.surgery.apply import apply_qlora, quantize_kernel
from qlora_jax._src.surgery.config import ALL_LINEAR, LoraConfig, QuantConfig
from qlora_jax._src.surgery.merge import MergedLayer, MergeReport, merge_lora, unmerge_lora
from qlora_jax._src.surgery.report import QLoRAReport, ReplacedLayer
from qlora_jax._src.surgery.targets import HEAD_NAMES, SUPPORTED_MODULES

__all__ = [
    "ALL_LINEAR",
    "HEAD_NAMES",
    "LoraConfig",
    "MergeReport",
    "MergedLayer",
    "QLoRAReport",
    "QuantConfig",
    "ReplacedLayer",
    "SUPPORTED_MODULES",
    "apply_qlora",
    "merge_lora",
    "quantize_kernel",
    "unmerge_lora",
]

"""Model surgery: target matching, `apply_qlora` for NNX models, `qlora_report`, and merge/unmerge."""

from qlora_jax._src.surgery.apply import apply_qlora, quantize_kernel
from qlora_jax._src.surgery.intercept import ProductOperand, QLoRAProduct, QuantProduct, register_linear
from qlora_jax._src.surgery.merge import MergedLayer, MergeReport, merge_lora, merge_report, unmerge_lora
from qlora_jax._src.surgery.report import FloatParam, QLoRAReport, ReplacedLayer, qlora_report
from qlora_jax._src.surgery.targets import SUPPORTED_MODULES

__all__ = [
    "FloatParam",
    "MergeReport",
    "MergedLayer",
    "ProductOperand",
    "QLoRAProduct",
    "QLoRAReport",
    "ReplacedLayer",
    "QuantProduct",
    "SUPPORTED_MODULES",
    "apply_qlora",
    "merge_lora",
    "merge_report",
    "qlora_report",
    "quantize_kernel",
    "register_linear",
    "unmerge_lora",
]

"""Flax NNX side of qlora_jax: layers, variable types, `apply_qlora` and `merge_lora`.

`QuantLinear` (a frozen, usually 4-bit packed kernel) and `QLoRALinear` (plus
a LoRA adapter) replace `nnx.Linear`; `QuantLinearGeneral` /
`QLoRALinearGeneral` replace `nnx.LinearGeneral`, `QuantEinsum` /
`QLoRAEinsum` replace `nnx.Einsum`. `apply_qlora` does the replacement on any
NNX model; `merge_lora` folds the adapters back into plain Flax layers (and
`unmerge_lora` undoes it, `merge_report` tells what it did). Base weights are `QuantizedWeight` /
`FrozenWeight` variables, which are not `nnx.Param`; adapters are
`nnx.LoRAParam`, so `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains the
adapters only. The adapter layers take a `LoraConfig`, as `apply_qlora` and
the Linen layers do; `qlora_report` tells what a model's layers hold.

Example:
    >>> import jax, jax.numpy as jnp, qlora_jax as qj
    >>> from flax import nnx
    >>> from qlora_jax.nnx import QLoRALinear
    >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (256, 64)), "nf4", double_quant=True)
    >>> layer = QLoRALinear(q, lora=qj.LoraConfig(rank=4, alpha=8), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((3, 256))).shape
    (3, 64)
"""

from qlora_jax._src.config import LoraConfig, QuantConfig, lora_scale, pissa_niter
from qlora_jax._src.nn import (
    FrozenWeight,
    QLoRAEinsum,
    QLoRALinear,
    QLoRALinearGeneral,
    QuantEinsum,
    QuantizedWeight,
    QuantLinear,
    QuantLinearGeneral,
    init_lora,
    lora_delta,
    lora_einsum,
)
from qlora_jax._src.nn.adapters import active_adapter, adapter_names, delete_adapter, set_adapter
from qlora_jax._src.nn.variables import FrozenAdapter
from qlora_jax._src.nn.weight_init import weight_init, weight_init_kernel
from qlora_jax._src.surgery import (
    FloatParam,
    MergedLayer,
    MergeReport,
    ProductOperand,
    QLoRAProduct,
    QLoRAReport,
    QuantProduct,
    ReplacedLayer,
    apply_qlora,
    merge_lora,
    merge_report,
    qlora_report,
    quantize_kernel,
    register_linear,
    unmerge_lora,
)

__all__ = [
    "FloatParam",
    "FrozenAdapter",
    "FrozenWeight",
    "LoraConfig",
    "MergeReport",
    "MergedLayer",
    "ProductOperand",
    "QLoRAProduct",
    "QLoRAEinsum",
    "QLoRALinear",
    "QLoRALinearGeneral",
    "QLoRAReport",
    "QuantConfig",
    "QuantEinsum",
    "QuantLinear",
    "QuantLinearGeneral",
    "QuantProduct",
    "QuantizedWeight",
    "ReplacedLayer",
    "active_adapter",
    "adapter_names",
    "apply_qlora",
    "delete_adapter",
    "init_lora",
    "lora_delta",
    "lora_einsum",
    "lora_scale",
    "pissa_niter",
    "merge_lora",
    "merge_report",
    "qlora_report",
    "quantize_kernel",
    "register_linear",
    "set_adapter",
    "unmerge_lora",
    "weight_init",
    "weight_init_kernel",
]

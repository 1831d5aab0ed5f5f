"""Flax NNX side of qlora_jax: layers, variable types, `apply_qlora` and `merge_lora`.

`QuantLinear` (a frozen, usually 4-bit packed kernel) and `QLoRALinear` (plus
a LoRA adapter) replace `nnx.Linear`; `QuantLinearGeneral` /
`QLoRALinearGeneral` replace `nnx.LinearGeneral`, `QuantEinsum` /
`QLoRAEinsum` replace `nnx.Einsum`. `apply_qlora` does the replacement on any
NNX model; `merge_lora` folds the adapters back into plain Flax layers (and
`unmerge_lora` undoes it). Base weights are `QuantizedWeight` /
`FrozenWeight` variables, which are not `nnx.Param`; adapters are
`nnx.LoRAParam`, so `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains the
adapters only.

Example:
    >>> import jax, jax.numpy as jnp, qlora_jax as qj
    >>> from flax import nnx
    >>> from qlora_jax.nnx import QLoRALinear
    >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (256, 64)), "nf4", double_quant=True)
    >>> layer = QLoRALinear(q, rank=4, alpha=8, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((3, 256))).shape
    (3, 64)
"""

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
    lora_scale,
)
from qlora_jax._src.surgery import (
    LoraConfig,
    MergedLayer,
    MergeReport,
    QLoRAReport,
    QuantConfig,
    ReplacedLayer,
    apply_qlora,
    merge_lora,
    quantize_kernel,
    unmerge_lora,
)

__all__ = [
    "FrozenWeight",
    "LoraConfig",
    "MergeReport",
    "MergedLayer",
    "QLoRAEinsum",
    "QLoRALinear",
    "QLoRALinearGeneral",
    "QLoRAReport",
    "QuantConfig",
    "QuantEinsum",
    "QuantLinear",
    "QuantLinearGeneral",
    "QuantizedWeight",
    "ReplacedLayer",
    "apply_qlora",
    "init_lora",
    "lora_delta",
    "lora_einsum",
    "lora_scale",
    "merge_lora",
    "quantize_kernel",
    "unmerge_lora",
]

"""Flax Linen side of qlora_jax: layers, conversion of unmodified models, and the optax mask.

Two ways to QLoRA a Linen model:

* Write it with `QLoRADense` / `QLoRADenseGeneral` (drop-ins for `nn.Dense` /
  `nn.DenseGeneral`); the packed kernel is in the `"frozen"` collection, the
  adapters `lora_a`, `lora_b` in `"params"`.
* Keep its source: `convert_params` quantizes the Dense kernels of its
  (pretrained) params into `"frozen"` and adds adapters; run it under
  `nn.intercept_methods(qlora_interceptor(...))`.

Either way `masked(optax.adamw(...), params)` trains the adapters only, with
optimizer state for them alone (`lora_mask` gives the boolean mask).

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, qlora_jax as qj
    >>> from qlora_jax.linen import QLoRADense, masked
    >>> layer = QLoRADense(64, lora=qj.LoraConfig(rank=4))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 128)))
    >>> state = masked(optax.adamw(1e-3), variables["params"]).init(variables["params"])
    >>> sum(leaf.size for leaf in jax.tree.leaves(state) if leaf.dtype == jnp.float32) == 2 * (128 * 4 + 4 * 64)
    True
"""

from qlora_jax._src.config import LoraConfig, QuantConfig
from qlora_jax._src.linen import *  # noqa: F403  (the public names, listed in __all__ there)
from qlora_jax._src.linen import __all__ as _linen_all
from qlora_jax._src.surgery import QLoRAReport, ReplacedLayer

__all__ = ["LoraConfig", "QLoRAReport", "QuantConfig", "ReplacedLayer"]
__all__ += _linen_all

"""The LoRA adapter state shared by `QLoRALinear`, `QLoRALinearGeneral` and `QLoRAEinsum`.

A kernel with input axes `in` and output axes `out` gets factors A `[*stack,
*in, r]` and B `[*stack, r, *out]`: A maps the flattened input (size
`prod(in)`) to the rank, B the rank to the flattened output, exactly as a
Linear `[prod(in), prod(out)]` would; A's init uses `fan_in = prod(in)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from qlora_jax._src.nn.lora import INITS, init_lora, lora_scale

__all__ = ["AdapterMixin"]


class AdapterMixin:
    """Creates the adapter variables and applies dropout to the adapter input (a mixin for NNX layers).

    Sets `lora_a`, `lora_b` (`nnx.LoRAParam`), `rank`, `alpha`, `rslora`,
    `scale`, `dropout_rate`, `deterministic` and `rngs` (the dropout
    `nnx.RngStream`, split per stacked layer, or None without dropout).
    """

    def _init_adapter(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        stack_shape: tuple[int, ...],
        *,
        rank: int,
        alpha: float,
        dropout: float,
        rslora: bool,
        init: str,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
            raise ValueError(f"rank: must be a positive integer, got {rank!r}")
        if not (isinstance(alpha, (int, float, np.number)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha: must be a positive number, got {alpha!r}")
        if not (isinstance(dropout, (int, float, np.number)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout: must lie in [0, 1), got {dropout!r}")
        if init not in INITS:
            raise ValueError(f"init: unknown LoRA init {init!r}; expected one of {INITS}")
        rank = int(rank)
        a, b = init_lora(rngs["params"](), math.prod(in_shape), math.prod(out_shape), rank, init=init,
                         stack_shape=stack_shape, dtype=param_dtype)
        self.lora_a = nnx.LoRAParam(a.reshape(*stack_shape, *in_shape, rank))  # [*stack, *in, r]
        self.lora_b = nnx.LoRAParam(b.reshape(*stack_shape, rank, *out_shape))  # [*stack, r, *out]
        self.rank = rank
        self.alpha = float(alpha)
        self.rslora = bool(rslora)
        self.scale = lora_scale(self.rank, self.alpha, self.rslora)
        self.dropout_rate = float(dropout)
        self.deterministic = False
        if self.dropout_rate > 0:
            key = rngs["dropout"]()
            keys = jax.random.split(key, stack_shape) if stack_shape else key
            self.rngs = nnx.RngStream(keys, tag="dropout")
        else:
            self.rngs = nnx.data(None)

    def _adapter_input(self, h: jax.Array, deterministic: bool | None) -> jax.Array:
        """`h` with inverted dropout (as `torch.nn.Dropout`) unless deterministic."""
        off = self.deterministic if deterministic is None else deterministic
        if self.dropout_rate > 0 and not off:
            keep = 1.0 - self.dropout_rate
            # Named so that a layer under a remat policy can keep the mask (`models.llama._KEPT`) and need not
            # draw the random bits again in the backward pass.
            mask = checkpoint_name(jax.random.bernoulli(self.rngs(), keep, h.shape), "lora_dropout_mask")
            h = lax.select(mask, h / keep, jnp.zeros_like(h))
        return h

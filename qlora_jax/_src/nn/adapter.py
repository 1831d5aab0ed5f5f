"""The LoRA adapter state shared by `QLoRALinear`, `QLoRALinearGeneral` and `QLoRAEinsum`.

A kernel with input axes `in` and output axes `out` gets factors A `[*stack,
*in, r]` and B `[*stack, r, *out]`: A maps the flattened input (size
`prod(in)`) to the rank, B the rank to the flattened output, exactly as a
Linear `[prod(in), prod(out)]` would; A's init uses `fan_in = prod(in)`.

With DoRA (`LoraConfig.use_dora`) the layer also holds PEFT's
`lora_magnitude_vector` `[*stack, *out]` (an `nnx.LoRAParam`, trained with the
factors), initialised to the weight norm `‖W + s·A ⊗ B‖` per output (the
dequantized weight for a packed kernel), and computes, as PEFT's
`DoraLinearLayer.forward`, with `c = m / ‖W + s·A ⊗ B‖` (no gradient through
the norm) and `x @ W` the base product without bias:
`y = c · (x @ W + s·B(A(x))) + bias` without dropout, and
`y = x @ W + bias + (c - 1) · (d(x) @ W) + c · s·B(A(d(x)))` with dropout `d`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from qlora_jax._src.config import LoraConfig
from qlora_jax._src.nn.lora import dora_norm, init_lora

__all__ = ["AdapterMixin"]


class AdapterMixin:
    """Creates the adapter variables and applies dropout to the adapter input (a mixin for NNX layers).

    Takes a `LoraConfig` (its `targets` play no part in one layer) and sets
    `lora_a`, `lora_b` (`nnx.LoRAParam`), `rank`, `alpha`, `rslora`, `scale`,
    `dropout_rate`, `deterministic` and `rngs` (the dropout `nnx.RngStream`,
    split per stacked layer, or None without dropout) and, with DoRA,
    `lora_magnitude_vector` (`nnx.LoRAParam`, else None), `adapter_name`
    ("default") and `frozen_adapters` (other loaded adapters, see
    `nn/adapters.py`). The layer provides
    `kernel`, `contract_axes`, `stack_shape` and `precision`.
    """

    def _init_adapter(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        stack_shape: tuple[int, ...],
        *,
        lora: LoraConfig,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        if not isinstance(lora, LoraConfig):
            raise TypeError(f"lora: expected a LoraConfig, got {type(lora).__name__}")
        rank = lora.rank
        a, b = init_lora(rngs["params"](), math.prod(in_shape), math.prod(out_shape), rank, init=lora.init,
                         stack_shape=stack_shape, dtype=param_dtype)
        self.lora_a = nnx.LoRAParam(a.reshape(*stack_shape, *in_shape, rank))  # [*stack, *in, r]
        self.lora_b = nnx.LoRAParam(b.reshape(*stack_shape, rank, *out_shape))  # [*stack, r, *out]
        self.rank = rank
        self.alpha = float(lora.alpha)
        self.rslora = lora.rslora
        self.init = lora.init  # how the adapter started; PEFT's init_lora_weights in an exported adapter_config
        self.scale = lora.scale
        self.dropout_rate = lora.dropout
        self.deterministic = False
        # DoRA's magnitude, PEFT's `lora_magnitude_vector`; kept next to the factors.
        self.lora_magnitude_vector = nnx.data(None)
        if lora.use_dora:
            self.lora_magnitude_vector = nnx.LoRAParam(self.dora_weight_norm().astype(param_dtype))  # [*stack, *out]
        # The active adapter's name (PEFT's "default"); other adapters loaded by name wait in frozen_adapters
        # (name -> {"lora_a", "lora_b"[, "lora_magnitude_vector"]: FrozenAdapter}, not trained; nn/adapters.py).
        self.adapter_name = "default"
        self.frozen_adapters = nnx.data({})
        if self.dropout_rate > 0:
            key = rngs["dropout"]()
            keys = jax.random.split(key, stack_shape) if stack_shape else key
            self.rngs = nnx.RngStream(keys, tag="dropout")
        else:
            self.rngs = nnx.data(None)

    @property
    def use_dora(self) -> bool:
        """Whether the layer is a DoRA layer (has a `lora_magnitude_vector`)."""
        return self.lora_magnitude_vector is not None

    def dora_weight_norm(self) -> jax.Array:
        """`‖W + s·A ⊗ B‖` per output feature, `[*stack, *out]` float32 (see `dora_norm`), from the current
        kernel and factors: the initial DoRA magnitude, and the divisor of the magnitude at every call.

        Stacked layers are computed one at a time (`lax.map`), so at most one layer's weight is dequantized.
        """
        a = self.lora_a[...]
        if isinstance(a, jax.core.Tracer):  # under a transformation (e.g. nnx.eval_shape): trace it in place
            return self._weight_norm(self.stack_shape)
        precision = tuple(self.precision) if isinstance(self.precision, list) else self.precision
        return _dora_norm_jit(self.kernel.get_value(), a, self.lora_b[...], scale=float(self.scale),
                              contract_axes=tuple(self.contract_axes), stack_shape=tuple(self.stack_shape),
                              precision=precision)

    def _weight_norm(self, stack_shape: tuple[int, ...] = ()) -> jax.Array:
        """`dora_norm` of the variables as they are here: stacked (`stack_shape`), or one layer's slice inside
        `nnx.scan` (where `self.stack_shape` still names the stack)."""
        return dora_norm(self.kernel.get_value(), self.lora_a[...], self.lora_b[...], self.scale, self.contract_axes,
                         stack_shape=stack_shape, precision=self.precision)

    def dora_scale(self) -> jax.Array:
        """`m / ‖W + s·A ⊗ B‖`, `[*out]` float32, for one layer (called where the layer computes)."""
        return self.lora_magnitude_vector[...].astype(jnp.float32) / self._weight_norm()

    def _dora(self, x: jax.Array, deterministic: bool | None, product, delta, broadcast=None) -> jax.Array:
        """DoRA's output without the bias (see the module docstring).

        `x` is in the compute dtype; `product(h)` is `h @ W` (the frozen kernel, no bias), `delta(h)` the
        adapter's `s·B(A(h))`, `broadcast(c, ndim)` reshapes `c [*out]` to broadcast against an output of rank
        `ndim` (default: `out` trailing).
        """
        base = product(x)
        c = self.dora_scale().astype(x.dtype)
        c = (broadcast or _trailing)(c, base.ndim)
        off = self.deterministic if deterministic is None else deterministic
        if self.dropout_rate > 0 and not off:
            h = self._adapter_input(x, deterministic)  # one dropout mask for both uses, as PEFT's x = dropout(x)
            return base + (c - 1) * product(h) + c * delta(h)
        return c * (base + delta(x))

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


# The initial magnitude of a concrete layer: one compilation per kernel shape (the layers of a model share a few).
_dora_norm_jit = jax.jit(dora_norm, static_argnames=("scale", "contract_axes", "stack_shape", "precision"))


def _trailing(c: jax.Array, ndim: int) -> jax.Array:
    """`c` with leading unit axes up to rank `ndim`."""
    return c.reshape((1,) * (ndim - c.ndim) + c.shape)

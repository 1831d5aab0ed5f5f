"""Variable types of the frozen base weights.

Trainability is decided by type (DESIGN.md, invariant 4): adapters are
`nnx.LoRAParam`, and the base weights live in `FrozenWeight` (a float kernel,
the plain-LoRA baseline) or its subclass `QuantizedWeight` (a packed
`QuantizedArray`). Neither is an `nnx.Param`, so `nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)`, `wrt=nnx.Param` and `nnx.grad(..., wrt=...)` never see
them, and no optimizer state is ever created for them.
"""

from __future__ import annotations

from typing import TypeVar

from flax import nnx

__all__ = ["FrozenAdapter", "FrozenWeight", "QuantizedWeight"]

A = TypeVar("A")


class FrozenWeight(nnx.Variable[A]):
    """A frozen base-model kernel: a variable that is not an `nnx.Param`.

    Holds a float kernel `[*stack, in, out]` (`[*stack, *kernel_shape]` for
    `LinearGeneral` / `Einsum` kernels; plain LoRA, `quant=None`);
    `QuantizedWeight` is the packed subclass. Filter on `FrozenWeight` to get
    every base weight of a model, quantized or not.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.nnx import FrozenWeight
        >>> w = FrozenWeight(jnp.ones((4, 2)))
        >>> isinstance(w, nnx.Param), w.shape
        (False, (4, 2))
    """


class QuantizedWeight(FrozenWeight[A]):
    """A frozen kernel stored as a `QuantizedArray` (packed codes and scales).

    The value is the whole `QuantizedArray` pytree (`get_value()` returns it);
    its leaves (`codes`, `absmax`, `nested_absmax`, `nested_offset`) are what
    `nnx.state`, `nnx.split`, `jax.device_put` and checkpoints see. Leaves may
    carry leading stack dimensions for layers stacked by `nnx.vmap`/`nnx.scan`.

    Example:
        >>> import jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.nnx import QuantizedWeight
        >>> w = QuantizedWeight(qj.quantize(jnp.ones((64, 8)), "nf4"))
        >>> w.get_value().shape, w.get_value().nbytes
        ((64, 8), 288)
    """


class FrozenAdapter(nnx.Variable[A]):
    """A loaded adapter that is not the active one: a factor (or DoRA magnitude) stored frozen in its layer.

    A layer holds its active adapter in `lora_a` / `lora_b` (`nnx.LoRAParam`,
    trained); the other adapters loaded by name (`load_peft_adapter(...,
    adapter_name=...)`) wait in `frozen_adapters[name]["lora_a" | "lora_b" |
    "lora_magnitude_vector"]` as `FrozenAdapter`, which is not an
    `nnx.LoRAParam`, so `wrt=nnx.LoRAParam` never trains them. `set_adapter`
    swaps the values.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.nnx import FrozenAdapter
        >>> isinstance(FrozenAdapter(jnp.zeros((4, 2))), nnx.LoRAParam)
        False
    """

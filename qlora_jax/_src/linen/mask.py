"""`lora_mask` and `masked`: train the adapters of a params pytree and nothing else.

In Linen the adapters are the `"params"` leaves named `lora_a` / `lora_b`
and DoRA's `lora_magnitude_vector` (`QLoRADense`, `convert_params`); in an NNX state they are the
`nnx.LoRAParam` variables. `optax.masked` alone is not enough to freeze the
rest: it passes the updates of masked-out leaves through unchanged (the raw
gradient would be applied). `masked` therefore partitions the tree
(`optax.partition`): the adapters get `tx`, every other leaf
`optax.set_to_zero()`, which has no state. The inner `optax.masked` replaces
the non-adapter leaves by `optax.MaskedNode()`, an empty pytree, so `tx`
allocates state (e.g. adamw's two moments) for the adapters only.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from qlora_jax._src.linen.layers import ADAPTER_NAMES

__all__ = ["lora_mask", "masked"]


def lora_mask(params: Any) -> Any:
    """A boolean pytree: True at the adapter leaves of `params`, False elsewhere.

    Adapters are leaves whose last key is "lora_a", "lora_b" or "lora_magnitude_vector" (dict keys,
    attribute or index names), and `nnx.LoRAParam` variables in an NNX state
    (where the mask holds one bool per variable). Biases, norms, embeddings,
    heads and any frozen kernel are False.

    Args:
        params: Any pytree, e.g. a Linen `"params"` collection or an `nnx.State`.

    Returns:
        A pytree of the same structure (a prefix of it for NNX variables) with
        bool leaves, for `optax.masked` or `masked`.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.linen import lora_mask
        >>> params = {"fc": {"bias": jnp.zeros(4), "lora_a": jnp.zeros((8, 2)), "lora_b": jnp.zeros((2, 4))}}
        >>> lora_mask(params)
        {'fc': {'bias': False, 'lora_a': True, 'lora_b': True}}
    """

    def is_adapter(path: tuple, leaf: Any) -> bool:
        if isinstance(leaf, nnx.Variable):
            return isinstance(leaf, nnx.LoRAParam)
        return bool(path) and _key_name(path[-1]) in ADAPTER_NAMES

    return jax.tree_util.tree_map_with_path(is_adapter, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def masked(tx: optax.GradientTransformation, params: Any = None) -> optax.GradientTransformation:
    """`tx` for the adapters of a params pytree; every other leaf gets a zero update and no state.

    Args:
        tx: The optimizer for the adapters, e.g. `optax.adamw(2e-4)`.
        params: The params pytree (or one of the same structure) to take the
            mask from; default: taken from the tree given to `init` / `update`.

    Returns:
        An `optax.GradientTransformation` (`optax.partition` of `tx` on the
        adapters and `optax.set_to_zero()` elsewhere). Its state holds `tx`'s
        state for the adapters only (adamw: two moments per adapter element
        and a count); frozen leaves are empty `optax.MaskedNode`s.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from qlora_jax.linen import masked
        >>> params = {"fc": {"bias": jnp.zeros(4), "lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 4))}}
        >>> tx = masked(optax.sgd(0.5), params)
        >>> state = tx.init(params)
        >>> sum(leaf.size for leaf in jax.tree.leaves(state))  # nothing for the bias
        0
        >>> grads = jax.tree.map(jnp.ones_like, params)
        >>> updates, state = tx.update(grads, state, params)
        >>> jax.tree.map(lambda u: float(u.ravel()[0]), updates)
        {'fc': {'bias': 0.0, 'lora_a': -0.5, 'lora_b': -0.5}}
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"tx: expected an optax.GradientTransformation, got {type(tx).__name__}")

    def labels(tree: Any) -> Any:
        return jax.tree.map(lambda m: "lora" if m else "frozen", lora_mask(tree))

    return optax.partition({"lora": tx, "frozen": optax.set_to_zero()},
                           labels if params is None else labels(params))


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key

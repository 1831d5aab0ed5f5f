"""LoRA as pure functions: the adapter's output, its scaling and its init.

Low-rank adaptation (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
Language Models") adds `s · B(A(x))` to a frozen layer. The conventions are
PEFT's (huggingface/peft `tuners/lora/layer.py`): `s = alpha / r`, or
`alpha / √r` with rank-stabilized scaling (Kalajdzievski, 2023, "rsLoRA");
A starts as kaiming-uniform with a = √5, which is U(-1/√in, 1/√in), or as
N(0, (1/r)²) for "gaussian"; B starts at zero, so a fresh adapter changes
nothing. In Flax layout A is `[in, r]` and B is `[r, out]`, the transposes of
PEFT's `lora_A.weight` and `lora_B.weight`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["INITS", "lora_delta", "lora_scale", "init_lora"]

# Adapter initializations: PEFT's `init_lora_weights=True` and "gaussian".
INITS: tuple[str, ...] = ("default", "gaussian")


def lora_delta(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    *,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """The adapter's contribution `(x @ a @ b) * scale`, computed in `x.dtype`.

    Dropout, when used, is applied to `x` by the caller (PEFT applies it to the
    adapter input only). The adapter factors are cast to `x.dtype`, so float32
    adapters train under a bfloat16 compute dtype as in the QLoRA paper.

    Args:
        x: Activations `[..., in]`.
        a: Down projection `[in, r]`.
        b: Up projection `[r, out]`.
        scale: The LoRA scaling `s` (see `lora_scale`).
        precision: Passed to both dots.

    Returns:
        `[..., out]` in `x.dtype`.

    Raises:
        ValueError: Shapes that do not chain (`x[..., in]`, `a[in, r]`, `b[r, out]`).

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.nnx import lora_delta
        >>> lora_delta(jnp.ones((2, 4)), jnp.ones((4, 3)), jnp.ones((3, 5)), 0.5)[0]
        Array([6., 6., 6., 6., 6.], dtype=float32)
    """
    if a.ndim != 2 or b.ndim != 2 or x.ndim < 1 or x.shape[-1] != a.shape[0] or a.shape[1] != b.shape[0]:
        raise ValueError(f"lora_delta: shapes do not chain: x {tuple(x.shape)} @ a {tuple(a.shape)} @ b "
                         f"{tuple(b.shape)}; expected x[..., in], a[in, r], b[r, out] (slice stacked layers first)")
    h = _dot(x, a.astype(x.dtype), precision)  # [..., r]
    return _dot(h, b.astype(x.dtype), precision) * scale  # [..., out]


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's scaling: `alpha / rank`, or `alpha / √rank` with rsLoRA.

    Args:
        rank: The adapter rank `r`.
        alpha: `lora_alpha`.
        rslora: Rank-stabilized scaling.

    Returns:
        The scale as a Python float (weakly typed in JAX arithmetic).

    Example:
        >>> from qlora_jax.nnx import lora_scale
        >>> lora_scale(16, 32), lora_scale(16, 32, rslora=True)
        (2.0, 8.0)
    """
    return float(alpha) / (math.sqrt(rank) if rslora else float(rank))


def init_lora(
    key: jax.Array,
    in_features: int,
    out_features: int,
    rank: int,
    *,
    init: str = "default",
    stack_shape: tuple[int, ...] = (),
    dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Initial adapter factors, as PEFT's `reset_lora_parameters`.

    "default": A ~ U(-1/√in, 1/√in) (PyTorch's `kaiming_uniform_(a=√5)` on the
    `(r, in)` weight: gain √(2 / 6), bound gain · √(3 / in) = 1/√in).
    "gaussian": A ~ N(0, (1/r)²). B is zero in both, so `lora_delta` is zero.

    Args:
        key: PRNG key.
        in_features: Input size `in`.
        out_features: Output size `out`.
        rank: Adapter rank `r`.
        init: "default" or "gaussian".
        stack_shape: Leading dimensions for stacked layers (each layer is drawn
            independently).
        dtype: Dtype of the factors.

    Returns:
        `(a [*stack, in, r], b [*stack, r, out])`.

    Raises:
        ValueError: Unknown `init`.

    Example:
        >>> import jax
        >>> from qlora_jax.nnx import init_lora
        >>> a, b = init_lora(jax.random.key(0), 64, 32, 4)
        >>> a.shape, b.shape, bool(abs(a).max() <= 1 / 8), bool((b == 0).all())
        ((64, 4), (4, 32), True, True)
    """
    stack_shape = tuple(int(d) for d in stack_shape)
    a_shape = (*stack_shape, in_features, rank)
    if init == "default":
        bound = 1.0 / math.sqrt(in_features)
        a = jax.random.uniform(key, a_shape, jnp.float32, minval=-bound, maxval=bound)
    elif init == "gaussian":
        a = jax.random.normal(key, a_shape, jnp.float32) * np.float32(1.0 / rank)
    else:
        raise ValueError(f"init: unknown LoRA init {init!r}; expected one of {INITS}")
    return a.astype(dtype), jnp.zeros((*stack_shape, rank, out_features), dtype)


def _dot(x: jax.Array, w: jax.Array, precision: lax.PrecisionLike) -> jax.Array:
    """`x[..., k] @ w[k, n]`."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)

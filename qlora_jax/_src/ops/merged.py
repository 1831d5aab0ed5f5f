"""A frozen kernel and its LoRA adapter as one product: `x @ (W + s · A @ B)`.

Without dropout on the adapter input, `x @ W + s · (x @ A) @ B` equals
`x @ (W + s · A @ B)`. On the "xla" path the weight is materialized anyway
(dequantized in the compute dtype), so adding the adapter's rank-r update to it
costs one elementwise pass over the weight (and `in · out · r` multiply-adds
for `A @ B`), and a training step saves, per layer: the `[tokens, out]`
product `(x A) B` and its sum with `x W` in the forward pass, and the
`[tokens, in]` product `(g Bᵀ) Aᵀ` and its sum with `g Wᵀ` in the backward
pass. Thin products of rank r use a matmul unit poorly (on CPU especially),
so the merged product shortens a step where the step has more activations
than weights (see `can_merge`), not when decoding a token at a time; the
measured effect is in `benchmarks/README.md`.

Only for float32: in bfloat16 or float16 the adapter's update, orders of
magnitude smaller than the weight, would be rounded away in the sum.

DoRA uses the same product: its output is `c · x @ (W + s · A @ B)` with
`c = m / ‖W + s · A @ B‖` per output, so a DoRA `QLoRALinear` scales this
product's result by `c` (the norm without a gradient), and the cotangent
reaching it is `c · g`.

The VJP keeps `x`, the packed (or float) kernel and the factors, never the
merged weight: the backward pass forms it again, tied to the cotangent so
that XLA can neither reuse the forward pass's copy nor hoist it, and computes
the factor gradients from `x`, `g` and the rank-r products `x A` and `g Bᵀ`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qlora_jax._src.formats.blockwise import dequantize_permuted, dequantize_stored
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.ops.qmatmul import depend_on, dependent_zero, permutes_columns, qmatmul_path, zero_cotangent

__all__ = ["lora_matmul", "can_merge"]


def can_merge(x: jax.Array, kernel: QuantizedArray | jax.Array) -> bool:
    """Whether `lora_matmul` computes `x @ kernel` plus an adapter for these operands.

    float32 activations, a 2-D kernel `[in, out]` without stack dimensions,
    for a packed kernel the "xla" path of `qmatmul` (a Pallas kernel never
    materializes the weight, so there the adapter stays separate), and enough
    tokens: the activations `x` and `y` together hold at least as many
    elements as the weight (`tokens · (in + out) ≥ in · out`). Below that
    (decoding, small batches of a large model) forming `A @ B` and adding it
    to the weight moves more memory than the two thin products it saves.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax._src.ops.merged import can_merge
        >>> x, kernel = jnp.ones((64, 64)), jnp.ones((64, 8))
        >>> can_merge(x, kernel), can_merge(x.astype(jnp.bfloat16), kernel), can_merge(x[:1], kernel)
        (True, False, False)
    """
    if np.dtype(x.dtype) != np.float32 or x.ndim < 1 or len(kernel.shape) != 2:
        return False
    n_in, n_out = kernel.shape
    if x.size // max(x.shape[-1], 1) * (n_in + n_out) < n_in * n_out:
        return False
    if x.shape[-1] != n_in:
        return False
    if isinstance(kernel, QuantizedArray):
        return kernel.contract_axes == (0,) and not kernel.stack_shape and qmatmul_path(x, kernel) == "xla"
    return True


def lora_matmul(
    x: jax.Array,
    kernel: QuantizedArray | jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    *,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """`x @ kernel + scale · (x @ a) @ b` as one product with `kernel + scale · a @ b`.

    Differentiable in `x`, `a` and `b`; the kernel is frozen (zero cotangent).
    Use only where `can_merge(x, kernel)` holds and the adapter input is `x`
    itself (no dropout).

    Args:
        x: float32 activations `[..., in]`.
        kernel: A packed 2-D `QuantizedArray` `[in, out]` or a float kernel `[in, out]`.
        a: Down projection `[in, r]`.
        b: Up projection `[r, out]`.
        scale: The LoRA scaling `s`.
        precision: Passed to the dots.

    Returns:
        `[..., out]` float32.

    Raises:
        ValueError: Operands `can_merge` rejects, or factor shapes that do not chain.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax._src.ops.merged import lora_matmul
        >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (128, 64)), "nf4")
        >>> x, a, b = jnp.ones((64, 128)), jnp.full((128, 4), 0.01), jnp.full((4, 64), 0.01)
        >>> y = lora_matmul(x, q, a, b, 2.0)
        >>> bool(jnp.allclose(y, qj.qmatmul(x, q) + 2.0 * (x @ a) @ b, atol=1e-4))
        True
    """
    if not can_merge(x, kernel):
        raise ValueError(f"lora_matmul: cannot merge x {tuple(x.shape)} {np.dtype(x.dtype)} with kernel "
                         f"{tuple(kernel.shape)}; expected float32 x [..., in], a 2-D kernel [in, out] and for a "
                         "packed kernel the 'xla' path")
    n_in, n_out = kernel.shape
    if a.shape != (n_in, a.shape[-1]) or b.shape != (a.shape[-1], n_out):
        raise ValueError(f"lora_matmul: factors a {tuple(a.shape)}, b {tuple(b.shape)} do not fit the kernel "
                         f"[{n_in}, {n_out}]; expected a [in, r], b [r, out]")
    if isinstance(precision, list):
        precision = tuple(precision)
    permuted = isinstance(kernel, QuantizedArray) and permutes_columns(kernel)
    return _merged(x, kernel, a.astype(x.dtype), b.astype(x.dtype), (float(scale), precision, permuted))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _merged(x, kernel, a, b, cfg):
    return _merged_fwd(x, kernel, a, b, cfg)[0]


def _merged_fwd(x, kernel, a, b, cfg):
    _, precision, permuted = cfg
    w = _weight(kernel, a, b, cfg, tie=x)
    if isinstance(kernel, QuantizedArray):  # w: [out, in], input columns permuted when `permuted`
        xw = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1) if permuted else x
        y = lax.dot_general(xw, w, (((x.ndim - 1,), (1,)), ((), ())), precision=precision)
    else:  # w: [in, out]
        y = lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    return y, (x, kernel, a, b)


def _merged_bwd(cfg, res, g):
    scale, precision, permuted = cfg
    x, kernel, a, b = res
    w = _weight(kernel, a, b, cfg, tie=g)
    if isinstance(kernel, QuantizedArray):
        grad_x = lax.dot_general(g, w, (((g.ndim - 1,), (0,)), ((), ())), precision=precision)  # [..., in]
        if permuted:  # interleave the even and odd columns back
            half = grad_x.shape[-1] // 2
            grad_x = jnp.stack([grad_x[..., :half], grad_x[..., half:]], axis=-1).reshape(x.shape)
        grad_kernel = jax.tree.map(zero_cotangent, kernel)
    else:
        grad_x = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
        grad_kernel = jnp.zeros_like(kernel)
    # The factor gradients, each large operand contracted over its token axis in place.
    tokens = (((0,), (0,)), ((), ()))
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    grad_h = lax.dot_general(g2, b, (((1,), (1,)), ((), ())), precision=precision) * scale  # [tokens, r]
    h = lax.dot_general(x2, a, (((1,), (0,)), ((), ())), precision=precision) * scale  # [tokens, r]
    grad_a = lax.dot_general(x2, grad_h, tokens, precision=precision)  # [in, r]
    grad_b = lax.dot_general(h, g2, tokens, precision=precision)  # [r, out]
    return grad_x, grad_kernel, grad_a, grad_b


_merged.defvjp(_merged_fwd, _merged_bwd)


def _weight(kernel, a, b, cfg, *, tie):
    """The merged float32 weight: `[out, in]` for a packed kernel (columns permuted as `qmatmul`'s on CPU),
    `[in, out]` for a float kernel. Data-dependent on `tie` (see `qmatmul`'s `dependent_zero`)."""
    scale, precision, permuted = cfg
    zero = dependent_zero(tie)
    a = a + zero.astype(a.dtype)  # ties the adapter's update, and so the sum, to `tie`
    if not isinstance(kernel, QuantizedArray):
        update = lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision)  # [in, out]
        return kernel.astype(jnp.float32) + update * np.float32(scale)
    q = depend_on(kernel, tie)
    if permuted:
        base = dequantize_permuted(q, np.dtype(np.float32))  # [out, in], even input columns first
        a = jnp.concatenate([a[0::2], a[1::2]], axis=0)
    else:
        base = dequantize_stored(q, np.dtype(np.float32))  # [out, in]: a 2-D kernel contracted over axis 0
    update = lax.dot_general(b, a, (((0,), (1,)), ((), ())), precision=precision)  # [out, in]
    return base + update * np.float32(scale)

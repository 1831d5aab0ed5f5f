"""`qmatmul`: `x @ kernel` for a quantized kernel, dequantized inside the op.

The memory promise of QLoRA depends on the backward pass: plain autodiff of
`x @ dequantize(q)` saves the dequantized full-precision weight of every layer
for the backward pass. The "xla" path is a `jax.custom_vjp` whose residuals are
the packed codes and scales only; the backward pass dequantizes again and
computes the gradient for `x` (the frozen weight gets a zero cotangent), as
bitsandbytes' `MatMul4Bit` does.

Paths:
  * "reference": dequantize to float32, then a float32 dot — the spec.
  * "xla": dequantize in the compute dtype inside the jitted computation and
    let XLA fuse it into the dot; custom VJP as above.
  * "auto": currently "xla" (fused Pallas kernels are not part of this release).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qlora_jax._src.formats.blockwise import dequantize
from qlora_jax._src.formats.qarray import QuantizedArray

__all__ = ["qmatmul", "PATHS"]

PATHS = ("auto", "reference", "xla")


def qmatmul(
    x: jax.Array,
    q: QuantizedArray,
    *,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    path: str = "auto",
) -> jax.Array:
    """Computes `x[..., in] @ kernel[in, out]` for a quantized 2-D kernel.

    Args:
        x: Activations `[..., in]`, float32, bfloat16 or float16; the compute dtype.
        q: A `QuantizedArray` of a 2-D kernel `[in, out]` (contract_axes (0,)),
            without stack dimensions (slice stacked layers first, e.g. in `scan`).
        precision: Passed to `lax.dot_general` ("xla" path).
        preferred_element_type: Output dtype of the dot; default `x.dtype`.
        path: "auto", "xla" or "reference" (see the module docstring).

    Returns:
        `[..., out]` in `preferred_element_type` (default `x.dtype`).

    Raises:
        ValueError: A kernel that is not 2-D with input axis 0, stacked leaves,
            an input size that does not match, or an unknown `path`.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (128, 64)), "nf4")
        >>> qj.qmatmul(jnp.ones((2, 3, 128)), q).shape
        (2, 3, 64)
    """
    if path not in PATHS:
        raise ValueError(f"path: unknown path {path!r}; expected one of {PATHS}")
    if len(q.shape) != 2 or q.contract_axes != (0,):
        raise ValueError(f"q: qmatmul takes a 2-D kernel [in, out] with contract_axes (0,); got shape {q.shape} "
                         f"and contract_axes {q.contract_axes}")
    if q.stack_shape:
        raise ValueError(f"q: has stack dimensions {q.stack_shape}; slice one layer first (e.g. inside scan)")
    if x.ndim < 1 or x.shape[-1] != q.shape[0]:
        raise ValueError(f"x: last axis {x.shape[-1:]} does not match the kernel's input size {q.shape[0]}")
    out_dtype = np.dtype(x.dtype if preferred_element_type is None else preferred_element_type)
    if path == "reference":
        w = dequantize(q, jnp.float32)
        y = jnp.matmul(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
        return y.astype(out_dtype)
    return _qmatmul_xla(x, q, precision, np.dtype(x.dtype), out_dtype)


def _dot(x: jax.Array, w: jax.Array, precision, out_dtype) -> jax.Array:
    """`x[..., in] @ w[in, out]`."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=out_dtype)


def _dequantized_dot(x, q, precision, compute_dtype, out_dtype):
    # The barrier ties the dequantization to x, so that XLA computes it when the
    # layer runs instead of hoisting every layer's weight to the start.
    return _dot(x, dequantize(_depend_on(q, x), compute_dtype), precision, out_dtype)


def _depend_on(q: QuantizedArray, a: jax.Array) -> QuantizedArray:
    """`q` with its codes made data-dependent on `a` (adds an integer zero the
    compiler cannot prove to be zero: 1 only if a's first element has the bits
    0x7FC00001), so the dequantization runs where `a` is used."""
    first = lax.bitcast_convert_type(a.reshape(-1)[:1].astype(jnp.float32), jnp.int32)
    zero = (first == np.int32(0x7FC00001)).astype(q.codes.dtype)
    return dataclasses.replace(q, codes=q.codes + zero.reshape((1,) * q.codes.ndim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qmatmul_xla(x, q, precision, compute_dtype, out_dtype):
    return _dequantized_dot(x, q, precision, compute_dtype, out_dtype)


def _qmatmul_xla_fwd(x, q, precision, compute_dtype, out_dtype):
    # The only residual is q itself (packed codes and scales), never a dequantized weight.
    return _dequantized_dot(x, q, precision, compute_dtype, out_dtype), q


def _qmatmul_xla_bwd(precision, compute_dtype, out_dtype, q, g):
    # Recompute [in, out]. Tying q to g with a barrier keeps XLA from merging this
    # dequantization with the forward one (CSE) or scheduling it before the
    # cotangent exists; either would keep the weight alive in between.
    w = dequantize(_depend_on(q, g), compute_dtype)
    grad_x = lax.dot_general(g.astype(compute_dtype), w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=compute_dtype)
    return grad_x, jax.tree.map(_zero_cotangent, q)


def _zero_cotangent(leaf: jax.Array) -> jax.Array:
    if jnp.issubdtype(leaf.dtype, jnp.floating):
        return jnp.zeros(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, jax.dtypes.float0)


_qmatmul_xla.defvjp(_qmatmul_xla_fwd, _qmatmul_xla_bwd)

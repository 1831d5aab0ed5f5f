"""Adapter initializations that read the base weight: PiSSA, OLoRA and LoftQ, as pure functions.

Each splits a base weight `W` into a low-rank part carried by the adapter and a
residual kept as the (frozen, possibly quantized) base, so that at
initialization `base + s·A@B` is `W` (PiSSA, OLoRA on a float base) or is
as close to `W` as the quantized base allows (LoftQ), with `s` the LoRA
scaling (`LoraConfig.scale`). The conventions are PEFT's
(`peft/tuners/lora/layer.py`, `peft/utils/loftq_utils.py`); in PyTorch layout
(`W` `[out, in]`, PEFT's `lora_A.weight` `[r, in]`, `lora_B.weight` `[out, r]`):

* **PiSSA** (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular
  Vectors Adaptation"): `W = U S Vh`; `lora_A = √(S_r / s) Vh_r`,
  `lora_B = U_r √(S_r / s)`, so `s·lora_B@lora_A` is the best rank-r
  approximation of `W` for any alpha; the residual `W − s·lora_B@lora_A`
  becomes the base. `"pissa_niter_N"` uses a randomized SVD with N subspace
  iterations (Halko et al., 2009; `torch.svd_lowrank(W, q=r, niter=N)`).
* **OLoRA** (Büyükakyüz, 2024, "OLoRA: Orthonormal Low-Rank Adaptation"):
  `W = Q R` (reduced QR); `lora_B = Q[:, :r]`, `lora_A = R[:r]`, base
  `W − s·lora_B@lora_A` (PEFT does not divide by the scaling here, so the
  low-rank part is `s·Q_r R_r`; the sum is `W` exactly either way).
* **LoftQ** (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization"):
  `loftq_iter` rounds of `Q = quant(W − s·lora_B@lora_A)` (A, B zero in the
  first round), then `lora_A, lora_B` = the rank-r SVD of `(W − dequant(Q)) / s`
  split as PiSSA's; the base is the last `Q`. Here `quant` is the model's own
  `QuantConfig` (bitsandbytes-exact NF4 by default, with its double
  quantization), so A and B correct exactly the stored base. PEFT's
  `loftq_init` ignores the scaling (it decomposes `W − dequant(Q)` itself, right
  only for alpha = r) and always quantizes without double quantization; here
  `s·B·A` is the low-rank part for any alpha.

On a quantized base, PiSSA and OLoRA quantize their residual once (as PEFT
quantizes the residual model). In Flax layout the kernel is `W.T` `[in, out]`
and A `[in, r]`, B `[r, out]` are the transposes of PEFT's factors. All
computation is float32 (as PEFT's), whatever the kernel's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qlora_jax._src.config import LoraConfig, QuantConfig, pissa_niter
from qlora_jax._src.formats.blockwise import dequantize, quantize, quantize_streaming
from qlora_jax._src.formats.qarray import QuantizedArray

__all__ = ["weight_init", "weight_init_kernel", "check_weight_init", "set_adapter", "svd_lowrank"]

_HI = lax.Precision.HIGHEST


def check_weight_init(lora: LoraConfig, quant: QuantConfig | None) -> None:
    """Raises ValueError where `lora.init` cannot be computed for this base.

    LoftQ is defined for a quantized base (`quant` given).

    Example:
        >>> from qlora_jax.nnx import LoraConfig
        >>> from qlora_jax._src.nn.weight_init import check_weight_init
        >>> check_weight_init(LoraConfig(init="loftq"), None)
        Traceback (most recent call last):
        ...
        ValueError: LoraConfig.init='loftq' needs a quantized base (a QuantConfig); got quant=None
    """
    if not lora.weight_init:
        return
    if lora.init == "loftq" and quant is None:
        raise ValueError("LoraConfig.init='loftq' needs a quantized base (a QuantConfig); got quant=None")


def weight_init(
    kernel: jax.Array | np.ndarray,
    *,
    lora: LoraConfig,
    quant: QuantConfig | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | QuantizedArray]:
    """Adapter factors and new base of one kernel `[in, out]` for `lora.init` (PiSSA, OLoRA, LoftQ).

    An einsum kernel is passed flattened, `[prod(in), prod(out)]` (see
    `weight_init_kernel`). `base + s·A@B` (`s = lora.scale`, the base
    dequantized) is `W` for PiSSA and OLoRA on a float base, and the
    quantized residual plus the low-rank correction otherwise.

    Note: PEFT's LoftQ ignores the LoRA scaling (its `s·B·A` is `W − dequant(Q)`
    only for alpha = r); here `s·B·A` is the rank-r part for any alpha.

    Args:
        kernel: Float base kernel `[in, out]` (any float dtype; computed in float32).
        lora: `init` ("pissa", "pissa_niter_N", "olora" or "loftq"), `rank`,
            the scaling (`alpha`, `rslora`) and `loftq_iter`.
        quant: Quantize the residual base with this config, or None to keep
            it float (not for "loftq").
        key: PRNG key of the randomized SVD ("pissa_niter_N" only).

    Returns:
        `(a [in, r], b [r, out], base)`: float32 factors and the residual base,
        a `QuantizedArray` `[in, out]` (contract axes `(0,)`, dtype the
        kernel's) with `quant`, else a float array in the kernel's dtype.

    Raises:
        ValueError: A kernel that is not 2-D float, a rank above
            `min(in, out)`, a missing key, an init that does not read the
            weight, or a combination `check_weight_init` refuses.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from qlora_jax.nnx import LoraConfig
        >>> from qlora_jax.nnx import weight_init
        >>> w = jax.random.normal(jax.random.key(0), (64, 32))
        >>> a, b, base = weight_init(w, lora=LoraConfig(rank=4, alpha=8, init="pissa"))
        >>> a.shape, b.shape, base.shape
        ((64, 4), (4, 32), (64, 32))
        >>> bool(jnp.allclose(base + 2.0 * a @ b, w, atol=1e-5))
        True
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"kernel: expected a float kernel [in, out], got shape {tuple(kernel.shape)}, dtype "
                         f"{kernel.dtype}")
    a, b, pre = _decompose(kernel.astype(jnp.float32), lora, quant, key,
                           lambda r: _quantize_2d(r, quant))
    return a, b, _finish(pre, quant, (0,), np.dtype(kernel.dtype))


def weight_init_kernel(
    kernel: jax.Array | np.ndarray,
    *,
    contract_axes: Sequence[int],
    kernel_ndim: int,
    lora: LoraConfig,
    quant: QuantConfig | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | QuantizedArray]:
    """`weight_init` for any layer's kernel `[*stack, *kernel_shape]`, one stacked layer at a time.

    The kernel of one layer (its trailing `kernel_ndim` axes) is flattened to
    `[prod(in), prod(out)]` (the `contract_axes` in order, then the other axes
    in order, as the adapter factors see it) and initialized on its own; the
    layers' results are stacked. With `quant`, each layer's residual is
    quantized with the layer's `contract_axes` (exactly the blocks the
    flattened matrix had, so LoftQ's correction fits the stored base).

    Args:
        kernel: Float kernel `[*stack, *kernel_shape]`.
        contract_axes: Axes of one layer's kernel summed against the input.
        kernel_ndim: Rank of one layer's kernel; leading axes beyond it are stack dims.
        lora: The `LoraConfig` (see `weight_init`).
        quant: Quantize the residual base, or None.
        key: PRNG key ("pissa_niter_N"); layer `i` uses `fold_in(key, i)`.

    Returns:
        `(a [*stack, *in, r], b [*stack, r, *out], base)` with `base` a
        `QuantizedArray` with stack dims `stack` (or a float kernel of the
        input's shape and dtype).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig
        >>> from qlora_jax.nnx import weight_init_kernel
        >>> w = jax.random.normal(jax.random.key(0), (2, 64, 4, 8))  # two layers of [d=64, heads=4, head_dim=8]
        >>> a, b, base = weight_init_kernel(w, contract_axes=(0,), kernel_ndim=3, quant=QuantConfig(),
        ...                                 lora=LoraConfig(rank=4, init="loftq"))
        >>> a.shape, b.shape, base.shape, base.stack_shape
        ((2, 64, 4), (2, 4, 4, 8), (64, 4, 8), (2,))
    """
    kernel = jnp.asarray(kernel)
    n_stack = kernel.ndim - int(kernel_ndim)
    if n_stack < 0:
        raise ValueError(f"kernel: shape {tuple(kernel.shape)} has fewer than kernel_ndim={kernel_ndim} axes")
    stack, shape = tuple(kernel.shape[:n_stack]), tuple(kernel.shape[n_stack:])
    axes = tuple(int(a) for a in contract_axes)
    other = tuple(i for i in range(len(shape)) if i not in axes)
    in_shape, out_shape = tuple(shape[i] for i in axes), tuple(shape[i] for i in other)
    inverse = tuple(int(i) for i in np.argsort((*axes, *other)))
    dtype = np.dtype(kernel.dtype)
    flat = kernel.reshape(-1, *shape)  # [layers, *kernel_shape]
    results = []
    for i in range(flat.shape[0]):
        w2 = flat[i].astype(jnp.float32).transpose(*axes, *other).reshape(math.prod(in_shape), -1)  # [in, out]
        layer_key = None if key is None else jax.random.fold_in(key, i)
        a, b, pre = _decompose(w2, lora, quant, layer_key, lambda r: _quantize_2d(r, quant))
        pre = pre.reshape(*in_shape, *out_shape).transpose(inverse)  # back to the kernel's axis order
        results.append((a.reshape(*in_shape, -1), b.reshape(-1, *out_shape), _finish(pre, quant, axes, dtype)))
    if not stack:
        return results[0]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves).reshape(*stack, *leaves[0].shape), *results)


def _decompose(w: jax.Array, lora: LoraConfig, quant: QuantConfig | None, key: jax.Array | None,
               quantize_2d: Callable[[jax.Array], tuple[QuantizedArray, jax.Array]]
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(a [in, r], b [r, out], pre)` for a float32 kernel `w [in, out]`; `pre` is the residual to store
    (to quantize with `quant`)."""
    check_weight_init(lora, quant)
    rank, scale = lora.rank, lora.scale
    if rank > min(w.shape):
        raise ValueError(f"LoraConfig.rank: {rank} exceeds min(in, out) = {min(w.shape)} of a kernel "
                         f"{tuple(w.shape)}; init={lora.init!r} takes r singular (or QR) directions")
    wt = w.T  # PyTorch layout [out, in]: the factorizations are PEFT's, on the same matrix
    niter = pissa_niter(lora.init)
    if lora.init == "pissa" or niter is not None:
        if niter is None:
            u, s, vh = jnp.linalg.svd(wt, full_matrices=False)
        else:
            if key is None:
                raise ValueError(f"LoraConfig.init={lora.init!r}: a PRNG key is needed for the randomized SVD")
            u, s, v = svd_lowrank(wt, rank, niter, key)
            vh = v.T
        a, b = _split(u[:, :rank], s[:rank], vh[:rank], scale)
        return a, b, w - scale * _mm(a, b)
    if lora.init == "olora":
        q, r = jnp.linalg.qr(wt)  # reduced: q [out, k], r [k, in]
        a, b = r[:rank].T, q[:, :rank].T  # [in, r], [r, out]
        return a, b, w - scale * _mm(a, b)
    if lora.init == "loftq":
        pre = w
        for i in range(lora.loftq_iter):
            _, deq = quantize_2d(pre)
            u, s, vh = jnp.linalg.svd((w - deq).T, full_matrices=False)
            a, b = _split(u[:, :rank], s[:rank], vh[:rank], scale)
            if i + 1 < lora.loftq_iter:
                pre = w - scale * _mm(a, b)
        return a, b, pre
    raise ValueError(f"LoraConfig.init: {lora.init!r} does not read the base weight")


def _split(u: jax.Array, s: jax.Array, vh: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """PEFT's split of `U_r S_r Vh_r` (torch layout) into `lora_B = U_r √(S_r/s)`, `lora_A = √(S_r/s) Vh_r`,
    returned in Flax layout `a [in, r]`, `b [r, out]`."""
    root = jnp.sqrt(s / scale)  # [r]
    return (root[:, None] * vh).T, (u * root[None, :]).T


def svd_lowrank(m: jax.Array, q: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`torch.svd_lowrank(m, q, niter)` (Halko et al., 2009, algorithm 5.1) in JAX: `m ≈ U diag(S) Vᵀ`.

    A Gaussian test matrix `[n, q]` (drawn from `key`, not torch's generator),
    then `niter` subspace iterations, each re-orthonormalized by QR, and an
    exact SVD of the projected `[q, n]` matrix; a wide `m` is handled through
    its transpose, as torch does.

    Args:
        m: `[rows, cols]` float32.
        q: Rank of the approximation.
        niter: Subspace iterations.
        key: PRNG key.

    Returns:
        `(U [rows, q], S [q], V [cols, q])`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from qlora_jax._src.nn.weight_init import svd_lowrank
        >>> m = jax.random.normal(jax.random.key(0), (32, 4)) @ jax.random.normal(jax.random.key(1), (4, 16))
        >>> u, s, v = svd_lowrank(m, 4, 2, jax.random.key(2))
        >>> bool(jnp.allclose(u * s[None, :] @ v.T, m, atol=1e-4))
        True
    """
    rows, cols = m.shape
    x = m.T if rows < cols else m  # tall
    basis, _ = jnp.linalg.qr(_mm(x, jax.random.normal(key, (x.shape[1], q), jnp.float32)))
    for _ in range(niter):
        basis, _ = jnp.linalg.qr(_mm(x.T, basis))
        basis, _ = jnp.linalg.qr(_mm(x, basis))
    u, s, vh = jnp.linalg.svd(_mm(basis.T, x), full_matrices=False)
    u, v = _mm(basis, u), vh.T
    return (v, s, u) if rows < cols else (u, s, v)


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=_HI)


def _quantize_2d(r: jax.Array, quant: QuantConfig | None) -> tuple[QuantizedArray, jax.Array]:
    """`r [in, out]` quantized with the layer's config, and its dequantized float32 value."""
    q = _quantize(r, quant, (0,))
    return q, dequantize(q, jnp.float32)


def _quantize(x: jax.Array, quant: QuantConfig, axes: tuple[int, ...]) -> QuantizedArray:
    """`quantize` with the config; a kernel `[in, out]` by `quantize_streaming` (bit for bit the same), the programs
    the checkpoint loader and `apply_qlora` compile for plain quantization."""
    if x.ndim == 2 and axes == (0,):
        return quantize_streaming(x.T, quant.fmt, quant.block_size, quant.double_quant, as_kernel=True)
    return quantize(x, quant.fmt, quant.block_size, quant.double_quant, contract_axes=axes)


def _finish(pre: jax.Array, quant: QuantConfig | None, axes: tuple[int, ...],
            dtype: np.dtype) -> jax.Array | QuantizedArray:
    """The stored base: `pre` quantized (recording the kernel's dtype), or cast back to the kernel's dtype."""
    if quant is None:
        return pre.astype(dtype)
    return dataclasses.replace(_quantize(pre, quant, axes), dtype=dtype)


def set_adapter(layer: object, a: jax.Array | np.ndarray, b: jax.Array | np.ndarray) -> None:
    """Writes computed factors into a QLoRA layer's `lora_a` `[*stack, *in, r]` and `lora_b` `[*stack, r, *out]`
    (cast to the factors' dtype), after construction; shapes must match exactly. A DoRA layer's magnitude is
    then set to the norm of its new weight `‖base + s·A ⊗ B‖`, as PEFT's `dora_init` runs after the init."""
    for name, value in (("lora_a", a), ("lora_b", b)):
        var = getattr(layer, name)
        if tuple(np.shape(value)) != tuple(var.shape):
            raise ValueError(f"{name}: computed shape {tuple(np.shape(value))}, the layer's is {tuple(var.shape)}")
        var[...] = jnp.asarray(value, var.dtype)
    magnitude = getattr(layer, "lora_magnitude_vector", None)
    if magnitude is not None:
        magnitude[...] = layer.dora_weight_norm().astype(magnitude.dtype)

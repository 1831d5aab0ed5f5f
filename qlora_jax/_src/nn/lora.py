"""LoRA as pure functions: the adapter's output and its init (the scaling, `lora_scale`, is in `config`).

Low-rank adaptation (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
Language Models") adds `s · B(A(x))` to a frozen layer. The conventions are
PEFT's (huggingface/peft `tuners/lora/layer.py`): `s = alpha / r`, or
`alpha / √r` with rank-stabilized scaling (Kalajdzievski, 2023, "rsLoRA");
A starts as kaiming-uniform with a = √5, which is U(-1/√in, 1/√in), or as
N(0, (1/r)²) for "gaussian"; B starts at zero, so a fresh adapter changes
nothing. In Flax layout A is `[in, r]` and B is `[r, out]`, the transposes of
PEFT's `lora_A.weight` and `lora_B.weight`.

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") adds a
trained magnitude `m` per output feature: `W' = m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖`,
the norm taken per output over the input axes (PEFT's `get_weight_norm`, dim 1
of the torch weight `[out, in]`) and treated as a constant in the backward
pass (the paper's §4.3; PEFT detaches it). `dora_norm` computes that norm.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qlora_jax._src.config import INITS
from qlora_jax._src.formats import codebooks
from qlora_jax._src.formats.blockwise import dequantize, dequantize_absmax
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.nn.spec import einsum_kernel_axes, split_einsum
from qlora_jax._src.ops.qmatmul import qeinsum

__all__ = ["lora_delta", "lora_einsum", "init_lora", "dora_norm"]


def lora_delta(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    *,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """The adapter's contribution `(x @ a @ b) * scale`, computed in `x.dtype`.

    Computed as `((x @ a) * scale) @ b` (the scale applied on the rank axis),
    with a custom gradient for `x`, `a` and `b` that contracts the large
    operands over their token axis in place (see `_lora_delta_bwd`).

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
    if isinstance(precision, list):
        precision = tuple(precision)
    return _lora_delta(x, a.astype(x.dtype), b.astype(x.dtype), float(scale), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lora_delta(x, a, b, scale, precision):
    return _dot(_dot(x, a, precision) * scale, b, precision)  # the scale on the rank axis: [..., r]


def _lora_delta_fwd(x, a, b, scale, precision):
    h = _dot(x, a, precision) * scale  # [..., r]
    return _dot(h, b, precision), (x, a, b, h)


def _lora_delta_bwd(scale, precision, res, g):
    # The products autodiff would give, written so that each large operand
    # ([tokens, in] activations, [tokens, out] cotangent) is contracted over its
    # leading (token) axis in place. Left to autodiff, the gradient of B is
    # `dot(g, h)ᵀ`, for which XLA on CPU materializes a transposed copy of g,
    # fused with whatever produced g (e.g. SwiGLU's backward): on CPU that
    # strided copy cost more than all the matmuls of the layer.
    x, a, b, h = res
    tokens = (((0,), (0,)), ((), ()))
    x2, g2, h2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
    grad_b = lax.dot_general(h2, g2, tokens, precision=precision)  # [r, out]
    grad_h = lax.dot_general(g2, b, (((1,), (1,)), ((), ())), precision=precision) * scale  # [tokens, r]
    grad_a = lax.dot_general(x2, grad_h, tokens, precision=precision)  # [in, r]
    grad_x = lax.dot_general(grad_h, a, (((1,), (1,)), ((), ())), precision=precision)  # [tokens, in]
    return grad_x.reshape(x.shape), grad_a, grad_b


_lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def lora_einsum(
    subscripts: str,
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    *,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """The adapter's contribution to an einsum layer `einsum(subscripts, x, kernel)`, in `x.dtype`.

    The adapter's weight update `ΔW = A ⊗ B` (summed over the rank) has the
    kernel's shape but is never formed: with `in` the kernel's contracted axes
    and `out` its other axes, both in kernel order, A is `[*in, r]` and B is
    `[r, *out]`, and the result is `scale · einsum(subscripts, x, ΔW)`, computed
    as `x → [..., r]` (einsum with A) then `→ output` (einsum with B). For
    `"...i,io->...o"` this is `lora_delta`.

    Args:
        subscripts: The layer's einsum spec, e.g. `"...d,dnh->...nh"`.
        x: Activations, as for the layer (dropout, if any, already applied).
        a: Down projection `[*in, r]`.
        b: Up projection `[r, *out]`.
        scale: The LoRA scaling `s`.
        precision: Passed to both einsums.

    Returns:
        The einsum's output shape, in `x.dtype`.

    Raises:
        ValueError: A spec that is not a linear layer over the kernel, or
            factor shapes that do not fit `x` and the spec.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.nnx import lora_einsum
        >>> a, b = jnp.ones((8, 2)), jnp.ones((2, 3, 4))  # kernel [d=8, n=3, h=4], rank 2
        >>> y = lora_einsum("...d,dnh->...nh", jnp.ones((5, 8)), a, b, 0.5)
        >>> y.shape, float(y[0, 0, 0])  # 8 * 2 * 0.5
        ((5, 3, 4), 8.0)
    """
    xs, ks, out = split_einsum(subscripts)
    contract, other = einsum_kernel_axes(subscripts)
    rank = a.shape[-1] if a.ndim else -1
    if a.ndim != len(contract) + 1 or b.ndim != len(other) + 1 or b.shape[0] != rank:
        raise ValueError(f"lora_einsum: factors a {tuple(a.shape)}, b {tuple(b.shape)} do not fit the kernel "
                         f"{ks!r} of {subscripts!r}: expected a [*in, r] with in = axes "
                         f"{''.join(ks[i] for i in contract)!r}, b [r, *out] with out = axes "
                         f"{''.join(ks[i] for i in other)!r} (slice stacked layers first)")
    r = next(c for c in "rRzZyYqQ" + "abcdefghijklmnopstuvwx" if c not in subscripts)
    k_in = "".join(ks[i] for i in contract)
    k_out = "".join(ks[i] for i in other)
    hs = "".join(c for c in xs if c not in k_in) + r  # x's kept axes (and `...`), then the rank
    h = jnp.einsum(f"{xs},{k_in}{r}->{hs}", x, a.astype(x.dtype), precision=precision)  # [..., r]
    return jnp.einsum(f"{hs},{r}{k_out}->{out}", h, b.astype(x.dtype), precision=precision) * scale


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


def dora_norm(
    kernel: QuantizedArray | jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    contract_axes: tuple[int, ...],
    *,
    stack_shape: tuple[int, ...] = (),
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """DoRA's weight norm `‖W + s · A ⊗ B‖` per output feature, float32, without a gradient.

    `W` is the kernel (dequantized, for a packed one), `contract_axes` its
    input axes; the norm runs over them, one value per output position (the
    other axes, in kernel order), as PEFT's `get_weight_norm` does over dim 1
    of the torch weight `[out, in]`. Computed without forming `W + s·A ⊗ B`:
    per output column `o`, `‖W_o‖² + 2s · Σ_r B[r, o] (AᵀW)[r, o] + s² ·
    B_oᵀ (AᵀA) B_o`, where `AᵀW` is a product of the (packed) kernel with `Aᵀ`
    as the activations (`qeinsum`) and `‖W_o‖²` a reduction that XLA fuses
    with the dequantization. Nothing here is differentiated (PEFT detaches
    the norm), so no weight is kept for a backward pass.

    Args:
        kernel: A `QuantizedArray` (its `contract_axes` must be
            `contract_axes`) or a float array `[*stack, *kernel_shape]`.
        a: Down projection `[*stack, *in, r]` (`in`: the kernel's sizes on `contract_axes`).
        b: Up projection `[*stack, r, *out]` (`out`: the kernel's other sizes, in kernel order).
        scale: The LoRA scaling `s`.
        contract_axes: The kernel's input axes (of one layer's kernel), sorted.
        stack_shape: Leading stack dimensions of every operand; the layers are
            computed one at a time (`lax.map`), so at most one layer's weight
            is dequantized at once.
        precision: Passed to the products.

    Returns:
        `[*stack, *out]` float32.

    Raises:
        ValueError: Factors that do not fit the kernel.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from qlora_jax._src.nn.lora import dora_norm
        >>> w, a, b = jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3))
        >>> dora_norm(w, a, b, 0.5, (0,))  # each column of W + 0.5 A B is 4 twos
        Array([4., 4., 4.], dtype=float32)
    """
    stack = tuple(int(d) for d in stack_shape)
    if stack:
        flat = jax.tree.map(lambda leaf: leaf.reshape(-1, *leaf.shape[len(stack):]), (kernel, a, b))
        norms = lax.map(lambda layer: dora_norm(*layer, scale, contract_axes, precision=precision), flat)
        return norms.reshape(*stack, *norms.shape[1:])  # [*stack, *out]
    shape = tuple(kernel.shape)
    contract = tuple(int(i) for i in contract_axes)
    other = tuple(i for i in range(len(shape)) if i not in contract)
    in_shape, out_shape = tuple(shape[i] for i in contract), tuple(shape[i] for i in other)
    if isinstance(kernel, QuantizedArray) and (kernel.stack_shape or tuple(kernel.contract_axes) != contract):
        raise ValueError(f"dora_norm: expected one layer's kernel with contract_axes {contract}; got {kernel!r}")
    if tuple(a.shape[:-1]) != in_shape or tuple(b.shape[1:]) != out_shape or a.shape[-1:] != b.shape[:1]:
        raise ValueError(f"dora_norm: factors a {tuple(a.shape)}, b {tuple(b.shape)} do not fit the kernel {shape} "
                         f"with input axes {contract}: expected a [*{in_shape}, r], b [r, *{out_shape}]")
    letters = "abcdefghijklmnopqstuvw"[: len(shape)]
    k_in, k_out = "".join(letters[i] for i in contract), "".join(letters[i] for i in other)
    f32 = np.dtype(np.float32)
    a, b = lax.stop_gradient(a.astype(f32)), lax.stop_gradient(b.astype(f32))
    if isinstance(kernel, QuantizedArray):
        q = lax.stop_gradient(kernel)
        w2 = _column_norms_sq(q)  # [*out]
        atw = qeinsum(f"{k_in}r,{letters}->r{k_out}", a, q, precision=precision)  # [r, *out]
    else:
        w = lax.stop_gradient(kernel).astype(f32)
        w2 = jnp.sum(jnp.square(w), axis=contract)
        atw = jnp.einsum(f"{k_in}r,{letters}->r{k_out}", a, w, precision=precision)
    ata = jnp.einsum(f"{k_in}r,{k_in}z->rz", a, a, precision=precision)  # [r, r]
    ata_b = jnp.einsum(f"rz,z{k_out}->r{k_out}", ata, b, precision=precision)  # [r, *out]
    s = np.float32(scale)
    n2 = w2 + 2 * s * jnp.sum(b * atw, axis=0) + s * s * jnp.sum(b * ata_b, axis=0)  # [*out]
    return lax.stop_gradient(jnp.sqrt(jnp.maximum(n2, 0)))


def _column_norms_sq(q: QuantizedArray) -> jax.Array:
    """`‖W_o‖²` per output position of a packed kernel, `[*out]` float32.

    In row layout (each absmax block inside one output's row) from the codes
    and scales alone: `Σ_blocks absmax² · Σ_codes codebook[code]²`, no
    weight-sized array; otherwise from the dequantized kernel.
    """
    if q.bits != 4 or not q.row_layout:
        w = dequantize(q, np.dtype(np.float32))
        return jnp.sum(jnp.square(w), axis=tuple(q.contract_axes))
    table = jnp.square(jnp.asarray(codebooks.codebook(q.fmt), jnp.float32))  # [16]
    per_byte = table[(q.codes >> 4).astype(jnp.int32)] + table[(q.codes & 0xF).astype(jnp.int32)]  # [*out, in // 2]
    per_block = jnp.sum(per_byte.reshape(*per_byte.shape[:-1], -1, q.block_size // 2), axis=-1)  # [*out, in // bs]
    return jnp.sum(per_block * jnp.square(dequantize_absmax(q)), axis=-1)  # [*out]


def _dot(x: jax.Array, w: jax.Array, precision: lax.PrecisionLike) -> jax.Array:
    """`x[..., k] @ w[k, n]`."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)

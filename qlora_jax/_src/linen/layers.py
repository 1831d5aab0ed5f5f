"""Flax Linen layers over a frozen (quantized) kernel: `QLoRADense`, `QLoRADenseGeneral`.

Drop-in replacements for `nn.Dense` and `nn.DenseGeneral`. The base kernel is
not a parameter: it lives in the `"frozen"` collection (`FROZEN`), as a packed
`QuantizedArray` (multiplied by `qdot_general`, which keeps no dequantized
weight for the backward pass) or, with `quant=None`, as a float array. The
LoRA factors `lora_a [*in, r]` and `lora_b [r, *out]` (`[in, r]`, `[r, out]`
for `nn.Dense`; the layout of the NNX layers) are in `"params"`, next to the
bias, so `jax.grad` over `"params"` never touches the base weights and
`lora_mask` finds the adapters by name.

`dense_forward` is the pure computation shared by these layers and by
`qlora_interceptor`, which runs it in place of unmodified `nn.Dense` layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as linen_dtypes
from jax import lax

from qlora_jax._src.config import LoraConfig, QuantConfig
from qlora_jax._src.formats.blockwise import quantize
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.nn.lora import dora_norm, init_lora, lora_delta
from qlora_jax._src.ops.qmatmul import qdot_general

__all__ = ["FROZEN", "ADAPTER_NAMES", "QLoRADense", "QLoRADenseGeneral", "dense_forward", "compute_dtype",
           "normalize_axes"]

# The variable collection that holds the frozen base kernels (packed or float).
FROZEN = "frozen"
# Names of the adapter leaves in the "params" collection: the factors and DoRA's magnitude (PEFT's name).
ADAPTER_NAMES: tuple[str, ...] = ("lora_a", "lora_b", "lora_magnitude_vector")

_default_kernel_init = nn.initializers.lecun_normal()  # nn.Dense's default


def compute_dtype(quant: QuantConfig | None, layer_dtype: jnp.dtype | None) -> jnp.dtype | None:
    """The matmul dtype: `QuantConfig.compute_dtype` if set, else the layer's `dtype` (None: inferred)."""
    if quant is not None and quant.compute_dtype is not None:
        return quant.compute_dtype
    return layer_dtype


def dense_forward(
    x: jax.Array,
    kernel: QuantizedArray | jax.Array,
    bias: jax.Array | None,
    adapter: tuple[jax.Array, jax.Array] | None,
    *,
    axis: Sequence[int] = (-1,),
    dtype: jnp.dtype | None = None,
    precision: lax.PrecisionLike = None,
    scale: float = 1.0,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    magnitude: jax.Array | None = None,
    name: str = "dense",
) -> jax.Array:
    """`nn.DenseGeneral`'s output over a frozen kernel, plus `scale · B(A(dropout(x)))`.

    With a DoRA `magnitude` `m [*features]`, PEFT's DoRA instead (see
    `qlora_jax/_src/nn/adapter.py`): with `c = m / ‖W + s·A ⊗ B‖` per
    output (no gradient through the norm) and `x @ W` without the bias,
    `c · (x @ W + s·B(A(x))) + bias`, or with dropout `d`
    `x @ W + bias + (c - 1) · (d(x) @ W) + c · s·B(A(d(x)))`.

    The float-kernel path performs exactly `nn.Dense`'s / `nn.DenseGeneral`'s
    operations (dtype promotion, `lax.dot_general`, bias add), so a float
    kernel with a zero adapter gives bit-identical outputs. A `QuantizedArray`
    is multiplied by `qdot_general` in the compute dtype: `dtype`, else the
    promotion of the input, the kernel's original dtype and the bias.

    Args:
        x: Activations; `axis` are contracted with the kernel's leading axes.
        kernel: Frozen kernel `[*in, *features]`: a `QuantizedArray` with
            `contract_axes == (0, ..., len(axis) - 1)`, or a float array.
        bias: `[*features]`, or None.
        adapter: `(a [*in, r], b [r, *features])`, or None. They act on the
            flattened axes, as a Linear `[prod(in), prod(features)]`.
        axis: Input axes contracted (`nn.DenseGeneral`'s `axis`).
        dtype: Compute dtype, or None to infer it as Flax does.
        precision: `lax` precision of every dot.
        scale: The LoRA scaling `s`.
        dropout_rate: Dropout probability of the adapter input.
        dropout_rng: Key for the dropout mask; None means no dropout.
        magnitude: DoRA's `lora_magnitude_vector` `[*features]`, or None (plain LoRA).
        name: The layer's path, for error messages.

    Returns:
        `[*x's other axes, *features]` in the compute dtype.

    Raises:
        ValueError: Shapes that do not fit, or a `QuantizedArray` blocked along
            other axes than the contracted ones.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.linen import dense_forward
        >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (128, 16)), "nf4")
        >>> x = jnp.ones((2, 128))
        >>> y = dense_forward(x, q, None, (jnp.ones((128, 4)), jnp.zeros((4, 16))), scale=2.0)
        >>> bool((y == qj.qmatmul(x, q)).all())
        True
    """
    x = jnp.asarray(x)
    ndim = x.ndim
    axis = normalize_axes(axis, ndim, name)
    n_axis = len(axis)
    quantized = isinstance(kernel, QuantizedArray)
    k_shape = tuple(kernel.shape)
    in_shape, features = k_shape[:n_axis], k_shape[n_axis:]
    if tuple(x.shape[a] for a in axis) != in_shape or not features:
        raise ValueError(f"{name}: input shape {tuple(x.shape)} (axes {axis}) does not fit the kernel of shape "
                         f"{k_shape}")
    dims = ((axis, tuple(range(n_axis))), ((), ()))
    if quantized:
        if kernel.contract_axes != tuple(range(n_axis)):
            raise ValueError(f"{name}: the QuantizedArray kernel {k_shape} is blocked along contract_axes "
                             f"{kernel.contract_axes}, but the layer contracts its axes {tuple(range(n_axis))}")
        if dtype is None:
            dtype = linen_dtypes.canonicalize_dtype(x, bias, jnp.zeros((), kernel.dtype))
        x = x.astype(dtype)
        bias = None if bias is None else jnp.asarray(bias).astype(dtype)

        def product(v: jax.Array) -> jax.Array:
            return qdot_general(v, kernel, dims, precision=precision)  # [*x_free, *features]
    else:
        # Exactly nn.DenseGeneral's operations; stop_gradient: the kernel is frozen.
        x, k, bias = linen_dtypes.promote_dtype(x, lax.stop_gradient(kernel), bias, dtype=dtype)

        def product(v: jax.Array) -> jax.Array:
            return lax.dot_general(v, k, dims, precision=precision)  # [*x_free, *features]
    if bias is not None and tuple(bias.shape) != features:
        raise ValueError(f"{name}: bias shape {tuple(bias.shape)}, expected {features}")

    def add_bias(y: jax.Array) -> jax.Array:
        return y if bias is None else y + jnp.reshape(bias, (1,) * (ndim - n_axis) + features)

    if magnitude is not None and adapter is None:
        raise ValueError(f"{name}: a DoRA magnitude needs the adapter factors (adapter is None)")
    if magnitude is None:
        y = add_bias(product(x))
        if adapter is None:
            return y
    a, b = adapter
    n_in, n_out = math.prod(in_shape), math.prod(features)
    if tuple(a.shape[:-1]) != in_shape or tuple(b.shape[1:]) != features or a.shape[-1:] != b.shape[:1]:
        raise ValueError(f"{name}: adapter shapes lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)} do not fit the "
                         f"kernel {k_shape}; expected lora_a [{', '.join(map(str, in_shape))}, r] and lora_b "
                         f"[r, {', '.join(map(str, features))}]")
    rank = a.shape[-1]

    def delta(h: jax.Array) -> jax.Array:  # s·B(A(h)): [*free, *features]
        if axis != tuple(range(ndim - n_axis, ndim)):
            h = jnp.moveaxis(h, axis, tuple(range(ndim - n_axis, ndim)))
        free = h.shape[: ndim - n_axis]
        d = lora_delta(h.reshape(*free, n_in), a.reshape(n_in, rank), b.reshape(rank, n_out), scale,
                       precision=precision)  # [*free, out]
        return d.reshape(*free, *features)

    h = x.astype(y.dtype) if magnitude is None else x  # the adapter input, in the compute dtype
    dropped = dropout_rng is not None and dropout_rate > 0
    if dropped:
        keep = 1.0 - dropout_rate
        mask = jax.random.bernoulli(dropout_rng, keep, h.shape)
        h = lax.select(mask, h / keep, jnp.zeros_like(h))  # inverted dropout, as nn.Dropout and torch
    if magnitude is None:
        return y + delta(h)
    if tuple(magnitude.shape) != features:
        raise ValueError(f"{name}: lora_magnitude_vector shape {tuple(magnitude.shape)}, expected {features}")
    norm = dora_norm(kernel, a, b, scale, tuple(range(n_axis)), precision=precision)  # [*features], no gradient
    c = (magnitude.astype(jnp.float32) / norm).astype(x.dtype).reshape((1,) * (ndim - n_axis) + features)
    if dropped:
        return add_bias(product(x) + (c - 1) * product(h) + c * delta(h))
    return add_bias(c * (product(x) + delta(x)))


def normalize_axes(axis: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """`axis` as sorted non-negative axes of a rank-`ndim` input (as `nn.DenseGeneral`).

    Raises:
        ValueError: Repeated or out-of-range axes, naming the layer.
    """
    axes = tuple(int(a) for a in np.atleast_1d(axis))
    if not axes or any(not -ndim <= a < ndim for a in axes) or len({a % ndim for a in axes}) != len(axes):
        raise ValueError(f"{name}: axis {axes} is empty, repeated or out of range for an input of rank {ndim}")
    return tuple(sorted(a % ndim for a in axes))


class QLoRABase(nn.Module):
    """Shared variables and call of the two layers; subclasses define the kernel geometry."""

    def _layer_name(self) -> str:
        return "/".join(self.path) or type(self).__name__

    def _call(self, inputs: jax.Array, axis: tuple[int, ...], features: tuple[int, ...],
              kernel_init: Callable, bias_init: Callable, deterministic: bool | None) -> jax.Array:
        name = self._layer_name()
        n_axis = len(axis)
        in_shape = tuple(inputs.shape[a] for a in axis)
        shape = in_shape + features

        def init_kernel() -> QuantizedArray | jax.Array:
            kernel = kernel_init(self.make_rng("params"), shape, self.param_dtype)  # as nn.Dense's self.param
            if self.quant is None:
                return kernel
            return quantize(kernel, self.quant.fmt, self.quant.block_size, self.quant.double_quant,
                            contract_axes=tuple(range(n_axis)))

        kernel = self.variable(FROZEN, "kernel", init_kernel).value
        bias = self.param("bias", bias_init, features, self.param_dtype) if self.use_bias else None
        adapter, rng, magnitude = None, None, None
        if self.lora is not None:
            n_in, n_out, rank = math.prod(in_shape), math.prod(features), self.lora.rank
            a = self.param("lora_a", lambda key: init_lora(key, n_in, n_out, rank, init=self.lora.init,
                                                           dtype=self.param_dtype)[0].reshape(*in_shape, rank))
            b = self.param("lora_b", lambda key: jnp.zeros((rank, *features), self.param_dtype))  # [r, *features]
            adapter = (a, b)
            if self.lora.use_dora:  # DoRA: the magnitude starts as the weight's norm per output (PEFT)
                magnitude = self.param("lora_magnitude_vector", lambda key: dora_norm(
                    kernel, a, b, self.lora.scale, tuple(range(n_axis)), precision=self.precision
                ).astype(self.param_dtype))  # [*features]
            if self.lora.dropout > 0 and not nn.merge_param("deterministic", self.deterministic, deterministic):
                rng = self.make_rng("dropout")
        return dense_forward(inputs, kernel, bias, adapter, axis=axis, dtype=compute_dtype(self.quant, self.dtype),
                             precision=self.precision, scale=self.lora.scale if self.lora is not None else 1.0,
                             dropout_rate=self.lora.dropout if self.lora is not None else 0.0, dropout_rng=rng,
                             magnitude=magnitude, name=name)


class QLoRADense(QLoRABase):
    """`nn.Dense` with a frozen, usually 4-bit, kernel and a LoRA adapter.

    `y = x @ kernel + bias + s · B(A(dropout(x)))` over the last axis, with
    PEFT's semantics: `s = alpha / rank` (`alpha / √rank` with `rslora`),
    dropout on the adapter input only, A kaiming-uniform (U(-1/√in, 1/√in))
    or N(0, (1/rank)²) ("gaussian"), B zero. Same arguments as `nn.Dense`;
    initialised with the same key it draws the same kernel and bias as
    `nn.Dense`, then quantizes the kernel.

    Variables: `"frozen"/"kernel"` — a `QuantizedArray` of the `[in, out]`
    kernel (a float array with `quant=None`); `"params"/"bias"` `[out]`;
    `"params"/"lora_a"` `[in, r]` and `"params"/"lora_b"` `[r, out]` unless
    `lora=None`; with `lora.use_dora` (DoRA, as the NNX layers and PEFT) also
    `"params"/"lora_magnitude_vector"` `[out]`, initialised to the weight's
    norm per output (the dequantized kernel's). Dropout (rate `lora.dropout`) draws from the "dropout" rng
    stream unless deterministic.

    Attributes:
        features: Output size.
        use_bias: Whether to add a bias.
        dtype: Compute dtype (None: inferred as `nn.Dense`); `quant.compute_dtype` overrides it.
        param_dtype: Dtype of the initial kernel, the bias and the adapter.
        precision: `lax` precision of the dots.
        kernel_init: Initializer of the float kernel before quantization.
        bias_init: Initializer of the bias.
        quant: How the kernel is stored, or None for a float kernel (plain LoRA).
        lora: The adapter (`rank`, `alpha`, `dropout`, `rslora`, `init`;
            `targets` is ignored), or None for no adapter.
        deterministic: Turns the adapter dropout off. As for `nn.Dropout`, it
            is required (here or at call time, also for `init`) when
            `lora.dropout > 0`.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.linen import QLoRADense
        >>> layer = QLoRADense(64, lora=qj.LoraConfig(rank=8, alpha=16))
        >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 128)))
        >>> variables["frozen"]["kernel"]
        QuantizedArray(nf4, shape=(128, 64), block_size=64, double_quant, dtype=float32, contract_axes=(0,))
        >>> jax.tree.map(jnp.shape, variables["params"])
        {'bias': (64,), 'lora_a': (128, 8), 'lora_b': (8, 64)}
        >>> layer.apply(variables, jnp.ones((2, 128))).shape
        (2, 64)
    """

    features: int
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None
    kernel_init: nn.initializers.Initializer = _default_kernel_init
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    quant: QuantConfig | None = QuantConfig()
    lora: LoraConfig | None = LoraConfig()
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """`inputs [..., in]` → `[..., features]`.

        Args:
            inputs: Activations.
            deterministic: Turns the adapter dropout off (merged with the attribute, as `nn.Dropout`).

        Returns:
            The output in the compute dtype.
        """
        _check_configs(self.quant, self.lora, self._layer_name())
        return self._call(inputs, (jnp.ndim(inputs) - 1,), (int(self.features),), self.kernel_init, self.bias_init,
                          deterministic)


class QLoRADenseGeneral(QLoRABase):
    """`nn.DenseGeneral` with a frozen, usually 4-bit, kernel and a LoRA adapter.

    The kernel `[*in, *features]` (`in` = the input sizes along `axis`) is
    quantized with `contract_axes` = its input axes, so the blocks run along
    the flattened input, and multiplied by `qdot_general`. The adapter is
    `lora_a [*in, r]`, `lora_b [r, *features]` (as the NNX layers), acting
    as a Linear `[prod(in), prod(features)]` would (A's init uses fan-in
    `prod(in)`; PEFT's `lora_A.weight` is `lora_a` flattened and
    transposed). Otherwise as
    `QLoRADense`; initialised with the same key it draws the same kernel and
    bias as `nn.DenseGeneral`. `batch_dims` are not supported.

    Attributes:
        features: Output size(s).
        axis: Input axis or axes contracted with the kernel.
        batch_dims: Must be empty (kept for `nn.DenseGeneral`'s signature).
        use_bias: Whether to add a bias `[*features]`.
        dtype: Compute dtype (None: inferred as `nn.DenseGeneral`); `quant.compute_dtype` overrides it.
        param_dtype: Dtype of the initial kernel, the bias and the adapter.
        precision: `lax` precision of the dots.
        kernel_init: Initializer of the float kernel (called on the flattened
            `[in, out]` shape, as `nn.DenseGeneral`).
        bias_init: Initializer of the bias (on the flattened shape).
        quant: How the kernel is stored, or None for a float kernel.
        lora: The adapter, or None for no adapter.
        deterministic: Turns the adapter dropout off; required here or at call
            time when `lora.dropout > 0`.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.linen import QLoRADenseGeneral
        >>> layer = QLoRADenseGeneral((4, 16), lora=qj.LoraConfig(rank=8))  # e.g. a 4-head q projection
        >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3, 128)))
        >>> variables["frozen"]["kernel"].shape, variables["params"]["lora_b"].shape
        ((128, 4, 16), (8, 4, 16))
        >>> layer.apply(variables, jnp.ones((2, 3, 128))).shape
        (2, 3, 4, 16)
    """

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    batch_dims: Sequence[int] = ()
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None
    kernel_init: nn.initializers.Initializer = _default_kernel_init
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    quant: QuantConfig | None = QuantConfig()
    lora: LoraConfig | None = LoraConfig()
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """`inputs` → `[*inputs' other axes, *features]`.

        Args:
            inputs: Activations.
            deterministic: Turns the adapter dropout off (merged with the attribute, as `nn.Dropout`).

        Returns:
            The output in the compute dtype.
        """
        name = self._layer_name()
        _check_configs(self.quant, self.lora, name)
        if tuple(np.atleast_1d(self.batch_dims)):
            raise ValueError(f"{name}: batch_dims={self.batch_dims} is not supported by QLoRADenseGeneral")
        axis = normalize_axes(self.axis, jnp.ndim(inputs), name)
        features = tuple(int(f) for f in np.atleast_1d(self.features))

        def flat_init(init: Callable, n_lead: int) -> Callable:
            def wrapped(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
                flat = (math.prod(shape[:n_lead]), math.prod(shape[n_lead:])) if n_lead else (math.prod(shape),)
                return jnp.reshape(init(key, flat, dtype), shape)  # as nn.DenseGeneral's *_init_wrap
            return wrapped

        return self._call(inputs, axis, features, flat_init(self.kernel_init, len(axis)),
                          flat_init(self.bias_init, 0), deterministic)


def _check_configs(quant: object, lora: object, name: str) -> None:
    if quant is not None and not isinstance(quant, QuantConfig):
        raise TypeError(f"{name}: quant must be a QuantConfig or None, got {type(quant).__name__}")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise TypeError(f"{name}: lora must be a LoraConfig or None, got {type(lora).__name__}")

"""`QuantLinearGeneral`, `QLoRALinearGeneral`: `nnx.LinearGeneral` over a frozen (quantized) kernel.

`nnx.LinearGeneral(in_features, out_features, axis=...)` contracts the input
axes `axis` with the kernel `[*in_features, *out_features]` and returns
`[*other input axes, *out_features]`. Here the kernel is a `QuantizedArray`
quantized with `contract_axes = (0, ..., len(in_features) - 1)` (blocks run
along the flattened input axes), multiplied by `qdot_general`, or a float
kernel kept frozen. `batch_axis` is not supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from qlora_jax._src.config import LoraConfig
from qlora_jax._src.formats.blockwise import FLOAT_DTYPES
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.nn.adapter import AdapterMixin
from qlora_jax._src.nn.variables import FrozenWeight, QuantizedWeight
from qlora_jax._src.ops.qmatmul import qdot_general

__all__ = ["QuantLinearGeneral", "QLoRALinearGeneral"]


class QuantLinearGeneral(nnx.Module):
    """`nnx.LinearGeneral` (no `batch_axis`) with a frozen kernel `[*in, *out]`, usually packed 4-bit.

    `y = dot_general(x, kernel)` over the input axes `axis`, plus the bias, in
    the compute dtype (`dtype` if given, else the input's). For `x [b, s, d]`,
    `axis=-1` and a kernel `[d, heads, head_dim]`, `y` is `[b, s, heads, head_dim]`.

    Attributes:
        kernel: `QuantizedWeight` (a `QuantizedArray` of shape `(*in, *out)`
            with contract_axes `(0, ..., len(in) - 1)`) or `FrozenWeight` (a
            float kernel `[*stack, *in, *out]`).
        bias: `nnx.Param` `[*stack, *out]`, or None.
        in_features: `in`, a tuple.
        out_features: `out`, a tuple.
        axis: Input axes contracted with `in` (as given; negative values count from the end).
        stack_shape: Leading stack dimensions of every variable (`()` if none).
        dtype: Compute dtype, or None for the input's dtype.
        precision: `lax` precision of the dots.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.nnx import QuantLinearGeneral
        >>> kernel = jax.random.normal(jax.random.key(0), (64, 4, 16))  # [d, heads, head_dim]
        >>> layer = QuantLinearGeneral(qj.quantize(kernel, "nf4"), jnp.zeros((4, 16)))
        >>> layer(jnp.ones((2, 3, 64))).shape
        (2, 3, 4, 16)
    """

    def __init__(
        self,
        kernel: QuantizedArray | jax.Array,
        bias: jax.Array | None = None,
        *,
        axis: int | Sequence[int] = -1,
        out_features: int | Sequence[int] | None = None,
        dtype: jnp.dtype | None = None,
        precision: lax.PrecisionLike = None,
    ):
        """Wraps an existing kernel.

        Args:
            kernel: A `QuantizedArray` of a kernel `(*in, *out)` with
                contract_axes `(0, ..., len(axis) - 1)` (leaves may carry stack
                dimensions), or a float array `[*stack, *in, *out]` kept frozen.
            bias: Float `[*stack, *out]`, or None.
            axis: The input axes contracted with the kernel's `in` axes, in order.
            out_features: The kernel's output shape. Optional: a `QuantizedArray`
                knows it; for a float kernel the default is `kernel.shape[len(axis):]`
                (no stack dimensions), so give it for a stacked float kernel.
            dtype: Compute dtype (float32, bfloat16 or float16), or None.
            precision: `lax` precision of the dots.

        Raises:
            ValueError: A kernel that does not fit `axis` / `out_features`, or
                a bias or dtype that does not fit it.
        """
        axis = _as_tuple(axis, "axis")
        n_in = len(axis)
        if not n_in or len(set(axis)) != n_in:
            raise ValueError(f"axis: expected one or more distinct input axes, got {axis}")
        out_given = None if out_features is None else _as_tuple(out_features, "out_features")
        if isinstance(kernel, QuantizedArray):
            if kernel.contract_axes != tuple(range(n_in)) or len(kernel.shape) <= n_in:
                raise ValueError(f"kernel: a QuantizedArray of a kernel (*in, *out) with contract_axes "
                                 f"{tuple(range(n_in))} is needed for axis={axis}; got shape {kernel.shape}, "
                                 f"contract_axes {kernel.contract_axes}")
            stack, logical = kernel.stack_shape, kernel.shape
            self.kernel = QuantizedWeight(kernel)
        else:
            kernel = jnp.asarray(kernel)
            if np.dtype(kernel.dtype) not in FLOAT_DTYPES:
                raise ValueError(f"kernel: expected a float kernel [*stack, *in, *out] or a QuantizedArray; got "
                                 f"dtype {kernel.dtype}, shape {tuple(kernel.shape)}")
            n_log = kernel.ndim if out_given is None else n_in + len(out_given)
            if kernel.ndim < n_log or n_log <= n_in:
                raise ValueError(f"kernel: shape {tuple(kernel.shape)} has no room for {n_in} input axes "
                                 f"(axis={axis}) and the output axes {out_given}")
            stack, logical = tuple(kernel.shape[: kernel.ndim - n_log]), tuple(kernel.shape[kernel.ndim - n_log:])
            self.kernel = FrozenWeight(kernel)
        in_f, out_f = tuple(int(d) for d in logical[:n_in]), tuple(int(d) for d in logical[n_in:])
        if out_given is not None and out_given != out_f:
            raise ValueError(f"out_features: {out_given} does not match the kernel's output axes {out_f} "
                             f"(kernel shape {logical})")
        if bias is not None:
            bias = jnp.asarray(bias)
            if tuple(bias.shape) != (*stack, *out_f):
                raise ValueError(f"bias: shape {tuple(bias.shape)}, expected {(*stack, *out_f)} for a kernel "
                                 f"[in={in_f}, out={out_f}] with stack dims {stack}")
            self.bias = nnx.Param(bias)
        else:
            self.bias = nnx.data(None)
        if dtype is not None and np.dtype(dtype) not in FLOAT_DTYPES:
            raise ValueError(f"dtype: {dtype} is not a compute dtype; expected float32, bfloat16, float16 or None")
        self.in_features = in_f
        self.out_features = out_f
        self.axis = axis
        self.stack_shape = tuple(int(d) for d in stack)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x` with `in` on `axis` → `[*other axes of x, *out]` in the compute dtype."""
        x = x.astype(x.dtype if self.dtype is None else self.dtype)
        return self._add_bias(self._product(x))

    def _product(self, x: jax.Array) -> jax.Array:
        """`x` (in the compute dtype) times the frozen kernel, without the bias: `[*free, *out]`."""
        dims = self._dims(x)
        kernel = self.kernel.get_value()
        check_unstacked(kernel, len(self.in_features) + len(self.out_features), type(self).__name__)
        if isinstance(kernel, QuantizedArray):
            return qdot_general(x, kernel, dims, precision=self.precision)
        # as nnx.LinearGeneral: the kernel in the compute dtype, no gradient (frozen)
        return lax.dot_general(x, lax.stop_gradient(kernel.astype(x.dtype)), dims, precision=self.precision)

    def _add_bias(self, y: jax.Array) -> jax.Array:
        if self.bias is None:
            return y
        return y + jnp.reshape(self.bias[...].astype(y.dtype), (1,) * (y.ndim - len(self.out_features))
                               + self.out_features)  # [*free, *out]

    def _dims(self, x: jax.Array) -> tuple:
        """`dot_general` dimension numbers of `x` against a kernel `[*in, ...]`."""
        axis = tuple(a + x.ndim if a < 0 else a for a in self.axis)
        if any(not 0 <= a < x.ndim for a in axis) or len(set(axis)) != len(axis):
            raise ValueError(f"{type(self).__name__}: axis {self.axis} does not fit an input of shape {x.shape}")
        if tuple(x.shape[a] for a in axis) != self.in_features:
            raise ValueError(f"{type(self).__name__}: input shape {x.shape} has sizes "
                             f"{tuple(x.shape[a] for a in axis)} on axis {self.axis}, expected in_features "
                             f"{self.in_features}")
        return (axis, tuple(range(len(axis)))), ((), ())

    @property
    def quantized(self) -> bool:
        """Whether the kernel is a packed `QuantizedArray`."""
        return isinstance(self.kernel, QuantizedWeight)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """Logical shape of one layer's kernel: `(*in, *out)`."""
        return (*self.in_features, *self.out_features)

    @property
    def contract_axes(self) -> tuple[int, ...]:
        """Kernel axes contracted with the input: `(0, ..., len(in) - 1)`."""
        return tuple(range(len(self.in_features)))


class QLoRALinearGeneral(QuantLinearGeneral, AdapterMixin):
    """`QuantLinearGeneral` plus a LoRA adapter: `y = base(x) + s · B(A(dropout(x)))`.

    A maps the flattened input axes (size `prod(in)`) to the rank and B the
    rank to the flattened output axes, stored unflattened: A `[*stack, *in, r]`,
    B `[*stack, r, *out]`, so `ΔW = s · A ⊗ B` has the kernel's shape. Scaling,
    init (with fan-in `prod(in)`), dropout, the float32 `nnx.LoRAParam`
    factors and DoRA (`lora.use_dora`: a magnitude per output position, the
    norm over the input axes) are as in `QLoRALinear`.

    Attributes:
        lora_a: `nnx.LoRAParam` `[*stack, *in, rank]`.
        lora_b: `nnx.LoRAParam` `[*stack, rank, *out]`.
        lora_magnitude_vector: DoRA's magnitude, `nnx.LoRAParam` `[*stack, *out]`, or None.
        rank: `r`.
        alpha: `lora_alpha`.
        scale: The scaling `s`.
        dropout_rate: Dropout probability of the adapter input.
        deterministic: Whether dropout is off.
        rngs: The dropout `nnx.RngStream`, or None when `dropout_rate == 0`.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> from qlora_jax.nnx import QLoRALinearGeneral
        >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (64, 4, 16)), "nf4")
        >>> layer = QLoRALinearGeneral(q, lora=qj.LoraConfig(rank=8, alpha=16), rngs=nnx.Rngs(0))
        >>> layer.lora_a.shape, layer.lora_b.shape
        ((64, 8), (8, 4, 16))
        >>> layer(jnp.ones((2, 64))).shape
        (2, 4, 16)
    """

    def __init__(
        self,
        kernel: QuantizedArray | jax.Array,
        bias: jax.Array | None = None,
        *,
        axis: int | Sequence[int] = -1,
        out_features: int | Sequence[int] | None = None,
        lora: LoraConfig,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        precision: lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        """Wraps an existing kernel and creates a fresh adapter.

        Args:
            kernel: As `QuantLinearGeneral`.
            bias: As `QuantLinearGeneral`.
            axis: As `QuantLinearGeneral`.
            out_features: As `QuantLinearGeneral`.
            lora: The adapter: `rank`, `alpha`, `dropout` (of the adapter
                input), `rslora`, `init` (fan-in `prod(in)`); `targets` is ignored.
            dtype: Compute dtype, or None for the input's dtype.
            param_dtype: Dtype of the adapter factors.
            precision: `lax` precision of the dots.
            rngs: `nnx.Rngs`; "params" draws A, "dropout" seeds dropout.

        Raises:
            TypeError: `lora` is not a `LoraConfig`.
            ValueError: As `QuantLinearGeneral`.
        """
        super().__init__(kernel, bias, axis=axis, out_features=out_features, dtype=dtype, precision=precision)
        self._init_adapter(self.in_features, self.out_features, self.stack_shape, lora=lora,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        """As `QuantLinearGeneral`, plus the adapter; `deterministic` overrides the attribute."""
        if self.use_dora:
            h = x.astype(x.dtype if self.dtype is None else self.dtype)
            return self._add_bias(self._dora(h, deterministic, self._product, self._delta))
        y = super().__call__(x)  # [*free, *out]
        h = self._adapter_input(x.astype(y.dtype), deterministic)  # dropout on the adapter input only
        return y + self._delta(h)

    def _delta(self, h: jax.Array) -> jax.Array:
        """The adapter's `s · B(A(h))`: `[*free, *out]`."""
        t = lax.dot_general(h, self.lora_a[...].astype(h.dtype), self._dims(h), precision=self.precision)  # [*free, r]
        d = lax.dot_general(t, self.lora_b[...].astype(h.dtype), (((t.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision)  # [*free, *out]
        return d * self.scale


def _as_tuple(value: int | Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),)
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name}: expected an int or a sequence of ints, got {value!r}") from None
    return out


def check_unstacked(kernel: QuantizedArray | jax.Array, ndim: int, layer: str) -> None:
    stack = kernel.stack_shape if isinstance(kernel, QuantizedArray) else tuple(kernel.shape[: kernel.ndim - ndim])
    if stack:
        raise ValueError(f"{layer}: the kernel has stack dimensions {stack}; call the layer inside nnx.scan or "
                         "nnx.vmap over the stacked axis, which hands it one layer at a time")

"""Flax NNX layers over a frozen (quantized) kernel: `QuantLinear`, `QLoRALinear`.

Both are drop-in replacements for `nnx.Linear` (`y = x @ kernel + bias` over
the last axis). The kernel is a `QuantizedWeight` holding a packed
`QuantizedArray` (multiplied by `qmatmul`, which keeps no dequantized weight
for the backward pass), or a `FrozenWeight` holding a float kernel for plain
LoRA. `QLoRALinear` adds a LoRA adapter whose factors are `nnx.LoRAParam`.

Kernels may carry leading stack dimensions (layers stacked by `nnx.vmap` and
applied with `nnx.scan`); such a layer is called inside the scan, where every
leaf is sliced to one layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from qlora_jax._src.config import LoraConfig
from qlora_jax._src.formats.blockwise import FLOAT_DTYPES
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.nn.adapter import AdapterMixin
from qlora_jax._src.nn.lora import lora_delta
from qlora_jax._src.nn.variables import FrozenWeight, QuantizedWeight
from qlora_jax._src.ops.merged import can_merge, lora_matmul
from qlora_jax._src.ops.qmatmul import qmatmul

__all__ = ["QuantLinear", "QLoRALinear"]



class QuantLinear(nnx.Module):
    """`nnx.Linear` with a frozen kernel, usually packed 4-bit, and an optional float bias.

    `y = x @ kernel + bias` in the compute dtype: `dtype` if given, else the
    input's dtype. The bias stays an `nnx.Param` (PEFT's `bias="none"` is
    `wrt=nnx.LoRAParam`; include it in the filter to train it).

    Attributes:
        kernel: `QuantizedWeight` (a `QuantizedArray` of a kernel `[in, out]`)
            or `FrozenWeight` (a float kernel `[*stack, in, out]`).
        bias: `nnx.Param` `[*stack, out]`, or None.
        in_features: `in`.
        out_features: `out`.
        stack_shape: Leading stack dimensions of every variable (`()` if none).
        dtype: Compute dtype, or None for the input's dtype.
        precision: `lax` precision of the dots.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.nnx import QuantLinear
        >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (128, 64)), "nf4", double_quant=True)
        >>> layer = QuantLinear(q, jnp.zeros(64))
        >>> layer(jnp.ones((2, 128))).shape
        (2, 64)
    """

    def __init__(
        self,
        kernel: QuantizedArray | jax.Array,
        bias: jax.Array | None = None,
        *,
        dtype: jnp.dtype | None = None,
        precision: lax.PrecisionLike = None,
    ):
        """Wraps an existing kernel.

        Args:
            kernel: A `QuantizedArray` of a 2-D kernel `[in, out]` with
                contract_axes (0,) (leaves may carry stack dimensions), or a
                float array `[*stack, in, out]` kept frozen as is.
            bias: Float `[*stack, out]`, or None.
            dtype: Compute dtype (float32, bfloat16 or float16), or None.
            precision: `lax` precision of the dots.

        Raises:
            ValueError: A kernel that is not `[in, out]`, or a bias or dtype
                that does not fit it.
        """
        if isinstance(kernel, QuantizedArray):
            if len(kernel.shape) != 2 or kernel.contract_axes != (0,):
                raise ValueError(f"kernel: a QuantizedArray of a 2-D kernel [in, out] with contract_axes (0,) is "
                                 f"needed; got shape {kernel.shape}, contract_axes {kernel.contract_axes}")
            stack, (n_in, n_out) = kernel.stack_shape, kernel.shape
            self.kernel = QuantizedWeight(kernel)
        else:
            kernel = jnp.asarray(kernel)
            if kernel.ndim < 2 or np.dtype(kernel.dtype) not in FLOAT_DTYPES:
                raise ValueError(f"kernel: expected a float kernel [*stack, in, out] or a QuantizedArray; got "
                                 f"shape {tuple(kernel.shape)}, dtype {kernel.dtype}")
            stack, (n_in, n_out) = tuple(kernel.shape[:-2]), tuple(kernel.shape[-2:])
            self.kernel = FrozenWeight(kernel)
        if bias is not None:
            bias = jnp.asarray(bias)
            if tuple(bias.shape) != (*stack, n_out):
                raise ValueError(f"bias: shape {tuple(bias.shape)}, expected {(*stack, n_out)} for a kernel "
                                 f"[in={n_in}, out={n_out}] with stack dims {stack}")
            self.bias = nnx.Param(bias)
        else:
            self.bias = nnx.data(None)
        if dtype is not None and np.dtype(dtype) not in FLOAT_DTYPES:
            raise ValueError(f"dtype: {dtype} is not a compute dtype; expected float32, bfloat16, float16 or None")
        self.in_features = int(n_in)
        self.out_features = int(n_out)
        self.stack_shape = tuple(int(d) for d in stack)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x [..., in]` → `[..., out]` in the compute dtype."""
        x = x.astype(x.dtype if self.dtype is None else self.dtype)
        y = _frozen_matmul(x, self.kernel.get_value(), self.precision, type(self).__name__)  # [..., out]
        return self._add_bias(y)

    def _add_bias(self, y: jax.Array) -> jax.Array:
        if self.bias is None:
            return y
        return y + jnp.reshape(self.bias[...].astype(y.dtype), (1,) * (y.ndim - 1) + (-1,))

    @property
    def quantized(self) -> bool:
        """Whether the kernel is a packed `QuantizedArray`."""
        return isinstance(self.kernel, QuantizedWeight)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """Logical shape of one layer's kernel: `(in, out)`."""
        return (self.in_features, self.out_features)

    @property
    def contract_axes(self) -> tuple[int, ...]:
        """Kernel axes contracted with the input: `(0,)`."""
        return (0,)


class QLoRALinear(QuantLinear, AdapterMixin):
    """`QuantLinear` plus a LoRA adapter: `y = x @ kernel + bias + s · B(A(dropout(x)))`.

    PEFT's semantics: `s = alpha / rank` (`alpha / √rank` with `rslora`),
    dropout on the adapter input only, A initialised kaiming-uniform
    (U(-1/√in, 1/√in)) or N(0, (1/rank)²), B zero. The adapter runs in the
    compute dtype; its factors are stored as float32 `nnx.LoRAParam`, the only
    trainable variables of the layer besides the bias.

    Dropout follows Flax's convention: active unless the layer is
    deterministic (`model.eval()` sets `deterministic=True` on every layer,
    `model.train()` clears it; a `deterministic=` call argument overrides it).
    Its keys come from the layer's own `RngStream` (split per stacked layer).

    In float32 without dropout (rate 0, or deterministic) the adapter is
    folded into the weight the product materializes anyway, `x @ (W + s · A
    @ B)`, with its own gradient (`qlora_jax/_src/ops/merged.py`); otherwise,
    and on the Pallas paths, the adapter's two thin products are added.

    With `lora.use_dora` (DoRA, PEFT's definition; see `nn/adapter.py`) the
    output is scaled per output feature by `m / ‖W + s·A @ B‖`, `m` the
    trained `lora_magnitude_vector` (initialised to the weight's norm, so a
    fresh DoRA layer also leaves the output unchanged) and the norm computed
    from the packed kernel without a gradient.

    Attributes:
        lora_a: `nnx.LoRAParam` `[*stack, in, rank]`.
        lora_b: `nnx.LoRAParam` `[*stack, rank, out]`.
        lora_magnitude_vector: DoRA's magnitude, `nnx.LoRAParam` `[*stack, out]`, or None.
        rank: `r`.
        alpha: `lora_alpha`.
        scale: The scaling `s`.
        dropout_rate: Dropout probability of the adapter input.
        deterministic: Whether dropout is off.
        rngs: The dropout `nnx.RngStream`, or None when `dropout_rate == 0`.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> from qlora_jax.nnx import QLoRALinear, QuantLinear
        >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (128, 64)), "nf4")
        >>> layer = QLoRALinear(q, lora=qj.LoraConfig(rank=8, alpha=16), rngs=nnx.Rngs(0))
        >>> layer.lora_a.shape, layer.lora_b.shape, layer.scale
        ((128, 8), (8, 64), 2.0)
        >>> x = jnp.ones((2, 128))
        >>> bool((layer(x) == QuantLinear(q)(x)).all())  # B = 0: the adapter adds nothing yet
        True
        >>> dora = QLoRALinear(q, lora=qj.LoraConfig(rank=8, alpha=16, use_dora=True), rngs=nnx.Rngs(0))
        >>> dora.lora_magnitude_vector.shape, bool(jnp.allclose(dora(x), QuantLinear(q)(x), atol=1e-4))
        ((64,), True)
    """

    def __init__(
        self,
        kernel: QuantizedArray | jax.Array,
        bias: jax.Array | None = None,
        *,
        lora: LoraConfig,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        precision: lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        """Wraps an existing kernel and creates a fresh adapter.

        Args:
            kernel: As `QuantLinear`.
            bias: As `QuantLinear`.
            lora: The adapter: `rank`, `alpha`, `dropout` (of the adapter
                input), `rslora`, `init`, `use_dora`; `targets` is ignored.
            dtype: Compute dtype, or None for the input's dtype.
            param_dtype: Dtype of the adapter factors.
            precision: `lax` precision of the dots.
            rngs: `nnx.Rngs`; the "params" stream draws A, the "dropout"
                stream seeds the dropout keys (each falls back to "default").

        Raises:
            TypeError: `lora` is not a `LoraConfig`.
            ValueError: As `QuantLinear`.
        """
        super().__init__(kernel, bias, dtype=dtype, precision=precision)
        self._init_adapter((self.in_features,), (self.out_features,), self.stack_shape, lora=lora,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        """`x [..., in]` → `[..., out]` in the compute dtype; `deterministic` overrides the attribute."""
        off = self.deterministic if deterministic is None else deterministic
        h = x.astype(x.dtype if self.dtype is None else self.dtype)
        kernel = self.kernel.get_value()
        a, b = self.lora_a[...], self.lora_b[...]
        if self.use_dora:
            if (self.dropout_rate == 0 or off) and can_merge(h, kernel):
                # c · x @ (W + s·A @ B): the merged product (ops/merged.py), scaled per output
                y = lora_matmul(h, kernel, a, b, self.scale, precision=self.precision)  # [..., out]
                return self._add_bias(self.dora_scale().astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,)) * y)
            name = type(self).__name__
            y = self._dora(h, deterministic, lambda v: _frozen_matmul(v, kernel, self.precision, name),
                           lambda v: lora_delta(v, a, b, self.scale, precision=self.precision))
            return self._add_bias(y)
        if (self.dropout_rate == 0 or off) and can_merge(h, kernel):
            # float32 without dropout: one product with the merged weight (ops/merged.py)
            return self._add_bias(lora_matmul(h, kernel, self.lora_a[...], self.lora_b[...], self.scale,
                                              precision=self.precision))
        y = super().__call__(x)  # [..., out]
        h = self._adapter_input(x.astype(y.dtype), deterministic)  # [..., in], dropout on the adapter input only
        return y + lora_delta(h, self.lora_a[...], self.lora_b[...], self.scale, precision=self.precision)


def _frozen_matmul(x: jax.Array, kernel: QuantizedArray | jax.Array, precision: lax.PrecisionLike,
                   layer: str) -> jax.Array:
    """`x [..., in] @ kernel [in, out]` for a packed or a float frozen kernel."""
    stack = kernel.stack_shape if isinstance(kernel, QuantizedArray) else tuple(kernel.shape[:-2])
    if stack:
        raise ValueError(f"{layer}: the kernel has stack dimensions {stack}; call the layer inside nnx.scan or "
                         "nnx.vmap over the stacked axis, which hands it one layer at a time")
    if isinstance(kernel, QuantizedArray):
        return qmatmul(x, kernel, precision=precision)
    # As nnx.Linear: the kernel in the compute dtype, no gradient (frozen).
    kernel = lax.stop_gradient(kernel.astype(x.dtype))
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)

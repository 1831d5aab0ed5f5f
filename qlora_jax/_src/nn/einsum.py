"""`QuantEinsum`, `QLoRAEinsum`: `nnx.Einsum` over a frozen (quantized) kernel.

`nnx.Einsum(einsum_str, kernel_shape, bias_shape)` computes
`einsum(einsum_str, x, kernel) + bias`. Here the kernel is a `QuantizedArray`
whose `contract_axes` are the kernel axes summed against `x` (for
`"...nh,nhd->...d"`: `(0, 1)`), multiplied by `qeinsum`, or a float kernel
kept frozen.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from qlora_jax._src.config import LoraConfig
from qlora_jax._src.formats.blockwise import FLOAT_DTYPES
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.nn.adapter import AdapterMixin
from qlora_jax._src.nn.general import check_unstacked
from qlora_jax._src.nn.lora import lora_einsum
from qlora_jax._src.nn.spec import einsum_kernel_axes, einsum_problem, split_einsum
from qlora_jax._src.nn.variables import FrozenWeight, QuantizedWeight
from qlora_jax._src.ops.qmatmul import qeinsum

__all__ = ["QuantEinsum", "QLoRAEinsum"]


class QuantEinsum(nnx.Module):
    """`nnx.Einsum` with a frozen kernel, usually packed 4-bit: `y = einsum(einsum_str, x, kernel) + bias`.

    Computed in the compute dtype (`dtype` if given, else the input's). The
    kernel's *input axes* are those summed against `x`; the others (kept in
    the output) are its *output axes*. The bias is reshaped to broadcast over
    the output as `nnx.Einsum` does.

    Attributes:
        kernel: `QuantizedWeight` (a `QuantizedArray` whose contract_axes are
            the input axes) or `FrozenWeight` (a float kernel `[*stack, *kernel_shape]`).
        bias: `nnx.Param` `[*stack, *bias_shape]`, or None.
        einsum_str: The spec, e.g. `"...nh,nhd->...d"`, spaces removed.
        kernel_shape: Logical shape of one layer's kernel.
        bias_shape: Shape of one layer's bias, or None.
        contract_axes: The kernel's input axes, in kernel order.
        stack_shape: Leading stack dimensions of every variable (`()` if none).
        dtype: Compute dtype, or None for the input's dtype.
        precision: `lax` precision of the dots.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.nnx import QuantEinsum
        >>> kernel = jax.random.normal(jax.random.key(0), (4, 16, 64))  # [heads, head_dim, d]
        >>> q = qj.quantize(kernel, "nf4", contract_axes=(0, 1))
        >>> layer = QuantEinsum("bsnh,nhd->bsd", q, jnp.zeros(64))
        >>> layer(jnp.ones((2, 3, 4, 16))).shape
        (2, 3, 64)
    """

    def __init__(
        self,
        einsum_str: str,
        kernel: QuantizedArray | jax.Array,
        bias: jax.Array | None = None,
        *,
        dtype: jnp.dtype | None = None,
        precision: lax.PrecisionLike = None,
    ):
        """Wraps an existing kernel.

        Args:
            einsum_str: `"x_axes,kernel_axes->out_axes"`; `...` may stand for
                leading axes of `x` (and the output), not of the kernel.
            kernel: A `QuantizedArray` quantized with `contract_axes` = the
                kernel axes summed against `x` (leaves may carry stack
                dimensions), or a float array `[*stack, *kernel_shape]`.
            bias: Float `[*stack, *bias_shape]`, whose `bias_shape` has as many
                elements as the kernel's axes kept in the output, or None.
            dtype: Compute dtype (float32, bfloat16 or float16), or None.
            precision: `lax` precision of the dots.

        Raises:
            ValueError: A spec the layer cannot compute, a kernel that does not
                fit it (rank, contract_axes), or a bias or dtype that does not fit.
        """
        spec = einsum_str.replace(" ", "")
        problem = einsum_problem(spec)
        if problem is not None:
            raise ValueError(f"einsum_str: the layer cannot be computed because {problem}")
        _, ks, out = split_einsum(spec)
        contract, _ = einsum_kernel_axes(spec)
        if isinstance(kernel, QuantizedArray):
            if len(kernel.shape) != len(ks) or tuple(sorted(kernel.contract_axes)) != contract:
                raise ValueError(f"kernel: {einsum_str!r} needs a QuantizedArray of a {len(ks)}-D kernel with "
                                 f"contract_axes {contract} (the axes {''.join(ks[i] for i in contract)!r}); got "
                                 f"shape {kernel.shape}, contract_axes {kernel.contract_axes}")
            stack, logical = kernel.stack_shape, kernel.shape
            self.kernel = QuantizedWeight(kernel)
        else:
            kernel = jnp.asarray(kernel)
            if np.dtype(kernel.dtype) not in FLOAT_DTYPES or kernel.ndim < len(ks):
                raise ValueError(f"kernel: expected a float kernel [*stack, *kernel_shape] with {len(ks)} kernel "
                                 f"axes for {einsum_str!r}, or a QuantizedArray; got shape {tuple(kernel.shape)}, "
                                 f"dtype {kernel.dtype}")
            n_stack = kernel.ndim - len(ks)
            stack, logical = tuple(kernel.shape[:n_stack]), tuple(kernel.shape[n_stack:])
            self.kernel = FrozenWeight(kernel)
        stack = tuple(int(d) for d in stack)
        logical = tuple(int(d) for d in logical)
        if bias is not None:
            bias = jnp.asarray(bias)
            kept = math.prod(logical[ks.index(c)] for c in out if c in ks)
            shape = tuple(bias.shape)
            if shape[: len(stack)] != stack or math.prod(shape[len(stack):]) != kept:
                raise ValueError(f"bias: shape {shape} does not fit {einsum_str!r} with kernel {logical} and stack "
                                 f"dims {stack}: expected {stack} followed by a shape with {kept} elements (the "
                                 "kernel axes kept in the output)")
            self.bias = nnx.Param(bias)
            self.bias_shape = shape[len(stack):]
        else:
            self.bias = nnx.data(None)
            self.bias_shape = None
        if dtype is not None and np.dtype(dtype) not in FLOAT_DTYPES:
            raise ValueError(f"dtype: {dtype} is not a compute dtype; expected float32, bfloat16, float16 or None")
        self.einsum_str = spec
        self.kernel_shape = logical
        self.contract_axes = contract
        self.stack_shape = stack
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.precision = precision

    def __call__(self, x: jax.Array, einsum_str: str | None = None) -> jax.Array:
        """`einsum(einsum_str, x, kernel) + bias` in the compute dtype.

        `einsum_str` overrides the layer's spec for this call (as in
        `nnx.Einsum`); it must sum the same kernel axes against `x`.
        """
        spec = self._spec(einsum_str)
        x = x.astype(x.dtype if self.dtype is None else self.dtype)
        return self._add_bias(self._product(x, spec), spec)

    def _product(self, x: jax.Array, spec: str) -> jax.Array:
        """`einsum(spec, x, kernel)` for `x` in the compute dtype, without the bias."""
        kernel = self.kernel.get_value()
        check_unstacked(kernel, len(self.kernel_shape), type(self).__name__)
        if isinstance(kernel, QuantizedArray):
            return qeinsum(spec, x, kernel, precision=self.precision)
        # as nnx.Einsum: the kernel in the compute dtype, no gradient (frozen)
        return jnp.einsum(spec, x, lax.stop_gradient(kernel.astype(x.dtype)), precision=self.precision)

    def _add_bias(self, y: jax.Array, spec: str) -> jax.Array:
        if self.bias is None:
            return y
        return y + jnp.reshape(self.bias[...].astype(y.dtype), self._bias_broadcast(spec, y.ndim))

    def _spec(self, einsum_str: str | None) -> str:
        if einsum_str is None:
            return self.einsum_str
        spec = einsum_str.replace(" ", "")
        problem = einsum_problem(spec)
        if problem is not None:
            raise ValueError(f"einsum_str: the layer cannot be computed because {problem}")
        ks = split_einsum(spec)[1]
        if len(ks) != len(self.kernel_shape) or einsum_kernel_axes(spec)[0] != self.contract_axes:
            raise ValueError(f"einsum_str: {einsum_str!r} does not sum kernel axes {self.contract_axes} of the "
                             f"kernel {self.kernel_shape} against x, as the layer's {self.einsum_str!r} does")
        return spec

    def _bias_broadcast(self, spec: str, out_ndim: int) -> tuple[int, ...]:
        """The output-shaped broadcast of the bias: kernel sizes on the kernel's letters, 1 elsewhere."""
        _, ks, out = split_einsum(spec)
        shape = []
        for c in out.replace("...", "."):
            if c == ".":
                shape += [1] * (out_ndim - (len(out) - 3))
            else:
                shape.append(self.kernel_shape[ks.index(c)] if c in ks else 1)
        return tuple(shape)

    @property
    def quantized(self) -> bool:
        """Whether the kernel is a packed `QuantizedArray`."""
        return isinstance(self.kernel, QuantizedWeight)


class QLoRAEinsum(QuantEinsum, AdapterMixin):
    """`QuantEinsum` plus a LoRA adapter: `y = base(x) + s · einsum(einsum_str, dropout(x), A ⊗ B)`.

    With `in` the kernel's input axes and `out` its output axes (each in
    kernel order), A is `[*stack, *in, r]` and B `[*stack, r, *out]`: A maps
    the flattened input axes (size `prod(in)`) to the rank, B the rank to the
    flattened output axes; `ΔW = s · A ⊗ B`, transposed to kernel order, is
    the update `merge_lora` folds into the kernel. Computed by `lora_einsum`
    without forming `ΔW`. Scaling, init, dropout, float32 factors and DoRA
    (`lora.use_dora`: a magnitude per output position of the kernel, the norm
    over its input axes) as in `QLoRALinear`.

    Attributes:
        lora_a: `nnx.LoRAParam` `[*stack, *in, rank]`.
        lora_b: `nnx.LoRAParam` `[*stack, rank, *out]`.
        lora_magnitude_vector: DoRA's magnitude, `nnx.LoRAParam` `[*stack, *out]` (kernel order), or None.
        rank: `r`.
        alpha: `lora_alpha`.
        scale: The scaling `s`.
        dropout_rate: Dropout probability of the adapter input.
        deterministic: Whether dropout is off.
        rngs: The dropout `nnx.RngStream`, or None when `dropout_rate == 0`.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> from qlora_jax.nnx import QLoRAEinsum
        >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (4, 16, 64)), "nf4", contract_axes=(0, 1))
        >>> layer = QLoRAEinsum("...nh,nhd->...d", q, lora=qj.LoraConfig(rank=8, alpha=16), rngs=nnx.Rngs(0))
        >>> layer.lora_a.shape, layer.lora_b.shape
        ((4, 16, 8), (8, 64))
        >>> layer(jnp.ones((2, 4, 16))).shape
        (2, 64)
    """

    def __init__(
        self,
        einsum_str: str,
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
            einsum_str: As `QuantEinsum`.
            kernel: As `QuantEinsum`.
            bias: As `QuantEinsum`.
            lora: The adapter: `rank`, `alpha`, `dropout` (of the adapter
                input), `rslora`, `init` (fan-in `prod(in)`); `targets` is ignored.
            dtype: Compute dtype, or None for the input's dtype.
            param_dtype: Dtype of the adapter factors.
            precision: `lax` precision of the dots.
            rngs: `nnx.Rngs`; "params" draws A, "dropout" seeds dropout.

        Raises:
            TypeError: `lora` is not a `LoraConfig`.
            ValueError: As `QuantEinsum`.
        """
        super().__init__(einsum_str, kernel, bias, dtype=dtype, precision=precision)
        in_shape = tuple(self.kernel_shape[i] for i in self.contract_axes)
        out_shape = tuple(d for i, d in enumerate(self.kernel_shape) if i not in self.contract_axes)
        self._init_adapter(in_shape, out_shape, self.stack_shape, lora=lora, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, einsum_str: str | None = None, *,
                 deterministic: bool | None = None) -> jax.Array:
        """As `QuantEinsum`, plus the adapter; `deterministic` overrides the attribute."""
        spec = self._spec(einsum_str)

        def delta(h: jax.Array) -> jax.Array:
            return lora_einsum(spec, h, self.lora_a[...], self.lora_b[...], self.scale, precision=self.precision)

        if self.use_dora:
            h = x.astype(x.dtype if self.dtype is None else self.dtype)
            y = self._dora(h, deterministic, lambda v: self._product(v, spec), delta,
                           lambda c, ndim: self._out_broadcast(c, spec, h.ndim))
            return self._add_bias(y, spec)
        y = super().__call__(x, spec)
        h = self._adapter_input(x.astype(y.dtype), deterministic)  # dropout on the adapter input only
        return y + delta(h)

    def _out_broadcast(self, c: jax.Array, spec: str, x_ndim: int) -> jax.Array:
        """`c [*out]` (the kernel's output axes in kernel order) arranged to broadcast against the output."""
        xs, ks, out = split_einsum(spec)
        k_out = "".join(ks[i] for i in range(len(ks)) if i not in self.contract_axes)
        kept = "".join(ch for ch in out if ch in k_out)  # the kernel's output letters in output order
        c = jnp.einsum(f"{k_out}->{kept}", c)
        n_dots = x_ndim - (len(xs) - 3) if "..." in xs else 0
        shape = []
        for ch in out.replace("...", "."):
            if ch == ".":
                shape += [1] * n_dots
            else:
                shape.append(c.shape[kept.index(ch)] if ch in kept else 1)
        return c.reshape(shape)

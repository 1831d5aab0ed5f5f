"""`QuantizedArray`: one blockwise-quantized kernel as a pytree of plain arrays."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

__all__ = ["QuantizedArray", "FORMATS", "BLOCK_SIZES", "NESTED_BLOCK_SIZE"]

# Formats and the number of bits of one code.
FORMATS: dict[str, int] = {"nf4": 4, "fp4": 4, "int4": 4, "int8": 8}
# Block sizes bitsandbytes accepts (0.50): 32 and the powers of two 64..4096.
BLOCK_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Double quantization quantizes the absmax values in blocks of this many.
NESTED_BLOCK_SIZE = 256


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedArray:
    """A kernel stored as blockwise-quantized codes with per-block scales.

    The logical kernel has shape `shape` and is contracted over `contract_axes`
    (for a Flax `(in, out)` kernel: `(0,)`). Storage is the layout of
    bitsandbytes for the PyTorch weight `kernel.T`: the kernel is viewed as a
    matrix `[out, in]` (`out` = the other axes in order, `in` = the contracted
    axes in order), flattened row-major, and cut into consecutive blocks of
    `block_size` elements, so a block always lies along the input axis.

    Invariants (checked in `__post_init__`; leaves may carry leading stack
    dimensions `stack_shape`, e.g. layers stacked for `nnx.scan`):

    * Row layout, when `in % block_size == 0` (the usual case):
      `codes` is `[*stack, *out_shape, in // 2]` uint8 for 4-bit formats (two
      codes per byte, the first element in the high nibble) or
      `[*stack, *out_shape, in]` int8 for "int8"; `absmax` is
      `[*stack, *out_shape, in // block_size]`.
    * Flat layout otherwise (blocks straddle rows, as in bitsandbytes):
      `codes` is `[*stack, ceil(size / 2)]` (4-bit; an odd size gets one padding
      code for 0.0) or `[*stack, size]` (int8); `absmax` is `[*stack, n_blocks]`.
    * `absmax` is float32, or with double quantization uint8 codes into the
      signed dynamic map; then `nested_absmax` is float32
      `[*stack, ceil(n_blocks / 256)]` and `nested_offset` float32 `[*stack]`,
      and `absmax_i = dynamic_map[code_i] * nested_absmax[i // 256] + offset`.

    Flattening `codes` and `absmax` row-major gives bitsandbytes' packed weight
    and absmax byte for byte (see `to_bnb`).

    Attributes:
        codes: Packed 4-bit codes (uint8) or int8 codes.
        absmax: Per-block absmax (float32), or its 8-bit codes (uint8).
        nested_absmax: Per-256-block scales of the absmax codes, or None.
        nested_offset: Mean of the absmax values, or None.
        fmt: "nf4", "fp4", "int4" or "int8".
        block_size: Elements per block.
        shape: Logical shape of one kernel.
        dtype: Dtype the kernel had; the default of `dequantize`.
        contract_axes: Axes of `shape` that form the input (blocked) axis.

    Example:
        >>> import jax.numpy as jnp, qlora_jax as qj
        >>> q = qj.quantize(jnp.ones((128, 64)), "nf4")
        >>> q.codes.shape, q.absmax.shape
        ((64, 64), (64, 2))
    """

    codes: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    nested_offset: jax.Array | None
    fmt: str
    block_size: int
    shape: tuple[int, ...]
    dtype: np.dtype
    contract_axes: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "contract_axes", tuple(int(a) for a in self.contract_axes))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.fmt not in FORMATS:
            raise ValueError(f"QuantizedArray.fmt: unknown format {self.fmt!r}; expected one of {sorted(FORMATS)}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"QuantizedArray.block_size: {self.block_size} is not one of {BLOCK_SIZES}")
        if (self.nested_absmax is None) != (self.nested_offset is None):
            raise ValueError("QuantizedArray: nested_absmax and nested_offset must both be set or both be None")
        expected = {
            "codes": (self.codes_shape, np.uint8 if self.bits == 4 else np.int8),
            "absmax": (self.absmax_shape, np.uint8 if self.double_quant else np.float32),
        }
        if self.double_quant:
            expected["nested_absmax"] = ((-(-self.n_blocks // NESTED_BLOCK_SIZE),), np.float32)
            expected["nested_offset"] = ((), np.float32)
        stack = None
        for name, (tail, dtype) in expected.items():
            leaf = getattr(self, name)
            if not hasattr(leaf, "shape"):
                continue  # abstract placeholders built by pytree utilities
            shape = tuple(leaf.shape)
            if len(shape) < len(tail) or shape[len(shape) - len(tail):] != tail:
                raise ValueError(f"QuantizedArray.{name}: shape {shape} does not end in {tail} "
                                 f"(fmt={self.fmt}, block_size={self.block_size}, shape={self.shape})")
            if np.dtype(leaf.dtype) != np.dtype(dtype):
                raise ValueError(f"QuantizedArray.{name}: dtype {leaf.dtype}, expected {np.dtype(dtype)}")
            lead = shape[: len(shape) - len(tail)]
            if stack is not None and lead != stack:
                raise ValueError(f"QuantizedArray.{name}: leading stack dims {lead} differ from codes' {stack}")
            stack = lead

    # -- static geometry of one kernel -------------------------------------

    @property
    def bits(self) -> int:
        """Bits per code: 4 or 8."""
        return FORMATS[self.fmt]

    @property
    def double_quant(self) -> bool:
        """Whether the absmax values are themselves quantized to 8 bits."""
        return self.nested_absmax is not None

    @property
    def size(self) -> int:
        """Number of elements of one kernel."""
        return math.prod(self.shape)

    @property
    def in_size(self) -> int:
        """Length of the (flattened) contracted axes."""
        return math.prod(self.shape[a] for a in self.contract_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The non-contracted axes of `shape`, in order."""
        return tuple(d for i, d in enumerate(self.shape) if i not in self.contract_axes)

    @property
    def row_layout(self) -> bool:
        """True when every block lies inside one row (`in % block_size == 0`)."""
        return self.in_size % self.block_size == 0

    @property
    def n_blocks(self) -> int:
        """Number of absmax blocks of one kernel."""
        return -(-self.size // self.block_size)

    @property
    def codes_shape(self) -> tuple[int, ...]:
        """Shape of `codes` for one kernel (without stack dimensions)."""
        per_byte = 2 if self.bits == 4 else 1
        if self.row_layout:
            return (*self.out_shape, self.in_size // per_byte)
        return (-(-self.size // per_byte),)

    @property
    def absmax_shape(self) -> tuple[int, ...]:
        """Shape of `absmax` for one kernel (without stack dimensions)."""
        if self.row_layout:
            return (*self.out_shape, self.in_size // self.block_size)
        return (self.n_blocks,)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading dimensions of the leaves beyond one kernel (stacked layers)."""
        return tuple(self.codes.shape[: self.codes.ndim - len(self.codes_shape)])

    @property
    def nbytes(self) -> int:
        """Bytes held by the leaves (codes, scales and nested scales)."""
        return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(self))

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        # Leaves may be placeholders without ndim (nnx's module repr, jax.tree.map(jnp.shape, ...)).
        codes_shape = getattr(self.codes, "shape", None)
        stack_shape = () if codes_shape is None else tuple(codes_shape)[: len(codes_shape) - len(self.codes_shape)]
        stack = f", stack={stack_shape}" if stack_shape else ""
        return (f"QuantizedArray({self.fmt}, shape={self.shape}, block_size={self.block_size}{dq}, "
                f"dtype={self.dtype.name}, contract_axes={self.contract_axes}{stack})")


_DATA = ("codes", "absmax", "nested_absmax", "nested_offset")
_META = ("fmt", "block_size", "shape", "dtype", "contract_axes")


def _flatten_with_keys(q: QuantizedArray) -> tuple[Any, Any]:
    children = tuple((jax.tree_util.GetAttrKey(n), getattr(q, n)) for n in _DATA)
    return children, tuple(getattr(q, n) for n in _META)


def _unflatten(meta: tuple, children: tuple) -> QuantizedArray:
    # Pytree utilities rebuild with arbitrary leaves (tracers, None, sharding
    # specs), so unflattening skips the shape checks of __init__.
    q = object.__new__(QuantizedArray)
    for name, value in zip(_DATA + _META, tuple(children) + tuple(meta), strict=True):
        object.__setattr__(q, name, value)
    return q


jax.tree_util.register_pytree_with_keys(
    QuantizedArray, _flatten_with_keys, _unflatten, flatten_func=lambda q: (tuple(getattr(q, n) for n in _DATA),
                                                                           tuple(getattr(q, n) for n in _META)))

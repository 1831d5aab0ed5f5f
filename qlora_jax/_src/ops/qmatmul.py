"""`qmatmul`, `qdot_general`, `qeinsum`: products with a quantized kernel,
dequantized inside the op.

The memory promise of QLoRA depends on the backward pass: plain autodiff of
`x @ dequantize(q)` saves the dequantized full-precision weight of every layer
for the backward pass. Every fast path here is a `jax.custom_vjp` whose
residuals are the packed codes and scales only; the backward pass dequantizes
again and computes the gradient for `x`. The quantized array gets a zero
cotangent (float0 for the integer codes), as in bitsandbytes' `MatMul4Bit`.

Paths (the `path` argument):
  * "reference": dequantize to float32, then a float32 dot at HIGHEST
    precision — the spec. `q` is wrapped in `stop_gradient`.
  * "xla": dequantize in the compute dtype (the activations' dtype) inside the
    jitted computation and let XLA fuse it into the dot; works on every
    backend and for every kernel, and is the path used on CPU.
  * "pallas_gpu" / "pallas_tpu": fused Pallas kernels (`ops/pallas.py`) that
    read the packed codes and expand them in-kernel; for one 2-D kernel in
    row layout. Their backward pass is the "xla" recomputation.
  * "auto" (default): "pallas_gpu" on a GPU and "pallas_tpu" on a TPU when
    `can_use_pallas_gpu` / `can_use_pallas_tpu` allow it, else "xla". Falling
    back from a Pallas kernel on a GPU or TPU logs a warning on the
    `qlora_jax` logger with the reason; `qmatmul_path` returns the choice.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qlora_jax._src.formats.blockwise import (
    FLOAT_DTYPES,
    dequantize,
    dequantize_absmax,
    dequantize_halves,
    dequantize_permuted,
    dequantize_stored,
    halves_from_codes,
    storage_order,
)
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.ops import pallas

__all__ = ["qmatmul", "qdot_general", "qeinsum", "qmatmul_path", "PATHS"]

PATHS = ("auto", "reference", "xla", "pallas_gpu", "pallas_tpu")
_logger = logging.getLogger("qlora_jax")
_warned: set[str] = set()

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


def qmatmul(
    x: jax.Array,
    q: QuantizedArray,
    *,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    path: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Computes `x[..., in] @ kernel[in, out]` for a quantized 2-D kernel.

    Differentiable with respect to `x` only; the backward pass recomputes the
    dequantization instead of keeping a dequantized weight (see the module
    docstring for the paths).

    Args:
        x: Activations `[..., in]`, float32, bfloat16 or float16; the compute dtype.
        q: A `QuantizedArray` of one 2-D kernel `[in, out]` (contract_axes (0,)),
            without stack dimensions (slice stacked layers first, e.g. in `scan`).
        precision: Passed to the dots (not the "reference" path, which uses HIGHEST).
        preferred_element_type: Output dtype; default `x.dtype`.
        path: "auto", "reference", "xla", "pallas_gpu" or "pallas_tpu".
        interpret: Run a Pallas path in interpret mode (any backend; for tests).

    Returns:
        `[..., out]` in `preferred_element_type` (default `x.dtype`).

    Raises:
        TypeError: `q` is not a `QuantizedArray`.
        ValueError: A kernel that is not 2-D with input axis 0, stacked leaves,
            an input size that does not match, a non-float `x`, an unknown
            `path`, or a Pallas path that cannot run this product.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (128, 64)), "nf4")
        >>> qj.qmatmul(jnp.ones((2, 3, 128)), q).shape
        (2, 3, 64)
    """
    _check_operands(x, q, "qmatmul")
    if len(q.shape) != 2 or q.contract_axes != (0,):
        raise ValueError(f"q: qmatmul takes a 2-D kernel [in, out] with contract_axes (0,); got shape {q.shape} "
                         f"and contract_axes {q.contract_axes}; use qdot_general or qeinsum")
    if x.ndim < 1 or x.shape[-1] != q.shape[0]:
        raise ValueError(f"x: shape {x.shape} does not match the kernel's shape {q.shape}: last axis "
                         f"{x.shape[-1:]} vs input size {q.shape[0]}")
    chosen = qmatmul_path(x, q, path=path, interpret=interpret)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return _product(x, q, dims, chosen, precision, preferred_element_type, interpret)


def qdot_general(
    lhs: jax.Array,
    q: QuantizedArray,
    dimension_numbers: DimensionNumbers,
    *,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    path: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """`lax.dot_general(lhs, kernel, dimension_numbers)` for a quantized kernel.

    For `nnx.LinearGeneral`-style kernels `[*in, *out]`. The kernel's contracted
    axes must be its `contract_axes` (the axes its blocks run along). When the
    product is a plain matmul (the contracted axes are `lhs`'s trailing axes and
    the kernel's leading axes, no batch axes) it is computed by `qmatmul` on the
    flattened kernel, so the Pallas kernels apply; otherwise by the "xla" (or
    "reference") path.

    Args:
        lhs: Activations, float32, bfloat16 or float16; the compute dtype.
        q: A `QuantizedArray` without stack dimensions.
        dimension_numbers: `((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))`
            as for `lax.dot_general`, with the kernel as `rhs` (its logical shape).
        precision: Passed to the dots.
        preferred_element_type: Output dtype; default `lhs.dtype`.
        path: As for `qmatmul`; a Pallas path only for the plain-matmul case.
        interpret: Run a Pallas path in interpret mode.

    Returns:
        The `lax.dot_general` result: batch axes, then `lhs`'s free axes, then the kernel's.

    Raises:
        TypeError: `q` is not a `QuantizedArray`.
        ValueError: Contracted kernel axes other than `q.contract_axes`, or sizes
            that do not match.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> q = qj.quantize(jnp.ones((4, 64, 8, 16)), "nf4", contract_axes=(0, 1))
        >>> qj.qdot_general(jnp.ones((3, 4, 64)), q, (((1, 2), (0, 1)), ((), ()))).shape
        (3, 8, 16)
    """
    _check_operands(lhs, q, "qdot_general")
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(a) for a in axes) for axes in (lc, rc, lb, rb))
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"dimension_numbers: {dimension_numbers} pairs unequal numbers of lhs and kernel axes")
    for name, axes, ndim in (("lhs", lc + lb, lhs.ndim), ("kernel", rc + rb, len(q.shape))):
        if len(set(axes)) != len(axes) or any(not 0 <= a < ndim for a in axes):
            raise ValueError(f"dimension_numbers: {name} axes {axes} are repeated or out of range for rank {ndim}")
    if sorted(rc) != sorted(q.contract_axes):
        raise ValueError(f"q: contracting kernel axes {rc} of shape {q.shape}, but its blocks run along "
                         f"contract_axes {q.contract_axes}; quantize with contract_axes={rc}")
    for a, b in zip(lc + lb, rc + rb, strict=True):
        if lhs.shape[a] != q.shape[b]:
            raise ValueError(f"lhs: shape {lhs.shape} does not match the kernel's shape {q.shape}: lhs axis {a} "
                             f"({lhs.shape[a]}) vs kernel axis {b} ({q.shape[b]})")
    n_in = len(rc)
    plain = (not lb and rc == q.contract_axes == tuple(range(n_in))
             and lc == tuple(range(lhs.ndim - n_in, lhs.ndim)))
    if plain:
        lead = lhs.shape[: lhs.ndim - n_in]
        x2 = lhs.reshape(*lead, q.in_size)
        y = qmatmul(x2, _as_matrix(q), precision=precision, preferred_element_type=preferred_element_type,
                    path=path, interpret=interpret)
        return y.reshape(*lead, *q.out_shape)
    if path not in ("auto", "xla", "reference"):
        raise ValueError(f"path: {path!r} computes plain matmuls only (lhs's trailing axes against the kernel's "
                         f"leading axes, no batch axes); got dimension_numbers {dimension_numbers}")
    chosen = "reference" if path == "reference" else "xla"
    return _product(lhs, q, ((lc, rc), (lb, rb)), chosen, precision, preferred_element_type, interpret)


def qeinsum(
    subscripts: str,
    x: jax.Array,
    q: QuantizedArray,
    *,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    path: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """`jnp.einsum(subscripts, x, kernel)` for a quantized kernel (the `nnx.Einsum` form).

    `subscripts` names both operands and the output (`"...d,dnh->...nh"`);
    `...` may stand for `x`'s leading axes. The kernel's axes summed over must
    be its `contract_axes`. Computed by `qdot_general`.

    Args:
        subscripts: Einsum spec with an explicit output, e.g. `"bsd,dnh->bsnh"`.
        x: Activations, float32, bfloat16 or float16; the compute dtype.
        q: A `QuantizedArray` without stack dimensions.
        precision: Passed to the dots.
        preferred_element_type: Output dtype; default `x.dtype`.
        path: As for `qdot_general`.
        interpret: Run a Pallas path in interpret mode.

    Returns:
        The einsum result.

    Raises:
        ValueError: A spec without `->`, without two operands, with a repeated
            letter in one operand, letters that are neither summed with the
            other operand nor kept, or kernel axes that do not match.

    Example:
        >>> import jax.numpy as jnp, qlora_jax as qj
        >>> q = qj.quantize(jnp.ones((64, 4, 16)), "nf4")
        >>> qj.qeinsum("bsd,dnh->bsnh", jnp.ones((2, 3, 64)), q).shape
        (2, 3, 4, 16)
    """
    _check_operands(x, q, "qeinsum")
    spec = subscripts.replace(" ", "")
    match = re.fullmatch(r"([a-zA-Z.]*),([a-zA-Z]*)->([a-zA-Z.]*)", spec)
    if not match:
        raise ValueError(f"subscripts: {subscripts!r} is not of the form 'x_axes,kernel_axes->out_axes' "
                         f"(letters, '...' only for x's leading axes)")
    xs, ks, out = match.groups()
    if xs.count("...") > 1 or "." in xs.replace("...", "") or out.count("...") != xs.count("...") \
            or "." in out.replace("...", ""):
        raise ValueError(f"subscripts: {subscripts!r} uses '...' other than once in x and once in the output")
    if "..." in xs:
        n_ellipsis = x.ndim - (len(xs) - 3)
        free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in spec][: max(n_ellipsis, 0)]
        xs, out = xs.replace("...", "".join(free)), out.replace("...", "".join(free))
    for name, letters, ndim in (("x", xs, x.ndim), ("kernel", ks, len(q.shape))):
        if len(letters) != ndim:
            raise ValueError(f"subscripts: {subscripts!r} gives {name} {len(letters)} axes, but it has shape "
                             f"{x.shape if name == 'x' else q.shape}")
        if len(set(letters)) != len(letters):
            raise ValueError(f"subscripts: {subscripts!r} repeats an axis letter of {name}")
    lonely = [c for c in xs + ks if c not in out and not (c in xs and c in ks)]
    if lonely or len(set(out)) != len(out) or any(c not in xs + ks for c in out):
        raise ValueError(f"subscripts: {subscripts!r}: every letter must be summed between x and the kernel or "
                         f"appear once in the output (offending: {lonely or out})")
    contract = [c for c in xs if c in ks and c not in out]
    batch = [c for c in xs if c in ks and c in out]
    dims = (([xs.index(c) for c in contract], [ks.index(c) for c in contract]),
            ([xs.index(c) for c in batch], [ks.index(c) for c in batch]))
    y = qdot_general(x, q, dims, precision=precision, preferred_element_type=preferred_element_type, path=path,
                     interpret=interpret)
    produced = batch + [c for c in xs if c not in ks] + [c for c in ks if c not in xs]
    return jnp.transpose(y, [produced.index(c) for c in out])


def qmatmul_path(x: jax.Array, q: QuantizedArray, *, path: str = "auto", interpret: bool = False) -> str:
    """The path `qmatmul(x, q, path=path)` takes: the resolution of "auto".

    "auto" picks "pallas_gpu" on a GPU and "pallas_tpu" on a TPU when the
    kernel can run this product, else "xla"; a fallback on a GPU or TPU is
    logged once per reason on the `qlora_jax` logger. An explicit Pallas path
    that cannot run raises.

    Args:
        x: Activations `[..., in]` (an array or `jax.ShapeDtypeStruct`).
        q: A 2-D `QuantizedArray`.
        path: "auto", "reference", "xla", "pallas_gpu" or "pallas_tpu".
        interpret: Whether a Pallas path would run in interpret mode.

    Returns:
        "reference", "xla", "pallas_gpu" or "pallas_tpu".

    Raises:
        ValueError: An unknown path, or a Pallas path whose `can_use_*` says no.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> q = qj.quantize(jnp.ones((128, 64)), "nf4")
        >>> qj.qmatmul_path(jnp.ones((2, 128)), q) == ("xla" if jax.default_backend() == "cpu" else "pallas_gpu")
        True
    """
    if path not in PATHS:
        raise ValueError(f"path: unknown path {path!r}; expected one of {PATHS}")
    if path in ("reference", "xla"):
        return path
    if path != "auto":
        support = _PREDICATES[path](x, q, interpret=interpret)
        if not support:
            raise ValueError(f"path: {path!r} cannot compute x {tuple(x.shape)} {np.dtype(x.dtype)} @ kernel "
                             f"{q.shape} ({q.fmt}, block {q.block_size}): {support.reason}")
        return path
    backend = jax.default_backend()
    candidate = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend)
    if candidate is None:
        return "xla"
    support = _PREDICATES[candidate](x, q, interpret=interpret)
    if support:
        return candidate
    message = (f"qmatmul: {candidate} not used for x {tuple(x.shape)} {np.dtype(x.dtype)} @ kernel {q.shape} "
               f"({q.fmt}, block {q.block_size}): {support.reason}; using the 'xla' path")
    if message not in _warned:
        _warned.add(message)
        _logger.warning(message)
    return "xla"


_PREDICATES = {"pallas_gpu": pallas.can_use_pallas_gpu, "pallas_tpu": pallas.can_use_pallas_tpu}


# -- implementation ---------------------------------------------------------


def _check_operands(x, q, fn: str) -> None:
    if not isinstance(q, QuantizedArray):
        shape = getattr(q, "shape", None)
        raise TypeError(f"q: {fn} takes a QuantizedArray (from qj.quantize), got {type(q).__name__}"
                        + (f" of shape {tuple(shape)}" if shape is not None else ""))
    if q.stack_shape:
        raise ValueError(f"q: kernel {q.shape} has stack dimensions {q.stack_shape}; slice one layer first "
                         f"(e.g. inside scan)")
    dtype = getattr(x, "dtype", None)
    if dtype is None or np.dtype(dtype) not in FLOAT_DTYPES:
        raise ValueError(f"x: dtype {dtype} (shape {getattr(x, 'shape', None)}) is not float32, bfloat16 or float16")


def _as_matrix(q: QuantizedArray) -> QuantizedArray:
    """A kernel `[*in, *out]` (contract_axes leading) viewed as `[in, out]`; same bytes."""
    if len(q.shape) == 2:
        return q
    n_out = math.prod(q.out_shape)
    codes = q.codes.reshape(n_out, -1) if q.row_layout else q.codes
    absmax = q.absmax.reshape(n_out, -1) if q.row_layout else q.absmax
    return dataclasses.replace(q, codes=codes, absmax=absmax, shape=(q.in_size, n_out), contract_axes=(0,))


@dataclasses.dataclass(frozen=True)
class _Op:
    """Static description of one product (hashable, a `custom_vjp` nondiff argument)."""

    path: str
    dims: tuple
    lhs_shape: tuple[int, ...]
    precision: object
    compute_dtype: np.dtype
    out_dtype: np.dtype
    interpret: bool


def _product(x, q, dims, path, precision, preferred_element_type, interpret):
    out_dtype = np.dtype(x.dtype if preferred_element_type is None else preferred_element_type)
    dims = tuple(tuple(tuple(int(a) for a in axes) for axes in pair) for pair in dims)
    if path == "reference":
        w = dequantize(jax.tree.map(lax.stop_gradient, q), jnp.float32)
        y = lax.dot_general(x.astype(jnp.float32), w, dims, precision=lax.Precision.HIGHEST)
        return y.astype(out_dtype)
    if isinstance(precision, list):
        precision = tuple(precision)
    op = _Op(path, dims, tuple(x.shape), precision, np.dtype(x.dtype), out_dtype, bool(interpret))
    return _qdot(x, q, op)


def _forward(x, q, op: _Op):
    if op.path in ("pallas_gpu", "pallas_tpu"):
        return pallas.pallas_matmul(x, q, backend=op.path[len("pallas_"):], out_dtype=op.out_dtype,
                                    precision=op.precision, interpret=op.interpret)
    rows = _chunk_rows(q, op) if _cpu_halves(q, op) == "split" else 0
    if rows:
        # Each chunk is dequantized inside a loop that reads x: it cannot run before the layer does.
        return _chunked_split_product(q, op, rows, op.out_dtype)(x)
    # The data dependence ties the dequantization to x, so that XLA computes it
    # when the layer runs instead of hoisting every layer's weight to the start.
    return _xla_product(depend_on(q, x), op, op.out_dtype)(x)


def _xla_product(q: QuantizedArray, op: _Op, out_dtype: np.dtype):
    """`x -> dot_general(x, kernel)` with the kernel dequantized in the compute dtype.

    The weight is contracted in its storage order (`[out, in]` for a 2-D
    kernel), which saves a transposed copy of it. On CPU a 4-bit kernel in
    row layout skips interleaving the high and low nibbles of each byte: for
    fewer than `_PERMUTED_MIN_ROWS` rows of `x` it is dequantized as its even
    and odd input columns, multiplied with `x[..., 0::2]` and `x[..., 1::2]`;
    for more, as one kernel with its input columns permuted (the even ones
    first, then the odd ones), contracted in one full-width product with `x`'s
    columns permuted the same way, which materializes the kernel's nibbles
    (one byte per weight). Up to `_CHUNKED_MAX_ROWS` rows of `x`, `_forward`
    runs a large kernel's halves in chunks instead (`_chunked_split_product`).
    Timings of these choices are in `benchmarks/README.md`.
    """
    if _cpu_halves(q, op) == "split":
        even, odd = dequantize_halves(q, op.compute_dtype)  # [out, in // 2] each
        acc = np.dtype(np.float32) if op.compute_dtype.itemsize < 4 else out_dtype

        def split_product(x):
            dims = (((x.ndim - 1,), (1,)), ((), ()))
            y = lax.dot_general(x[..., 0::2], even, dims, precision=op.precision, preferred_element_type=acc)
            y = y + lax.dot_general(x[..., 1::2], odd, dims, precision=op.precision, preferred_element_type=acc)
            return y.astype(out_dtype)

        return split_product
    if _cpu_halves(q, op) == "permuted":
        w = dequantize_permuted(q, op.compute_dtype)  # [out, in], columns 0, 2, 4, ..., 1, 3, 5, ...
        acc = np.dtype(np.float32) if op.compute_dtype.itemsize < 4 else out_dtype

        def permuted_product(x):
            dims = (((x.ndim - 1,), (1,)), ((), ()))
            x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
            return lax.dot_general(x, w, dims, precision=op.precision, preferred_element_type=acc).astype(out_dtype)

        return permuted_product
    w = dequantize_stored(q, op.compute_dtype)
    position = {a: i for i, a in enumerate(storage_order(q))}
    (lc, rc), (lb, rb) = op.dims
    dims = (lc, tuple(position[a] for a in rc)), (lb, tuple(position[a] for a in rb))

    def product(x):
        return lax.dot_general(x, w, dims, precision=op.precision, preferred_element_type=out_dtype)

    return product


# Rows of x from which the CPU "xla" path contracts a permuted full-width kernel instead of its two halves.
_PERMUTED_MIN_ROWS = 1024
# Rows of x up to which the CPU "xla" path dequantizes and multiplies a large kernel in chunks of its output
# rows, each about _CHUNK_BYTES of dequantized weight, so that a chunk is still in cache when its product reads it.
_CHUNKED_MAX_ROWS = 128
_CHUNK_BYTES = 8 << 20


def _chunk_rows(q: QuantizedArray, op: _Op) -> int:
    """Output rows per chunk for the chunked "split" product (`_chunked_split_product`), or 0 for one piece.

    The largest power of two of rows whose dequantized weight fits in `_CHUNK_BYTES`, dividing the output
    size into at least two chunks; 0 for more than `_CHUNKED_MAX_ROWS` rows of x, stacked kernels, or a kernel
    that fits in one chunk.
    """
    if q.stack_shape or math.prod(op.lhs_shape[:-1]) > _CHUNKED_MAX_ROWS:
        return 0
    n_out, row_bytes = q.codes.shape[-2], 2 * q.codes.shape[-1] * op.compute_dtype.itemsize
    rows = 1 << max(int(_CHUNK_BYTES // row_bytes).bit_length() - 1, 0)
    while rows >= 8 and n_out % rows:
        rows //= 2
    return rows if rows >= 8 and n_out // rows >= 2 else 0


def _chunked_split_product(q: QuantizedArray, op: _Op, rows: int, out_dtype: np.dtype):
    """`x -> x @ kernel` for few rows of `x` on CPU: the "split" product (even and odd input columns apart)
    over chunks of `rows` output rows in a loop, each chunk dequantized right before its two products.

    Dequantizing the whole kernel first writes it to memory and reads it back for the product; a chunk of
    about `_CHUNK_BYTES` is read back from cache. For many rows of x the products dominate and chunks gain
    nothing, hence `_CHUNKED_MAX_ROWS` (timings: `benchmarks/README.md`).
    """
    n_out = q.codes.shape[-2]
    codes = q.codes.reshape(n_out // rows, rows, -1)  # [chunks, rows, in // 2]
    absmax = dequantize_absmax(q).reshape(n_out // rows, rows, -1)  # [chunks, rows, in // bs]
    acc = np.dtype(np.float32) if op.compute_dtype.itemsize < 4 else out_dtype

    def chunked_product(x):
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        x_even, x_odd = x[..., 0::2], x[..., 1::2]

        def chunk(codes_absmax):
            even, odd = halves_from_codes(*codes_absmax, q.fmt, q.block_size, op.compute_dtype)  # [rows, in // 2]
            y = lax.dot_general(x_even, even, dims, precision=op.precision, preferred_element_type=acc)
            return y + lax.dot_general(x_odd, odd, dims, precision=op.precision, preferred_element_type=acc)

        y = lax.map(chunk, (codes, absmax))  # [chunks, ..., rows]
        return jnp.moveaxis(y, 0, -2).reshape(*x.shape[:-1], n_out).astype(out_dtype)

    return chunked_product


def _cpu_halves(q: QuantizedArray, op: _Op) -> str | None:
    """How the "xla" path handles the nibbles of a 4-bit kernel on CPU (see `_xla_product`): "split" (two
    half-width products), "permuted" (one product with permuted columns), or None (interleaved)."""
    if op.dims != (((len(op.lhs_shape) - 1,), (0,)), ((), ())) or not permutes_columns(q):
        return None
    return "permuted" if math.prod(op.lhs_shape[:-1]) >= _PERMUTED_MIN_ROWS else "split"


def permutes_columns(q: QuantizedArray) -> bool:
    """Whether a 2-D kernel `[in, out]` is dequantized without interleaving its nibbles on this backend (CPU)."""
    return len(q.shape) == 2 and q.bits == 4 and q.row_layout and jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qdot(x, q, op: _Op):
    return _forward(x, q, op)


def _qdot_fwd(x, q, op: _Op):
    # The only residual is q itself (packed codes and scales), never a dequantized weight.
    return _forward(x, q, op), q


def _qdot_bwd(op: _Op, q, g):
    # Recompute the weight. Tying q to g keeps XLA from merging this
    # dequantization with the forward one (CSE) or scheduling it before the
    # cotangent exists; either would keep the weight alive in between.
    q_g, g = depend_on(q, g), g.astype(op.compute_dtype)
    if _cpu_halves(q, op) == "split":
        # The even and odd columns of the input gradient, interleaved in one pass
        # (the transpose of the forward's strided slices would write each half
        # into a zero-padded full-size array, then add the two).
        even, odd = dequantize_halves(q_g, op.compute_dtype)  # [out, in // 2] each
        acc = np.dtype(np.float32) if op.compute_dtype.itemsize < 4 else op.compute_dtype
        dims = (((g.ndim - 1,), (0,)), ((), ()))
        halves = [lax.dot_general(g, w, dims, precision=op.precision, preferred_element_type=acc) for w in (even, odd)]
        grad_x = jnp.stack(halves, axis=-1).reshape(op.lhs_shape).astype(op.compute_dtype)  # [..., in]
        return grad_x, jax.tree.map(zero_cotangent, q)
    if _cpu_halves(q, op) == "permuted":
        # The input gradient with its columns permuted as the kernel's, then
        # interleaved back in one pass (the transpose of the forward's strided
        # slices and concatenation would write each half into a zero-padded
        # full-size array, then add the two).
        w = dequantize_permuted(q_g, op.compute_dtype)
        acc = np.dtype(np.float32) if op.compute_dtype.itemsize < 4 else op.compute_dtype
        dims = (((g.ndim - 1,), (0,)), ((), ()))
        grad = lax.dot_general(g, w, dims, precision=op.precision, preferred_element_type=acc)  # [..., in] permuted
        half = grad.shape[-1] // 2
        grad_x = jnp.stack([grad[..., :half], grad[..., half:]], axis=-1).reshape(op.lhs_shape)
        return grad_x.astype(op.compute_dtype), jax.tree.map(zero_cotangent, q)
    product = _xla_product(q_g, op, op.compute_dtype)
    (grad_x,) = jax.linear_transpose(product, jax.ShapeDtypeStruct(op.lhs_shape, op.compute_dtype))(g)
    return grad_x, jax.tree.map(zero_cotangent, q)


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


def depend_on(q: QuantizedArray, a: jax.Array) -> QuantizedArray:
    """`q` with its codes made data-dependent on `a` (adds an integer zero the
    compiler cannot prove to be zero: 1 only if a's first element has the bits
    0x7FC00001), so the dequantization runs where `a` is used."""
    if a.size == 0:
        return q
    return dataclasses.replace(q, codes=q.codes + dependent_zero(a).astype(q.codes.dtype))


def dependent_zero(a: jax.Array) -> jax.Array:
    """An int32 scalar zero that depends on `a` (1 only if a's first element has the bits 0x7FC00001)."""
    if a.size == 0:
        return jnp.zeros((), jnp.int32)
    first = lax.bitcast_convert_type(a.reshape(-1)[0].astype(jnp.float32), jnp.int32)
    return (first == np.int32(0x7FC00001)).astype(jnp.int32)


def zero_cotangent(leaf: jax.Array) -> jax.Array:
    if jnp.issubdtype(leaf.dtype, jnp.floating):
        return jnp.zeros(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, jax.dtypes.float0)

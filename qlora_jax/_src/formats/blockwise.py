"""Blockwise absmax quantization to NF4, FP4, int4 and int8, and back.

NF4 and FP4 follow bitsandbytes 0.50 exactly (Dettmers et al., 2023, "QLoRA:
Efficient Finetuning of Quantized LLMs"): per block of `block_size` elements
along the input axis, `absmax = max |x|`, `scaled = clip(x * (1 / absmax), -1,
1)`, and each value gets the code of the nearest codebook entry (a tie goes to
the lower value). Double quantization stores the absmax values as 8-bit codes
of the signed dynamic map in blocks of 256, after subtracting their mean.

Everything here is a pure function over arrays; `quantize` is jittable and
processes large kernels in chunks of rows so that its temporaries stay a small
fraction of the kernel's size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qlora_jax._src.formats import codebooks
from qlora_jax._src.formats.qarray import BLOCK_SIZES, FORMATS, NESTED_BLOCK_SIZE, QuantizedArray

__all__ = ["quantize", "quantize_streaming", "dequantize", "dequantize_absmax"]

# The float dtypes the library takes for weights and compute (one definition, imported where needed).
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
# Rows are quantized in chunks of about this many elements (16 MiB of float32).
_CHUNK_ELEMENTS = 1 << 20
# `quantize_streaming` reads and quantizes rows in chunks of about this many bytes of input (4M bfloat16 elements):
# one chunk's input and codes stay in a core's cache, and a call does enough work to hide its dispatch.
_STREAM_CHUNK_BYTES = 8 << 20
# Above 2**126 the float32 reciprocal 1/absmax is subnormal, which XLA on CPU
# flushes to zero; such blocks divide instead of multiplying by the reciprocal.
_RECIPROCAL_LIMIT = np.float32(2.0**126)
# bitsandbytes clamps a partial block's absmax at 1e-38 (a float32 subnormal).
# It is written by its bits so that no float operation can flush it.
_CLAMP_BITS = np.int32(np.float32(1e-38).view(np.int32))


def quantize(
    x: jax.Array | np.ndarray,
    fmt: str,
    block_size: int = 64,
    double_quant: bool = False,
    *,
    contract_axes: Sequence[int] | None = None,
) -> QuantizedArray:
    """Quantizes a kernel blockwise along its input axis.

    For a Flax kernel `[in, out]` the codes and absmax are bit-identical to
    `bitsandbytes.functional.quantize_4bit(kernel.T, ...)` ("nf4", "fp4"). With
    double quantization the 4-bit codes are identical too; the 8-bit absmax
    codes are always the nearest table value, where bitsandbytes' approximate
    CPU search sometimes picks the second nearest (one step away). The
    formats "int4" (symmetric, codes -7..7 scaled by absmax/7, stored as
    code + 8) and "int8" (codes -127..127 scaled by absmax/127, one byte each)
    use the same blocks. Values are rounded to nearest, ties to the lower
    code ("nf4", "fp4") or to even ("int4", "int8").

    Called eagerly, non-finite weights raise `ValueError`. Under `jax.jit` the
    values cannot be inspected: a block holding NaN gets a NaN absmax, so the
    failure shows in the result rather than being hidden.

    Float32 subnormals (|x| < 1.18e-38) count as zero: XLA on CPU flushes them.
    bitsandbytes keeps them, so a block whose largest magnitude is subnormal
    differs from it (its values are below 1e-38 either way).

    Args:
        x: Kernel, float32, bfloat16 or float16, at least 1-D.
        fmt: "nf4", "fp4", "int4" or "int8".
        block_size: Elements per block: 32 or a power of two from 64 to 4096.
        double_quant: Also quantize the per-block absmax to 8 bits (blocks of
            256, offset by their mean), as bitsandbytes' `compress_statistics`.
        contract_axes: Axes of `x` that a matmul contracts (the input axes);
            default `(0,)`, the first axis of a Flax `[in, out]` kernel.

    Returns:
        A `QuantizedArray`.

    Raises:
        ValueError: Unknown `fmt`, unsupported `block_size`, a dtype or rank of
            `x` that cannot be quantized, bad `contract_axes`, or NaN/Inf in `x`.

    Example:
        >>> import jax, qlora_jax as qj
        >>> kernel = jax.random.normal(jax.random.key(0), (256, 128))
        >>> q = qj.quantize(kernel, "nf4", block_size=64, double_quant=True)
        >>> qj.dequantize(q).shape
        (256, 128)
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size: {block_size!r} is not supported; expected one of {BLOCK_SIZES}")
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        x = np.asarray(x)
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} cannot be quantized; expected float32, bfloat16 or float16")
    axes = _normalize_contract_axes(contract_axes, tuple(x.shape))
    if math.prod(x.shape) == 0:
        raise ValueError(f"x: shape {tuple(x.shape)} has no elements to quantize")
    x = jnp.asarray(x)
    if not isinstance(x, jax.core.Tracer):
        _check_finite(x)
    return _quantize_jit(x, fmt, block_size, bool(double_quant), axes)


def quantize_streaming(
    rows: Any,
    fmt: str,
    block_size: int = 64,
    double_quant: bool = False,
    *,
    as_kernel: bool = False,
    chunk_elements: int | None = None,
) -> QuantizedArray:
    """Quantizes a matrix in storage order `[out, in]` a chunk of rows at a time (eagerly).

    `rows` is anything with `shape` (2-D), `dtype` and row slicing
    `rows[start:stop]` that returns an array: a NumPy or JAX array, a memory
    map, or a lazy reader of a checkpoint tensor. Blocks run along each row
    (`in`, e.g. a PyTorch weight `[out, in]`). Chunks of about `chunk_elements`
    are fetched one after the other and quantized by one jitted program each
    (dispatched asynchronously, so the next chunk is fetched while the last one
    is quantized); only a few chunks of full-precision rows are alive at a
    time, and the scales are double-quantized once all chunks are in. The
    result is bit for bit `quantize(rows[:], ..., contract_axes=(1,))`. When
    `in` is not a multiple of `block_size`, blocks straddle rows (flat
    layout) and each chunk is a multiple of `block_size / gcd(in, block_size)`
    rows, so that it holds whole blocks.

    Args:
        rows: The matrix `[out, in]`, float32, bfloat16 or float16.
        fmt: "nf4", "fp4", "int4" or "int8".
        block_size: Elements per block (as `quantize`).
        double_quant: Also quantize the per-block absmax (as `quantize`).
        as_kernel: Return the Flax kernel `rows.T` (`[in, out]`, contract_axes
            `(0,)`), whose storage is the same bytes; else `rows` itself
            (`[out, in]`, contract_axes `(1,)`).
        chunk_elements: Elements per chunk (whole rows; at least one row);
            default 8 MiB of input.

    Returns:
        A `QuantizedArray`.

    Raises:
        ValueError: As `quantize`; non-finite values name the chunk's rows
            (`"rows 16:24: x: contains 1 non-finite value(s) ..."`, the index
            counted within the chunk).

    Example:
        >>> import jax, numpy as np, qlora_jax as qj
        >>> from qlora_jax._src.formats.blockwise import quantize_streaming
        >>> weight = np.random.default_rng(0).standard_normal((96, 128), np.float32)  # PyTorch [out, in]
        >>> q = quantize_streaming(weight, "nf4", 64, double_quant=True, as_kernel=True, chunk_elements=4096)
        >>> q.shape, q.contract_axes
        ((128, 96), (0,))
        >>> ref = qj.quantize(weight.T, "nf4", 64, double_quant=True)
        >>> all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(ref)))
        True
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size: {block_size!r} is not supported; expected one of {BLOCK_SIZES}")
    if len(rows.shape) != 2:
        raise ValueError(f"rows: expected a matrix [out, in], got shape {tuple(rows.shape)}")
    dtype = np.dtype(rows.dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"rows: dtype {dtype} cannot be quantized; expected float32, bfloat16 or float16")
    n_rows, length = (int(d) for d in rows.shape)
    if n_rows * length == 0:
        raise ValueError(f"rows: shape {(n_rows, length)} has no elements to quantize")

    def relabel(q: QuantizedArray) -> QuantizedArray:
        return dataclasses.replace(q, shape=(length, n_rows), contract_axes=(0,)) if as_kernel else q

    step = max(1, (chunk_elements or _STREAM_CHUNK_BYTES // dtype.itemsize) // length)
    flat = length % block_size != 0
    if flat:
        # Blocks cross rows (flat layout): a chunk is a multiple of `unit` rows, whole blocks, so that every chunk
        # starts a block; the last one holds the partial last block.
        unit = block_size // math.gcd(length, block_size)
        step = max(unit, step // unit * unit)
    # 16-bit NumPy rows go in as their 32-bit words (a view), which the kernel reads without reformatting.
    words = dtype.itemsize == 2 and fmt != "int8" and not flat
    chunks, outputs = [], []
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        chunk = rows[start:stop]
        if words and isinstance(chunk, np.ndarray):
            chunk = np.ascontiguousarray(chunk).view(np.uint32)
        if len(outputs) >= 2:  # at most two chunks queued behind the running one
            jax.block_until_ready(outputs[-2])
        quantize_chunk = _quantize_flat_chunk if flat else _quantize_chunk
        outputs.append(quantize_chunk(chunk, fmt, block_size, dtype))
        chunks.append((start, stop))
        del chunk
    codes, absmax, nested_absmax, nested_offset, bad = _assemble(outputs, double_quant)
    del outputs
    if bad.any():  # `quantize` on the first chunk with non-finite values says which and where
        start, stop = chunks[int(np.argmax(np.asarray(bad)))]
        try:
            quantize(rows[start:stop], fmt, block_size, contract_axes=(1,))
        except ValueError as e:
            raise ValueError(f"rows {start}:{stop}: {e}") from None
    return relabel(QuantizedArray(codes=codes, absmax=absmax, nested_absmax=nested_absmax,
                                  nested_offset=nested_offset, fmt=fmt, block_size=block_size,
                                  shape=(n_rows, length), dtype=dtype, contract_axes=(1,)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_chunk(rows: jax.Array, fmt: str, block_size: int, dtype: np.dtype
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`quantize_streaming`'s program per chunk: codes, float32 absmax and whether a block is not finite."""
    codes, absmax = _quantize_rows(rows, fmt=fmt, block_size=block_size, dtype=dtype)
    return codes, absmax, jnp.any(~jnp.isfinite(absmax))  # a NaN or Inf makes its block's absmax one


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_flat_chunk(rows: jax.Array, fmt: str, block_size: int, dtype: np.dtype
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`quantize_streaming`'s program per chunk of a matrix in flat layout (rows `[r, L]`, `r * L` whole blocks
    but for the last chunk): the flat codes, float32 absmax and whether a value is not finite."""
    rows = rows.astype(dtype)
    codes, absmax = _quantize_flat(_as_bits(rows.reshape(-1)), dtype, fmt, block_size)
    return codes, absmax, ~jnp.all(jnp.isfinite(rows))


@functools.partial(jax.jit, static_argnums=1)
def _assemble(outputs: list, double_quant: bool):
    """The chunks' codes and absmax concatenated, the absmax double-quantized, and each chunk's non-finite flag."""
    codes = jnp.concatenate([c for c, _, _ in outputs])
    absmax = jnp.concatenate([a for _, a, _ in outputs])
    bad = jnp.stack([b for _, _, b in outputs])
    nested_absmax = nested_offset = None
    if double_quant:
        flat_codes, nested_absmax, nested_offset = _double_quantize(absmax.reshape(-1))
        absmax = flat_codes.reshape(absmax.shape)
    return codes, absmax, nested_absmax, nested_offset, bad


def dequantize(q: QuantizedArray, dtype: jnp.dtype | None = None) -> jax.Array:
    """Reconstructs the kernel: `codebook[code] * absmax` in float32, then cast.

    Args:
        q: A `QuantizedArray`, possibly with leading stack dimensions.
        dtype: Output dtype; default `q.dtype`, the dtype the kernel had.

    Returns:
        An array of shape `(*q.stack_shape, *q.shape)`.

    Example:
        >>> import jax.numpy as jnp, qlora_jax as qj
        >>> q = qj.quantize(jnp.full((64, 2), 0.5), "nf4")
        >>> float(qj.dequantize(q)[0, 0])
        0.5
    """
    return _dequantize_jit(q, q.dtype if dtype is None else np.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_jit(q: QuantizedArray, dtype: np.dtype) -> jax.Array:
    stack = q.stack_shape
    w = dequantize_stored(q, dtype)
    # Storage order is (*out axes, *contract axes); undo that permutation.
    inverse = np.argsort(storage_order(q))
    return jnp.transpose(w, (*range(len(stack)), *(len(stack) + int(i) for i in inverse)))


def storage_order(q: QuantizedArray) -> tuple[int, ...]:
    """The kernel's axes in storage order: the non-contracted axes, then `contract_axes`."""
    return _storage_order(len(q.shape), q.contract_axes)


def dequantize_halves(q: QuantizedArray, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
    """A 4-bit kernel in row layout, dequantized as its even and odd input columns.

    Returns `(even, odd)`, each `[*stack, *out_shape, in // 2]`: the high and
    low nibbles of every byte, `codebook[code] * absmax` in float32, then cast;
    interleaved along the last axis they are `dequantize_stored(q, dtype)`
    exactly. Products with `x[..., 0::2]` and `x[..., 1::2]` skip the
    interleaving, which costs more than the table lookup on CPU.
    """
    if q.bits != 4 or not q.row_layout:
        raise ValueError(f"q: dequantize_halves needs a 4-bit kernel in row layout; got {q.fmt}, shape {q.shape}, "
                         f"block_size {q.block_size}")
    return halves_from_codes(q.codes, dequantize_absmax(q), q.fmt, q.block_size, dtype)


def halves_from_codes(codes: jax.Array, absmax: jax.Array, fmt: str, block_size: int,
                      dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
    """`dequantize_halves` of any rows of a 4-bit row-layout kernel: packed `codes [..., in // 2]` and their float32
    `absmax [..., in // block_size]` (from `dequantize_absmax`) -> `(even, odd)`, each `[..., in // 2]`."""
    table = jnp.asarray(codebooks.codebook(fmt))
    absmax = absmax[..., None]  # [..., in // bs, 1]

    def half(nibbles: jax.Array) -> jax.Array:
        values = table.at[nibbles.astype(jnp.int32)].get(mode="promise_in_bounds")
        blocks = values.reshape(*values.shape[:-1], -1, block_size // 2)
        return (blocks * absmax).reshape(values.shape).astype(dtype)

    return half(codes >> 4), half(codes & 0xF)


def dequantize_permuted(q: QuantizedArray, dtype: np.dtype) -> jax.Array:
    """A 4-bit kernel in row layout, dequantized with its even input columns first, then the odd ones.

    Returns `[*stack, *out_shape, in]`: the high nibbles of every byte (input
    columns 0, 2, 4, ...), then the low ones (1, 3, 5, ...), `codebook[code] *
    absmax` in float32, then cast. Products with `x`'s columns permuted the same
    way skip interleaving the nibbles, which costs more than the table lookup
    on CPU.
    """
    if q.bits != 4 or not q.row_layout:
        raise ValueError(f"q: dequantize_permuted needs a 4-bit kernel in row layout; got {q.fmt}, shape {q.shape}, "
                         f"block_size {q.block_size}")
    table = jnp.asarray(codebooks.codebook(q.fmt))
    absmax = dequantize_absmax(q)[..., None, :, None]  # [*stack, *out, 1, in // bs, 1]
    codes = jnp.concatenate([q.codes >> 4, q.codes & 0xF], axis=-1)  # [*stack, *out, in]
    values = table.at[codes.astype(jnp.int32)].get(mode="promise_in_bounds")
    blocks = values.reshape(*q.codes.shape[:-1], 2, -1, q.block_size // 2)  # [..., half, in // bs, bs // 2]
    return (blocks * absmax).reshape(values.shape).astype(dtype)


def dequantize_stored(q: QuantizedArray, dtype: np.dtype) -> jax.Array:
    """The dequantized kernel in storage order, `[*stack, *(q.shape[a] for a in storage_order(q))]`.

    `dequantize` without its final transpose (for a 2-D kernel: `[out, in]`,
    the PyTorch layout); products contract it directly (no transposed copy).
    """
    stack = q.stack_shape
    absmax = dequantize_absmax(q)  # [*stack, *absmax_shape]
    if q.bits == 4:
        table = jnp.asarray(codebooks.codebook(q.fmt))
        codes = jnp.stack([q.codes >> 4, q.codes & 0xF], axis=-1)
        codes = codes.reshape(*q.codes.shape[:-1], 2 * q.codes.shape[-1])
        values = table[codes.astype(jnp.int32)]
    else:
        values = q.codes.astype(jnp.float32)
        absmax = absmax * np.float32(1 / 127)
    if q.row_layout:
        # [*stack, *out, in // bs, bs] * [*stack, *out, in // bs, 1]
        blocks = values.reshape(*values.shape[:-1], -1, q.block_size)
        w = (blocks * absmax[..., None]).reshape(*stack, *q.out_shape, q.in_size)
    else:
        padded = q.n_blocks * q.block_size
        flat = values[..., : q.size]
        flat = jnp.pad(flat, [(0, 0)] * len(stack) + [(0, padded - q.size)])
        w = (flat.reshape(*stack, q.n_blocks, q.block_size) * absmax[..., None]).reshape(*stack, padded)
        w = w[..., : q.size]
    return w.reshape(*stack, *(q.shape[a] for a in storage_order(q))).astype(dtype)


def dequantize_absmax(q: QuantizedArray) -> jax.Array:
    """The float32 per-block absmax of `q`, undoing double quantization.

    With double quantization, `dynamic_map[code] * nested_absmax[i // 256]` is
    rounded to float32 before `nested_offset` is added, as bitsandbytes does.

    Args:
        q: A `QuantizedArray`.

    Returns:
        Float32 array shaped like `q.absmax`.

    Example:
        >>> import jax.numpy as jnp, qlora_jax as qj
        >>> q = qj.quantize(jnp.ones((64, 4)), "nf4", double_quant=True)
        >>> qj.dequantize_absmax(q).shape
        (4, 1)
    """
    if not q.double_quant:
        return q.absmax
    stack = q.stack_shape
    n, nb = q.n_blocks, q.nested_absmax.shape[-1]
    table = jnp.asarray(codebooks.DYNAMIC_SIGNED)
    vals = table[q.absmax.reshape(*stack, n).astype(jnp.int32)]
    vals = jnp.pad(vals, [(0, 0)] * len(stack) + [(0, nb * NESTED_BLOCK_SIZE - n)])
    scaled = vals.reshape(*stack, nb, NESTED_BLOCK_SIZE) * q.nested_absmax[..., None]
    absmax = _rounded(scaled, q.nested_absmax[..., None]) + q.nested_offset[..., None, None]
    return absmax.reshape(*stack, nb * NESTED_BLOCK_SIZE)[..., :n].reshape(q.absmax.shape)


# -- implementation ---------------------------------------------------------


def _rounded(product: jax.Array, factor: jax.Array) -> jax.Array:
    """`product`, kept from being contracted with a following add into an FMA.

    XLA on CPU lets LLVM fuse `a * b + c` into one FMA (one rounding instead of
    bitsandbytes' two); optimization barriers do not survive to LLVM. Adding an
    integer zero to the product's bits that the compiler cannot prove to be
    zero (it is 1 only for one NaN payload of `factor`) separates the two.
    """
    zero = (lax.bitcast_convert_type(factor, jnp.int32) == np.int32(0x7FC00001)).astype(jnp.int32)
    bits = lax.bitcast_convert_type(product, jnp.int32) + zero
    return lax.bitcast_convert_type(bits, jnp.float32)


def _normalize_contract_axes(contract_axes: Sequence[int] | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("x: a scalar cannot be blocked; quantize needs at least a 1-D kernel")
    if contract_axes is None:
        return (0,)
    try:
        axes = tuple(int(a) for a in contract_axes)
    except TypeError:
        raise ValueError(f"contract_axes: expected a sequence of ints, got {contract_axes!r}") from None
    if not axes:
        raise ValueError("contract_axes: empty; at least one input axis is needed to form blocks")
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"contract_axes: axis {a} is out of range for x of shape {shape}")
    axes = tuple(a % ndim for a in axes)
    if len(set(axes)) != len(axes):
        raise ValueError(f"contract_axes: repeated axis in {tuple(contract_axes)}")
    return axes


def _storage_order(ndim: int, contract_axes: tuple[int, ...]) -> tuple[int, ...]:
    """Axis order of the stored matrix: the output axes, then the contracted ones."""
    return (*(i for i in range(ndim) if i not in contract_axes), *contract_axes)


def _check_finite(x: jax.Array) -> None:
    count, first = _count_non_finite(x)
    count = int(count)
    if count:
        index = tuple(int(i) for i in np.unravel_index(int(first), x.shape))
        value = float(x[index])
        raise ValueError(f"x: contains {count} non-finite value(s) (NaN or Inf); "
                         f"the first is {value} at index {index} of shape {tuple(x.shape)}")


@jax.jit
def _count_non_finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    bad = ~jnp.isfinite(x.reshape(-1))
    return jnp.sum(bad, dtype=jnp.int32), jnp.argmax(bad)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_jit(x, fmt, block_size, double_quant, contract_axes):
    return _quantize_impl(x, fmt, block_size, double_quant, contract_axes)


def _quantize_impl(x: jax.Array, fmt: str, block_size: int, double_quant: bool,
                   contract_axes: tuple[int, ...]) -> QuantizedArray:
    shape = tuple(x.shape)
    in_shape = tuple(shape[a] for a in contract_axes)
    out_shape = tuple(d for i, d in enumerate(shape) if i not in contract_axes)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    # [in, out]: a free reshape when the contracted axes lead (Dense, LinearGeneral).
    lead = (*contract_axes, *(i for i in range(len(shape)) if i not in contract_axes))
    x2 = jnp.transpose(x, lead).reshape(n_in, n_out)
    if n_in % block_size == 0:
        # Row layout: each output column of the kernel is one row of blocks.
        rows = functools.partial(_columns_as_rows, _as_bits(x2), x.dtype)
        codes, absmax = _map_rows(rows, n_out, n_in, functools.partial(_quantize_rows, fmt=fmt, block_size=block_size))
        codes = codes.reshape(*out_shape, codes.shape[-1])
        absmax = absmax.reshape(*out_shape, absmax.shape[-1])
    else:
        codes, absmax = _quantize_flat(_as_bits(x2.T.reshape(-1)), x.dtype, fmt, block_size)
    nested_absmax = nested_offset = None
    if double_quant:
        flat_codes, nested_absmax, nested_offset = _double_quantize(absmax.reshape(-1))
        absmax = flat_codes.reshape(absmax.shape)
    return QuantizedArray(codes=codes, absmax=absmax, nested_absmax=nested_absmax, nested_offset=nested_offset,
                          fmt=fmt, block_size=block_size, shape=shape, dtype=x.dtype, contract_axes=contract_axes)


def _as_bits(x: jax.Array) -> jax.Array:
    """16-bit floats as their uint16 bits, so that slicing them stays a copy of bytes.

    XLA on CPU computes bfloat16/float16 ops in float32: a slice of a 16-bit
    kernel inside the chunk loop becomes a float32 copy of the whole kernel,
    hoisted out of the loop. Slicing the bits costs one 16-bit copy instead.
    """
    return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _bits_to_float32(bits: jax.Array, dtype: np.dtype) -> jax.Array:
    x = lax.bitcast_convert_type(bits, dtype) if bits.dtype == jnp.uint16 else bits
    return x.astype(jnp.float32)


def _bits_as(bits: jax.Array, dtype: np.dtype) -> jax.Array:
    """`_as_bits` undone: the 16-bit floats of `bits` (a bitcast, no conversion)."""
    return lax.bitcast_convert_type(bits, dtype) if bits.dtype == jnp.uint16 else bits


def _columns_as_rows(bits: jax.Array, dtype: np.dtype, start, size: int) -> jax.Array:
    """Columns `start:start+size` of `bits [in, out]` (see `_as_bits`) as rows `[size, in]` of `dtype`."""
    return _bits_as(lax.dynamic_slice_in_dim(bits, start, size, axis=1).T, dtype)


def _map_rows(rows, n_rows: int, row_len: int, fn):
    """Applies `fn` to `rows(start, size)` in chunks of rows and concatenates.

    Only one chunk is live at a time, so quantizing a kernel needs temporaries
    of about `_CHUNK_ELEMENTS` floats, not several copies of the kernel.
    """
    chunk = max(1, min(n_rows, _CHUNK_ELEMENTS // row_len))
    n_full, rem = divmod(n_rows, chunk)
    parts = []
    if n_full == 1:
        parts.append(fn(rows(0, chunk)))
    elif n_full > 1:
        mapped = lax.map(lambda i: fn(rows(i * chunk, chunk)), jnp.arange(n_full))
        parts.append(jax.tree.map(lambda a: a.reshape(n_full * chunk, *a.shape[2:]), mapped))
    if rem:
        parts.append(fn(rows(n_full * chunk, rem)))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *parts)


def _quantize_rows(rows: jax.Array, *, fmt: str, block_size: int, dtype: np.dtype | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """Quantizes `rows [r, L]` (float32, bfloat16 or float16; L a multiple of the block size).

    16-bit rows may also come as `uint32` words `[r, L // 2]` holding two
    elements each (a free view of the row bytes, e.g. NumPy's `.view(np.uint32)`),
    with `dtype` naming the 16-bit type; the kernel then reads them without a
    reformatting copy.

    Returns codes `[r, L // 2]` (4-bit, packed) or `[r, L]` (int8) and float32
    absmax `[r, L // block_size]`.

    The 4-bit codes of the even and odd elements (a byte's high and low
    nibble) are computed from two separate `[r, L // bs, bs // 2]` arrays, so
    that the whole kernel is one elementwise loop over contiguous memory, which
    XLA vectorizes and splits across threads; a packing step reading elements
    `2i` and `2i + 1` of one array does not vectorize. The common case (no
    absmax above `_RECIPROCAL_LIMIT`) runs without the division path.
    """
    if rows.dtype == jnp.uint32:
        rows_dtype = np.dtype(dtype)
        r, length = rows.shape[0], 2 * rows.shape[1]
    else:
        rows_dtype = np.dtype(rows.dtype)
        r, length = rows.shape
    n_blocks = length // block_size
    if fmt == "int8":
        if rows.dtype == jnp.uint32:
            rows = lax.bitcast_convert_type(rows, jnp.uint16).reshape(r, length)
            rows = lax.bitcast_convert_type(rows, rows_dtype)
        blocks = lambda: rows.astype(jnp.float32).reshape(r, n_blocks, block_size)  # noqa: E731
        absmax = _block_absmax(blocks())
        codes = lax.cond(jnp.any(absmax > _RECIPROCAL_LIMIT),
                         lambda: _encode(_scale(blocks(), absmax, fmt, divide=True), fmt),
                         lambda: _encode(_scale(blocks(), absmax, fmt, divide=False), fmt))
        return codes.reshape(r, length), absmax
    absmax = _block_absmax(*_even_odd(rows, block_size, rows_dtype))  # [r, L // bs]

    def encode(divide: bool) -> jax.Array:
        # The halves are formed inside each branch: as operands of the conditional they would be materialized.
        even, odd = _even_odd(rows, block_size, rows_dtype)  # [r, L // bs, bs // 2] each, float32
        high, low = (_nibbles(_scale(v, absmax, fmt, divide=divide), fmt) for v in (even, odd))
        return ((high << 4) | low).reshape(r, length // 2)

    codes = lax.cond(jnp.any(absmax > _RECIPROCAL_LIMIT), lambda: encode(True), lambda: encode(False))
    return codes, absmax


def _even_odd(rows: jax.Array, block_size: int, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
    """The even and odd elements of `rows` per block, each float32 `[r, L // bs, bs // 2]`.

    `rows` as `_quantize_rows` takes them: `[r, L]` of `dtype`, or 16-bit
    floats as `uint32` words `[r, L // 2]`. 16-bit rows are read as 32-bit
    words (one even and one odd element each, the even one in the low half),
    so both halves come from contiguous loads.
    """
    r = rows.shape[0]
    length = rows.shape[1] * (2 if rows.dtype == jnp.uint32 else 1)
    shape = (r, length // block_size, block_size // 2)
    if dtype.itemsize == 2:
        if rows.dtype != jnp.uint32:
            rows = lax.bitcast_convert_type(rows.reshape(r, length // 2, 2), jnp.uint32)
        words = rows.reshape(shape)
        if dtype == jnp.bfloat16:  # bfloat16 -> float32 is a 16-bit shift of the bits
            return (lax.bitcast_convert_type(words << 16, jnp.float32),
                    lax.bitcast_convert_type(words & np.uint32(0xFFFF0000), jnp.float32))
        halves = ((words & np.uint32(0xFFFF)).astype(jnp.uint16), (words >> 16).astype(jnp.uint16))
        return tuple(lax.bitcast_convert_type(h, dtype).astype(jnp.float32) for h in halves)
    pairs = rows.astype(jnp.float32).reshape(*shape, 2)
    return pairs[..., 0], pairs[..., 1]


def _block_absmax(*parts: jax.Array) -> jax.Array:
    """`max |x|` over the last axis of `parts` (together), float32 `[..., n_blocks]`.

    Taken over the bits: for non-negative floats the integer order of the bits
    is the float order, and an integer maximum vectorizes where a float one
    (which must propagate NaN) does not. A NaN anywhere gives a NaN (its bits
    exceed Inf's); a subnormal maximum reads as 0, as XLA's float operations
    on CPU (flush to zero) see it.
    """
    bits = [lax.bitcast_convert_type(p, jnp.int32) & np.int32(0x7FFFFFFF) for p in parts]
    top = jnp.max(functools.reduce(jnp.maximum, bits), axis=-1)
    top = jnp.where(top < np.int32(0x00800000), np.int32(0), top)
    return lax.bitcast_convert_type(top, jnp.float32)


def _scale(x: jax.Array, absmax: jax.Array, fmt: str, *, divide: bool) -> jax.Array:
    """bitsandbytes' `x * (1 / max(absmax, 1e-38))` per block under flush-to-zero, `x [..., nb, k]`.

    A zero or subnormal absmax means the block reads as zeros (its values are
    flushed too): scaled 0. Above 2**126 the reciprocal would be subnormal and
    flush to zero, so with `divide` those blocks divide. Clipped to [-1, 1]
    where the codes are rounded ("int4", "int8"); the 4-bit codebook formats
    compare with bounds inside (-1, 1), where clipping changes nothing.
    """
    normal = (absmax >= codebooks.FLOAT32_TINY)[..., None]
    inv = (np.float32(1) / jnp.where(absmax >= codebooks.FLOAT32_TINY, absmax, np.float32(1)))[..., None]
    scaled = jnp.where(normal, x * inv, np.float32(0))
    if divide:
        big = (absmax > _RECIPROCAL_LIMIT)[..., None]
        scaled = jnp.where(big, _divide(x, absmax[..., None]), scaled)
    return jnp.clip(scaled, -1, 1) if fmt in ("int4", "int8") else scaled


def _divide(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a / b` rounded as a true division.

    XLA rewrites a division by a broadcast value into a multiplication by its
    reciprocal, which rounds differently; the barrier keeps the division.
    """
    return a / lax.optimization_barrier(jnp.broadcast_to(b, a.shape))


def _nibbles(scaled: jax.Array, fmt: str) -> jax.Array:
    """4-bit codes (uint8, one per element) of `scaled` in [-1, 1] ("nf4", "fp4", "int4")."""
    if fmt == "int4":
        return (jnp.round(jnp.clip(scaled, -1, 1) * np.float32(7)) + 8).astype(jnp.uint8)
    # torch.bucketize(scaled, bounds): the number of the 15 sorted bounds strictly below, found by a binary
    # search of four compares against selected bounds (fewer operations than 15 compares, all elementwise).
    bounds = [np.float32(b) for b in codebooks.sorted_bounds(fmt)]
    above = []  # the search's answers, most significant first
    for step in (8, 4, 2, 1):
        above.append(scaled > _pick(above[:], [bounds[base + step - 1] for base in range(0, 16, 2 * step)]))
    codes = functools.reduce(lambda acc, bit: (acc << 1) | bit.astype(jnp.uint8), above, jnp.uint8(0))
    if fmt == "fp4":
        codes = jnp.asarray(codebooks.FP4_SORT_ORDER)[codes.astype(jnp.int32)]
    return codes


def _pick(bits: list[jax.Array], values: list) -> jax.Array:
    """`values[n]` where `n` is the binary number `bits` (most significant first) form, by nested selects."""
    if not bits:
        return values[0]
    half = len(values) // 2
    return jnp.where(bits[0], _pick(bits[1:], values[half:]), _pick(bits[1:], values[:half]))


def _encode(scaled: jax.Array, fmt: str) -> jax.Array:
    """Codes of `scaled [..., L]` in [-1, 1]; 4-bit codes packed two per byte."""
    if fmt == "int8":
        return jnp.round(jnp.clip(scaled, -1, 1) * np.float32(127)).astype(jnp.int8)
    codes = _nibbles(scaled, fmt)
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] << 4) | pairs[..., 1]


def _quantize_flat(bits: jax.Array, dtype: np.dtype, fmt: str, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Flat layout: full blocks as rows, then bitsandbytes' partial last block.

    The partial block divides by `max(max |x|, 1e-38)` (stored clamped), and an
    odd element count appends one code for 0.0 before packing.
    """
    n = bits.shape[0]
    n_full = n // block_size
    codes, absmax = [], []
    if n_full:
        rows = lambda start, size: _bits_as(lax.dynamic_slice_in_dim(  # noqa: E731
            bits, start * block_size, size * block_size).reshape(size, block_size), dtype)
        c, a = _map_rows(rows, n_full, block_size, functools.partial(_quantize_rows, fmt=fmt, block_size=block_size))
        codes.append(c.reshape(-1))
        absmax.append(a.reshape(-1))
    tail = _bits_to_float32(bits[n_full * block_size:], dtype)
    if tail.shape[0]:
        m = jnp.max(jnp.abs(tail))
        normal = m >= codebooks.FLOAT32_TINY
        scaled = jnp.clip(jnp.where(normal, _divide(tail, jnp.where(normal, m, np.float32(1))), np.float32(0)), -1, 1)
        if scaled.shape[0] % 2 and fmt != "int8":
            scaled = jnp.pad(scaled, (0, 1))
        codes.append(_encode(scaled, fmt))
        m_bits = jnp.where(normal, lax.bitcast_convert_type(m, jnp.int32), _CLAMP_BITS)
        absmax.append(lax.bitcast_convert_type(m_bits, jnp.float32)[None])
    return jnp.concatenate(codes), jnp.concatenate(absmax)


def _double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """8-bit blockwise quantization of `absmax - mean(absmax)`, blocks of 256.

    Per block `m = max |v|`, `normed = v / m`, and the nearest value of the
    signed dynamic map (a tie goes to the lower one); an all-zero block gets
    code 0 and `m = 0`, as in bitsandbytes.
    """
    n = absmax.shape[0]
    nb = -(-n // NESTED_BLOCK_SIZE)
    # The barrier makes the mean a reduction over a plain buffer, so its
    # summation order does not depend on how the absmax was produced (chunks).
    offset = jnp.mean(lax.optimization_barrier(absmax))
    v = jnp.pad(absmax - offset, (0, nb * NESTED_BLOCK_SIZE - n)).reshape(nb, NESTED_BLOCK_SIZE)
    m = jnp.max(jnp.abs(v), axis=-1, keepdims=True)  # [nb, 1]
    nonzero = m >= codebooks.FLOAT32_TINY
    normed = _divide(v, jnp.where(nonzero, m, np.float32(1)))
    table = jnp.asarray(codebooks.DYNAMIC_SIGNED)
    hi = jnp.clip(jnp.searchsorted(table, normed, side="left"), 1, table.shape[0] - 1)
    lo = hi - 1
    pick_hi = (table[hi] - normed) < (normed - table[lo])
    codes = jnp.where(nonzero, jnp.where(pick_hi, hi, lo), 0).astype(jnp.uint8)
    return codes.reshape(-1)[:n], m.reshape(nb), offset

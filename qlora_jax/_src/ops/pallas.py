"""Pallas kernels for `qmatmul`: read packed codes, expand them in-kernel.

Both kernels compute `y[m, n] = sum_k x[m, k] * codebook[code[n, k]] * absmax[n, k // bs]`
from the row layout of a `QuantizedArray` (`codes [N, K//2]`, two codes per
byte, the first element in the high nibble; int8: `[N, K]`), without writing a
dequantized weight to device memory:

* The activations are split outside the kernel into even and odd input columns
  (`x[:, 0::2]`, `x[:, 1::2]`, one cheap pass over `x`), so the high and low
  nibbles of a byte tile each meet a contiguous activation tile and the kernel
  never has to interleave them.
* Codes are looked up in registers (GPU) or vector memory (TPU) with a
  four-level select tree over the code's bits, cast to the compute dtype, and
  multiplied with the activation tile on the tensor core / MXU, accumulating
  in float32. The per-block scale is applied to each block's partial product
  (`(x_blk @ codebook[codes_blk].T) * absmax_blk`), so scales never need to be
  broadcast along the input axis.
* Per-block scales are passed as a float32 `[K // bs, N]` array computed
  outside the kernel (double quantization undone there: `N * K / bs` floats,
  1/16 of the weight's elements at block 64).

The GPU kernel (Triton lowering) runs a `fori_loop` over the input axis inside
each `(bm, bn)` output tile; the TPU kernel (Mosaic) puts the input axis on the
grid (`"arbitrary"`) and accumulates in a VMEM scratch. Each has one tile shape
for small M (decoding) and one for large M (training). Both run on CPU with
`interpret=True`, which is how the test suite checks them against the
reference.

The backward pass of a Pallas forward is the "xla" recomputation (see
`qmatmul`): gradients flow to `x` only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from qlora_jax._src.formats import codebooks
from qlora_jax._src.formats.blockwise import FLOAT_DTYPES, dequantize_absmax
from qlora_jax._src.formats.qarray import QuantizedArray

__all__ = ["Support", "Tiles", "tiles_for", "GPU_TILES", "TPU_TILES", "SMALL_M", "can_use_pallas_gpu",
           "can_use_pallas_tpu", "pallas_matmul"]



@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile shape of a Pallas `qmatmul` kernel.

    Attributes:
        bm: Rows of `x` per tile (M is padded up to a multiple).
        bn: Output columns per tile; the largest of `bn`, `bn/2`, ... that
            divides N (down to the backend's minimum) is used.
        bk: Input elements per step; the largest power of two <= `bk` that
            divides K is used (down to the backend's minimum).
    """

    bm: int
    bn: int
    bk: int


# M <= SMALL_M uses the "small" (decode) tiles, larger M the "large" (training) ones.
SMALL_M = 64
GPU_TILES = {"small": Tiles(bm=16, bn=64, bk=256), "large": Tiles(bm=64, bn=128, bk=128)}
TPU_TILES = {"small": Tiles(bm=16, bn=512, bk=512), "large": Tiles(bm=256, bn=256, bk=512)}
# Smallest tile dims each backend accepts: Triton dots need 16; TPU tiles are
# (8k, 128) vregs, so output tiles are multiples of 128 lanes and packed-code
# tiles (bk / 2 lanes) too, unless they span the whole axis.
_MIN_BN = {"gpu": 16, "tpu": 128}
_MIN_BK = {"gpu": 32, "tpu": 256}


@dataclasses.dataclass(frozen=True)
class Support:
    """Whether a Pallas kernel can run `qmatmul(x, q)`, and why not.

    Truthy when `ok`. `reason` is empty when `ok`, else says what rules the
    kernel out (the "auto" path logs it when it falls back to "xla").
    """

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def can_use_pallas_gpu(x: jax.Array, q: QuantizedArray, *, interpret: bool = False) -> Support:
    """Whether the Pallas GPU (Triton) kernel can compute `qmatmul(x, q)`.

    Requires a GPU default backend (unless `interpret`), a 2-D unstacked kernel
    in row layout (input size a multiple of the block size), float32/bfloat16/
    float16 activations and an output size that is a multiple of 16.

    Args:
        x: Activations `[..., in]` (an array or `jax.ShapeDtypeStruct`).
        q: The quantized kernel.
        interpret: Whether the kernel would run in Pallas interpret mode (any backend).

    Returns:
        A `Support`; falsy with a reason when the kernel cannot be used.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> q = qj.quantize(jnp.ones((128, 64)), "nf4")
        >>> qj.can_use_pallas_gpu(jnp.ones((4, 128)), q, interpret=True)
        Support(ok=True, reason='')
    """
    return _support("gpu", x, q, interpret)


def can_use_pallas_tpu(x: jax.Array, q: QuantizedArray, *, interpret: bool = False) -> Support:
    """Whether the Pallas TPU (Mosaic) kernel can compute `qmatmul(x, q)`.

    Requires a TPU default backend (unless `interpret`), a 2-D unstacked kernel
    in row layout, float32/bfloat16/float16 activations and an output size that
    is a multiple of 128.

    Args:
        x: Activations `[..., in]` (an array or `jax.ShapeDtypeStruct`).
        q: The quantized kernel.
        interpret: Whether the kernel would run in Pallas interpret mode (any backend).

    Returns:
        A `Support`; falsy with a reason when the kernel cannot be used.

    Example:
        >>> import jax.numpy as jnp, qlora_jax as qj
        >>> q = qj.quantize(jnp.ones((128, 64)), "nf4")
        >>> qj.can_use_pallas_tpu(jnp.ones((4, 128)), q, interpret=True).reason
        'output size 64 is not a multiple of 128'
    """
    return _support("tpu", x, q, interpret)


def _support(backend: str, x, q: QuantizedArray, interpret: bool) -> Support:
    if not interpret and jax.default_backend() != backend:
        return Support(False, f"default backend is {jax.default_backend()}, not {backend}")
    if len(q.shape) != 2 or q.contract_axes != (0,) or q.stack_shape:
        return Support(False, f"kernel of shape {q.shape} (contract_axes {q.contract_axes}, stack "
                              f"{q.stack_shape}) is not one 2-D [in, out] kernel")
    if not q.row_layout:
        return Support(False, f"input size {q.shape[0]} is not a multiple of the block size {q.block_size}")
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        return Support(False, f"activation dtype {np.dtype(x.dtype)} is not float32, bfloat16 or float16")
    if q.shape[1] % _MIN_BN[backend]:
        return Support(False, f"output size {q.shape[1]} is not a multiple of {_MIN_BN[backend]}")
    return Support(True)


def pallas_matmul(
    x: jax.Array,
    q: QuantizedArray,
    *,
    backend: str,
    out_dtype: np.dtype,
    precision: lax.PrecisionLike = None,
    interpret: bool = False,
    tiles: Tiles | None = None,
) -> jax.Array:
    """`x[..., in] @ kernel` with the Pallas kernel of `backend` ("gpu" or "tpu").

    The caller checks `can_use_pallas_*` first. No custom VJP here; `qmatmul`
    adds it.
    """
    lead, k_size = x.shape[:-1], x.shape[-1]
    n_size = q.shape[1]
    x2 = x.reshape(-1, k_size)
    m_size = x2.shape[0]
    bm, bn, bk = dataclasses.astuple(tiles_for(backend, m_size, k_size, n_size, q.block_size, tiles))
    m_pad = -m_size % bm
    if m_pad:
        x2 = jnp.pad(x2, ((0, m_pad), (0, 0)))
    scales = dequantize_absmax(q)
    if q.fmt == "int8":
        scales = scales * np.float32(1 / 127)
        operands = [x2]
    else:
        operands = [x2[:, 0::2], x2[:, 1::2]]
    scales = scales.T  # [K // bs, N]: one row per block, lanes along the output axis
    kernel = functools.partial(
        _gpu_kernel if backend == "gpu" else _tpu_kernel,
        table=None if q.fmt == "int8" else tuple(float(v) for v in codebooks.codebook(q.fmt)),
        block_size=q.block_size, bk=bk, k_size=k_size, precision=precision, compute_dtype=np.dtype(x.dtype))
    call = _gpu_call if backend == "gpu" else _tpu_call
    y = call(kernel, operands, q.codes, scales, bm=bm, bn=bn, bk=bk, out_dtype=np.dtype(out_dtype),
             packed=q.fmt != "int8", interpret=interpret)
    return y[:m_size].reshape(*lead, n_size)


def tiles_for(backend: str, m: int, k: int, n: int, block_size: int, preferred: Tiles | None = None) -> Tiles:
    """The tiles the `backend` kernel uses for `[m, k] @ [k, n]`.

    `preferred` defaults to the backend's "small" tiles for `m <= SMALL_M`, else
    its "large" ones; `bn` and `bk` shrink to the largest power of two that
    divides `n` and `k` (TPU: `bk = k` if none does); `m` is padded to `bm`.

    Example:
        >>> from qlora_jax._src.ops import pallas
        >>> pallas.tiles_for("gpu", 1, 4096, 4096, 64)
        Tiles(bm=16, bn=64, bk=256)
    """
    del block_size  # any block size works with any power-of-two bk (one divides the other)
    if preferred is None:
        preferred = (GPU_TILES if backend == "gpu" else TPU_TILES)["small" if m <= SMALL_M else "large"]
    bn = _largest_dividing(preferred.bn, n, _MIN_BN[backend])
    bk = _largest_dividing(preferred.bk, k, _MIN_BK[backend]) or k
    return Tiles(preferred.bm, bn, bk)


def _largest_dividing(preferred: int, size: int, minimum: int) -> int:
    """The largest power of two in [minimum, preferred] dividing `size`, or 0."""
    t = preferred
    while t >= minimum:
        if size % t == 0:
            return t
        t //= 2
    return 0


def _gpu_call(kernel, operands, codes, scales, *, bm, bn, bk, out_dtype, packed, interpret):
    from jax.experimental.pallas import triton as plgpu

    m, k_cols = operands[0].shape
    n = codes.shape[0]
    x_spec = pl.BlockSpec((bm, k_cols), lambda i, j: (i, 0))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(m // bm, n // bn),
        in_specs=[x_spec] * len(operands) + [
            pl.BlockSpec((bn, codes.shape[1]), lambda i, j: (j, 0)),
            pl.BlockSpec((scales.shape[0], bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3 if bm > 16 else 2),
        interpret=interpret,
        name="qmatmul_gpu",
    )(*operands, codes, scales)


def _tpu_call(kernel, operands, codes, scales, *, bm, bn, bk, out_dtype, packed, interpret):
    from jax.experimental.pallas import tpu as pltpu

    m, k_cols = operands[0].shape
    n = codes.shape[0]
    cols = bk // 2 if packed else bk
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(m // bm, n // bn, k_cols // cols),
        in_specs=[pl.BlockSpec((bm, cols), lambda i, j, k: (i, k))] * len(operands) + [
            pl.BlockSpec((bn, cols), lambda i, j, k: (j, k)),
            pl.BlockSpec((scales.shape[0], bn), lambda i, j, k: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="qmatmul_tpu",
    )(*operands, codes, scales)


def _gpu_kernel(*refs, table, block_size, bk, k_size, precision, compute_dtype):
    """One `(bm, bn)` output tile; loops over the whole input axis in steps of `bk`."""
    *x_refs, c_ref, s_ref, o_ref = refs
    bm, bn = o_ref.shape

    def step(t, acc):
        return acc + _partial_products(x_refs, c_ref, s_ref, t * bk, 0, table=table, block_size=block_size,
                                       bk=bk, precision=precision, compute_dtype=compute_dtype)

    acc = lax.fori_loop(0, k_size // bk, step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _tpu_kernel(*refs, table, block_size, bk, k_size, precision, compute_dtype):
    """One `(bm, bn)` output tile and one `bk` slice of the input axis (grid axis 2)."""
    *x_refs, c_ref, s_ref, o_ref, acc_ref = refs
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    acc_ref[...] += _partial_products(x_refs, c_ref, s_ref, k * bk, None, table=table, block_size=block_size,
                                      bk=bk, precision=precision, compute_dtype=compute_dtype)

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _partial_products(x_refs, c_ref, s_ref, k_start, local, *, table, block_size, bk, precision, compute_dtype):
    """Sum over the blocks of input elements `[k_start, k_start + bk)` of
    `(x_blk @ codebook[codes_blk].T) * absmax_blk`, in float32 `[bm, bn]`.

    `local` is None when the refs hold just this `bk` slice (TPU), else the refs
    hold the whole input axis and are indexed from `k_start` (GPU).
    """
    packed = table is not None
    sub = min(block_size, bk)  # elements of one scale group inside the slice
    width = sub // 2 if packed else sub  # columns of the x / code refs per group
    total = None
    for j in range(bk // sub):
        if local is None:
            cols = pl.ds(j * width, width)
        else:
            cols = pl.ds(pl.multiple_of(_div(k_start + j * sub, 2 if packed else 1), width), width)
        row = _div(k_start + j * sub, block_size)
        scale = s_ref[pl.ds(row, 1), :]  # [1, bn]
        codes = c_ref[:, cols].astype(jnp.int32)
        if packed:
            part = (_dot_nt(x_refs[0][:, cols], _lookup(codes >> 4, table).astype(compute_dtype), precision)
                    + _dot_nt(x_refs[1][:, cols], _lookup(codes & 0xF, table).astype(compute_dtype), precision))
        else:
            part = _dot_nt(x_refs[0][:, cols], codes.astype(jnp.float32).astype(compute_dtype), precision)
        part = part * scale
        total = part if total is None else total + part
    return total


def _div(a: jax.Array, b: int) -> jax.Array:
    """`a // b` for a non-negative traced int (`lax.div`; `//` lowers through `sign`,
    which Mosaic lowers per TPU generation)."""
    return a if b == 1 else lax.div(a, jnp.int32(b))


def _dot_nt(a: jax.Array, b: jax.Array, precision) -> jax.Array:
    """`a [m, k] @ b [n, k].T` accumulated in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _lookup(idx: jax.Array, table: tuple[float, ...]) -> jax.Array:
    """`table[idx]` for 4-bit `idx` as a select tree over its bits (no gather,
    which neither Triton nor Mosaic lowers for a vector index)."""
    values = [np.float32(v) for v in table]
    for bit in range(4):
        on = ((idx >> bit) & 1) == 1
        values = [jnp.where(on, values[2 * i + 1], values[2 * i]) for i in range(len(values) // 2)]
    return values[0]

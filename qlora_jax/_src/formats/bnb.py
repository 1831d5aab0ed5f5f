"""Conversion between `QuantizedArray` and bitsandbytes' 4-bit state dict.

The entries are those of a `bitsandbytes.nn.Linear4bit` weight in a Hugging
Face checkpoint (keys relative to `<layer>.weight`): `weight` (packed uint8
`[ceil(n / 2), 1]`), `absmax`, `quant_map`, with double quantization
`nested_absmax` and `nested_quant_map`, and `quant_state.bitsandbytes__<fmt>`,
the UTF-8 bytes of a JSON object (`QuantState.as_dict(packed=True)`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from qlora_jax._src.formats import codebooks
from qlora_jax._src.formats.qarray import BLOCK_SIZES, NESTED_BLOCK_SIZE, QuantizedArray

__all__ = ["to_bnb", "from_bnb"]

_QS_PREFIX = "quant_state.bitsandbytes__"
_BNB_FORMATS = ("nf4", "fp4")
_DTYPE_NAMES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16), "float16": np.dtype(np.float16)}


def to_bnb(q: QuantizedArray) -> dict[str, np.ndarray]:
    """Exports one quantized kernel as bitsandbytes state-dict entries.

    The PyTorch weight is `kernel.T`, shape `[out, in]` (an N-D kernel becomes
    `[prod(out axes), prod(contracted axes)]`; a 1-D kernel stays `[n]`).

    Args:
        q: An "nf4" or "fp4" `QuantizedArray` of one layer (no stack dims).

    Returns:
        Numpy arrays keyed `weight`, `absmax`, `quant_map`, [`nested_absmax`,
        `nested_quant_map`], and `quant_state.bitsandbytes__<fmt>`. Prefix the
        keys with `<layer>.weight.` (and `weight` with `<layer>.`) for an HF
        checkpoint.

    Raises:
        ValueError: A format bitsandbytes does not have, or stacked layers.

    Example:
        >>> import jax.numpy as jnp, qlora_jax as qj
        >>> state = qj.to_bnb(qj.quantize(jnp.ones((64, 64)), "nf4"))
        >>> state["weight"].shape, state["absmax"].shape
        ((2048, 1), (64,))
    """
    if q.fmt not in _BNB_FORMATS:
        raise ValueError(f"q.fmt: {q.fmt!r} has no bitsandbytes 4-bit layout; only {_BNB_FORMATS} do")
    if q.stack_shape:
        raise ValueError(f"q: has stack dimensions {q.stack_shape}; export one layer at a time (index the stack)")
    state: dict[str, np.ndarray] = {
        "weight": np.asarray(q.codes).reshape(-1, 1),
        "absmax": np.asarray(q.absmax).reshape(-1),
        "quant_map": codebooks.codebook(q.fmt).copy(),
    }
    meta: dict[str, Any] = {
        "quant_type": q.fmt,
        "blocksize": q.block_size,
        "dtype": q.dtype.name,
        "shape": [q.size] if len(q.shape) == 1 else [math.prod(q.out_shape), q.in_size],
    }
    if q.double_quant:
        state["nested_absmax"] = np.asarray(q.nested_absmax).reshape(-1)
        state["nested_quant_map"] = codebooks.DYNAMIC_SIGNED.copy()
        meta.update(nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32",
                    nested_offset=float(np.float32(q.nested_offset)))
    state[_QS_PREFIX + q.fmt] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy()
    return state


def from_bnb(state: Mapping[str, Any]) -> QuantizedArray:
    """Builds a `QuantizedArray` from bitsandbytes state-dict entries, bit-exact.

    The packed bytes and absmax are used as they are (no dequantize/requantize).
    A bitsandbytes weight `[out, in]` becomes a Flax kernel `[in, out]`.

    Args:
        state: Entries as `to_bnb` returns them (numpy arrays or CPU torch
            tensors), keys relative to `<layer>.weight`. A `weight` stored in
            another dtype (bitsandbytes' `quant_storage`) is read as its bytes.

    Returns:
        The `QuantizedArray`, with jax arrays as leaves.

    Raises:
        ValueError: Missing or extra quant state, unsupported settings, a code
            table that is not bitsandbytes', or sizes that do not agree; the
            message names the entry.

    Example:
        >>> import jax.numpy as jnp, qlora_jax as qj
        >>> q = qj.quantize(jnp.ones((64, 64)), "fp4", double_quant=True)
        >>> qj.from_bnb(qj.to_bnb(q)).shape
        (64, 64)
    """
    qs_keys = [k for k in state if k.startswith(_QS_PREFIX)]
    if len(qs_keys) != 1 or qs_keys[0][len(_QS_PREFIX):] not in _BNB_FORMATS:
        raise ValueError(f"state: expected exactly one entry 'quant_state.bitsandbytes__nf4' or '...__fp4', "
                         f"found keys {sorted(state)}")
    qs_key = qs_keys[0]
    try:
        meta = json.loads(_numpy(state[qs_key]).astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"state[{qs_key!r}]: not UTF-8 JSON bytes ({e})") from None
    fmt = qs_key[len(_QS_PREFIX):]
    _expect(meta, qs_key, "quant_type", fmt)
    block_size = meta.get("blocksize")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"state[{qs_key!r}]['blocksize']: {block_size!r} is not one of {BLOCK_SIZES}")
    if meta.get("dtype") not in _DTYPE_NAMES:
        raise ValueError(f"state[{qs_key!r}]['dtype']: {meta.get('dtype')!r} is not one of {sorted(_DTYPE_NAMES)}")
    bnb_shape = meta.get("shape")
    if not isinstance(bnb_shape, list) or len(bnb_shape) not in (1, 2) or not all(
            isinstance(d, int) and d > 0 for d in bnb_shape):
        raise ValueError(f"state[{qs_key!r}]['shape']: expected [out, in] or [n] with positive ints, got {bnb_shape!r}")
    shape = tuple(bnb_shape) if len(bnb_shape) == 1 else (bnb_shape[1], bnb_shape[0])
    size = math.prod(shape)

    for key in ("weight", "absmax", "quant_map"):
        if key not in state:
            raise ValueError(f"state: missing entry {key!r}; found keys {sorted(state)}")
    quant_map = _numpy(state["quant_map"])
    if quant_map.dtype != np.float32 or not np.array_equal(quant_map.view(np.uint32),
                                                          codebooks.codebook(fmt).view(np.uint32)):
        raise ValueError(f"state['quant_map']: not bitsandbytes' {fmt} code table")
    weight = _numpy(state["weight"])
    weight = weight.reshape(-1).view(np.uint8) if weight.dtype != np.uint8 else weight.reshape(-1)
    _expect_size("weight", weight, -(-size // 2), shape)
    n_blocks = -(-size // block_size)
    absmax = _numpy(state["absmax"]).reshape(-1)
    _expect_size("absmax", absmax, n_blocks, shape)

    double_quant = "nested_absmax" in state
    nested_absmax = nested_offset = None
    if double_quant:
        _expect(meta, qs_key, "nested_blocksize", NESTED_BLOCK_SIZE)
        _expect(meta, qs_key, "nested_dtype", "float32")
        if not isinstance(meta.get("nested_offset"), (int, float)):
            raise ValueError(f"state[{qs_key!r}]['nested_offset']: missing or not a number")
        if "nested_quant_map" not in state:
            raise ValueError("state: 'nested_absmax' is present but 'nested_quant_map' is missing")
        nested_map = _numpy(state["nested_quant_map"])
        if nested_map.dtype != np.float32 or not np.array_equal(nested_map.view(np.uint32),
                                                               codebooks.DYNAMIC_SIGNED.view(np.uint32)):
            raise ValueError("state['nested_quant_map']: not bitsandbytes' signed dynamic map")
        if absmax.dtype != np.uint8:
            raise ValueError(f"state['absmax']: dtype {absmax.dtype}, expected uint8 with double quantization")
        nested_absmax = _numpy(state["nested_absmax"]).reshape(-1)
        if nested_absmax.dtype != np.float32:
            raise ValueError(f"state['nested_absmax']: dtype {nested_absmax.dtype}, expected float32")
        _expect_size("nested_absmax", nested_absmax, -(-n_blocks // NESTED_BLOCK_SIZE), shape)
        nested_offset = jnp.asarray(np.float32(meta["nested_offset"]))
        nested_absmax = jnp.asarray(nested_absmax)
    else:
        if "nested_blocksize" in meta or "nested_offset" in meta:
            raise ValueError(f"state[{qs_key!r}]: describes double quantization but 'nested_absmax' is missing")
        if absmax.dtype != np.float32:
            raise ValueError(f"state['absmax']: dtype {absmax.dtype}, expected float32")

    in_size = shape[0]
    if len(shape) == 2 and in_size % block_size == 0:
        weight = weight.reshape(shape[1], in_size // 2)
        absmax = absmax.reshape(shape[1], in_size // block_size)
    return QuantizedArray(codes=jnp.asarray(weight), absmax=jnp.asarray(absmax), nested_absmax=nested_absmax,
                          nested_offset=nested_offset, fmt=fmt, block_size=block_size, shape=shape,
                          dtype=_DTYPE_NAMES[meta["dtype"]], contract_axes=(0,))


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, imported lazily: torch is not a dependency
        import torch

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # no numpy twin: go through its bytes
            return value.view(torch.int16).numpy().view(jnp.bfloat16)
        return value.numpy()
    return np.asarray(value)


def _expect(meta: dict, qs_key: str, field: str, value: Any) -> None:
    if meta.get(field) != value:
        raise ValueError(f"state[{qs_key!r}][{field!r}]: expected {value!r}, got {meta.get(field)!r}")


def _expect_size(name: str, array: np.ndarray, expected: int, shape: tuple[int, ...]) -> None:
    if array.size != expected:
        raise ValueError(f"state[{name!r}]: {array.size} elements, expected {expected} for a kernel of shape {shape}")

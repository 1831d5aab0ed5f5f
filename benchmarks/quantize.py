"""Quantization speed and storage of qlora_jax, side by side with bitsandbytes.

Times NF4 (block 64, with and without double quantization) of float32 Flax
kernels `[in, out]` with `qlora_jax.quantize` and, on the same weights, with
`bitsandbytes.functional.quantize_4bit` on CPU (the torch weight is
`kernel.T`). Then measures bytes per parameter and the relative MSE of
`dequantize` for every format. Prints Markdown tables and writes JSON.

Usage:
    python benchmarks/quantize.py [--repeats N] [--json PATH]

torch and bitsandbytes are optional: without them only qlora_jax is timed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import NA, machine_info, markdown_table, median_ms, write_json
from tqdm import tqdm

import qlora_jax as qj

TIMING_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 11008))
STORAGE_SHAPE: tuple[int, int] = (4096, 4096)
BLOCK_SIZE = 64
SEED = 0
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "quantize.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Example:
        >>> parse_args(["--repeats", "3"]).repeats
        3
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case; the median is reported")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="where to write the results (default benchmarks/results/quantize.json)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def load_bitsandbytes() -> Any | None:
    """Returns `bitsandbytes.functional`, or None when torch or bitsandbytes is missing.

    Example:
        >>> F = load_bitsandbytes()  # None without bitsandbytes
    """
    try:
        import bitsandbytes.functional as bnb_functional  # optional: a test/benchmark-only dependency
        import torch  # noqa: F401  (bitsandbytes needs it; checked here for a clear message)
    except ImportError:
        return None
    return bnb_functional


def gaussian_kernel(shape: tuple[int, int], seed: int = SEED) -> jax.Array:
    """A float32 standard-normal Flax kernel `[in, out]`.

    Example:
        >>> gaussian_kernel((64, 8)).dtype
        dtype('float32')
    """
    return jax.block_until_ready(jax.random.normal(jax.random.key(seed), shape, jnp.float32))


def time_case(kernel: jax.Array, double_quant: bool, repeats: int, bnb: Any | None) -> dict[str, Any]:
    """Times NF4 quantization of one kernel with qlora_jax and, if given, bitsandbytes.

    Example:
        >>> row = time_case(gaussian_kernel((256, 128)), False, 1, None)
        >>> row["bitsandbytes_ms"] is None
        True
    """
    fns = [lambda: jax.block_until_ready(qj.quantize(kernel, "nf4", BLOCK_SIZE, double_quant))]
    if bnb is not None:
        weight = _torch_weight(kernel)
        fns.append(lambda: bnb.quantize_4bit(weight, blocksize=BLOCK_SIZE, quant_type="nf4",
                                             compress_statistics=double_quant))
    ms = median_ms(fns, repeats)
    row: dict[str, Any] = {"shape": list(kernel.shape), "double_quant": double_quant, "qlora_jax_ms": ms[0],
                           "bitsandbytes_ms": None, "ratio": None, "codes_equal": None, "absmax_equal": None}
    if bnb is not None:
        row.update(bitsandbytes_ms=ms[1], ratio=ms[0] / ms[1])
        row.update(_compare_with_bnb(kernel, double_quant, fns[1]()))
    return row


def _torch_weight(kernel: jax.Array) -> Any:
    """The torch weight `[out, in]` = `kernel.T`, contiguous float32 on CPU."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(kernel).T)).contiguous()


def _compare_with_bnb(kernel: jax.Array, double_quant: bool, bnb_result: tuple[Any, Any]) -> dict[str, bool]:
    """Whether qlora_jax's packed codes and absmax equal bitsandbytes' byte for byte."""
    packed, state = bnb_result
    q = qj.quantize(kernel, "nf4", BLOCK_SIZE, double_quant)
    return {
        "codes_equal": bool(np.array_equal(packed.numpy().reshape(-1), np.asarray(q.codes).reshape(-1))),
        "absmax_equal": bool(np.array_equal(state.absmax.numpy().reshape(-1), np.asarray(q.absmax).reshape(-1))),
    }


@jax.jit
def relative_mse(q: qj.QuantizedArray, kernel: jax.Array) -> jax.Array:
    """`mean((dequantize(q) - kernel)**2) / mean(kernel**2)`, in float32.

    Example:
        >>> k = gaussian_kernel((64, 8))
        >>> float(relative_mse(qj.quantize(k, "int8"), k)) < 1e-3
        True
    """
    err = qj.dequantize(q, jnp.float32) - kernel
    return jnp.sum(err * err) / jnp.sum(kernel * kernel)


def storage_case(kernel: jax.Array, fmt: str, double_quant: bool) -> dict[str, Any]:
    """Bytes per parameter and relative MSE of one format at `BLOCK_SIZE`.

    Example:
        >>> storage_case(gaussian_kernel((64, 64)), "int8", False)["bytes_per_param"]
        1.0625
    """
    q = qj.quantize(kernel, fmt, BLOCK_SIZE, double_quant)
    return {"format": fmt, "block_size": BLOCK_SIZE, "double_quant": double_quant,
            "bytes_per_param": q.nbytes / kernel.size, "relative_mse": float(relative_mse(q, kernel))}


def _fmt(value: float | None, spec: str) -> str:
    return NA if value is None else format(value, spec)


def timing_table(rows: Sequence[dict[str, Any]]) -> str:
    """The quantization-time table.

    Example:
        >>> print(timing_table([]).splitlines()[0])
        | shape | double_quant | qlora_jax ms | bitsandbytes ms | ratio (qlora_jax / bitsandbytes) |
    """
    return markdown_table(
        ["shape", "double_quant", "qlora_jax ms", "bitsandbytes ms", "ratio (qlora_jax / bitsandbytes)"],
        [[" x ".join(map(str, r["shape"])), r["double_quant"], _fmt(r["qlora_jax_ms"], ".1f"),
          _fmt(r["bitsandbytes_ms"], ".1f"), _fmt(r["ratio"], ".2f")] for r in rows])


def storage_table(rows: Sequence[dict[str, Any]]) -> str:
    """The bytes-per-parameter and relative-MSE table.

    Example:
        >>> print(storage_table([]).splitlines()[0])
        | format | block_size | double_quant | bytes/param | relative MSE |
    """
    return markdown_table(
        ["format", "block_size", "double_quant", "bytes/param", "relative MSE"],
        [[r["format"], r["block_size"], r["double_quant"], f"{r['bytes_per_param']:.4f}",
          f"{r['relative_mse']:.3e}"] for r in rows])


def run_timing(repeats: int, bnb: Any | None) -> list[dict[str, Any]]:
    """Times every (shape, double_quant) case, with a tqdm progress bar.

    Example:
        >>> rows = run_timing(1, None)  # doctest: +SKIP
    """
    cases = [(shape, dq) for shape in TIMING_SHAPES for dq in (False, True)]
    rows, kernel = [], None
    for shape, dq in tqdm(cases, desc="timing nf4", unit="case"):
        if kernel is None or tuple(kernel.shape) != shape:
            kernel = gaussian_kernel(shape)
        rows.append(time_case(kernel, dq, repeats, bnb))
    return rows


def run_storage() -> list[dict[str, Any]]:
    """Measures every (format, double_quant) case on the storage kernel.

    Example:
        >>> rows = run_storage()  # doctest: +SKIP
    """
    kernel = gaussian_kernel(STORAGE_SHAPE)
    cases = [(fmt, dq) for fmt in ("nf4", "fp4", "int4", "int8") for dq in (False, True)]
    return [storage_case(kernel, fmt, dq) for fmt, dq in tqdm(cases, desc="formats", unit="case")]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and prints its tables.

    Example:
        >>> main(["--repeats", "1", "--json", "/tmp/quantize.json"])  # doctest: +SKIP
        0
    """
    args = parse_args(argv)
    machine = machine_info()
    print(f"# qlora_jax quantization benchmark\n\nmachine: {machine['processor']} | jax device: "
          f"{machine['device_kind']} | cpus: {machine['cpu_count']} | jax {machine['jax']} | "
          f"torch {machine['torch'] or NA} | bitsandbytes {machine['bitsandbytes'] or NA}\n")
    bnb = load_bitsandbytes()
    if bnb is None:
        print("bitsandbytes (with torch) is not installed: timing qlora_jax only; the bitsandbytes columns say n/a. "
              "Install it with `pip install torch bitsandbytes` to compare.\n")
    timing = run_timing(args.repeats, bnb)
    storage = run_storage()
    print(f"## NF4 quantization time, block {BLOCK_SIZE}, float32 kernel [in, out] "
          f"(median of {args.repeats}, interleaved, after warm-up)\n")
    print(timing_table(timing) + "\n")
    print(f"## Storage and error per format, block {BLOCK_SIZE}, Gaussian kernel "
          f"{STORAGE_SHAPE[0]} x {STORAGE_SHAPE[1]}\n")
    print(storage_table(storage) + "\n")
    settings = {"block_size": BLOCK_SIZE, "repeats": args.repeats, "seed": SEED, "dtype": "float32"}
    write_json(args.json, {"machine": machine, "settings": settings, "timing": timing, "storage": storage})
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

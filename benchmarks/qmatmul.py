"""qmatmul speed: every path next to a dense matmul of the same shape and dtype.

For M in {1, 16, 256, 512, 2048} and K = N = 4096 (by default), times
`qlora_jax.qmatmul` on each path that can run on this machine ("xla",
"pallas_gpu" on a GPU, "pallas_tpu" on a TPU, and the float32 "reference"),
a dense `x @ w` in the same dtype, and the dequantization alone (in storage
order, as the "xla" path does it), interleaved in one run. Prints the time
ratio to the dense matmul and the effective bandwidth (bytes of weights,
activations and output per second), and writes JSON.
Runs unchanged on CPU, GPU or TPU; paths that cannot run say why.

Usage:
    python benchmarks/qmatmul.py [--m 1 16 256 512 2048] [--k 4096] [--n 4096]
        [--fmt nf4] [--block-size 64] [--dtype float32|bfloat16|float16] [--repeats N] [--json PATH]
        [--default-runtime]

On a CPU-only machine it calls `qlora_jax.app.configure_cpu()` first, as the
`finetune` and `demo` commands do: without it every call maps the dequantized
kernel's temporaries afresh (`--default-runtime` measures that).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import NA, add_output_arguments, machine_info, markdown_table, median_ms, runtime_text, write_json
from tqdm import tqdm

import qlora_jax as qj
from qlora_jax._src.formats.blockwise import dequantize_stored
from qlora_jax.app.runtime import configure_cpu_for_command

DEFAULT_M = (1, 16, 256, 512, 2048)
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "qmatmul.json"
PATHS = ("xla", "pallas_gpu", "pallas_tpu", "reference")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Example:
        >>> parse_args(["--m", "1", "8", "--k", "256"]).m
        [1, 8]
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=list(DEFAULT_M), help="rows of x")
    parser.add_argument("--k", type=int, default=4096, help="input size")
    parser.add_argument("--n", type=int, default=4096, help="output size")
    parser.add_argument("--fmt", default="nf4", choices=sorted(qj.FORMATS))
    parser.add_argument("--block-size", type=int, default=64, choices=qj.BLOCK_SIZES)
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="activation dtype (default float32 on CPU, bfloat16 on GPU/TPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case; the median is reported")
    add_output_arguments(parser, DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.m) < 1:
        parser.error("--repeats and --m must be at least 1")
    return args


def bench_case(m: int, q: qj.QuantizedArray, w: jax.Array, dtype: np.dtype, repeats: int) -> dict[str, Any]:
    """Times dense, dequantize and every runnable qmatmul path for one M.

    Example:
        >>> q = qj.quantize(jnp.ones((128, 64)), "nf4")
        >>> row = bench_case(2, q, jnp.ones((128, 64)), np.dtype("float32"), repeats=1)
        >>> row["paths"]["xla"]["ratio"] > 0
        True
    """
    k, n = q.shape
    x = jax.random.normal(jax.random.key(m), (m, k), dtype)
    dense = jax.jit(lambda x, w: x @ w)
    deq = jax.jit(lambda q: dequantize_stored(q, dtype))  # what the "xla" path computes before its dot
    fns = {"dense": lambda: dense(x, w).block_until_ready(), "dequantize": lambda: deq(q).block_until_ready()}
    skipped: dict[str, str] = {}
    for path in PATHS:
        reason = _cannot_run(path, x, q)
        if reason:
            skipped[path] = reason
            continue
        fn = jax.jit(lambda x, q, path=path: qj.qmatmul(x, q, path=path))
        fns[path] = lambda fn=fn: fn(x, q).block_until_ready()
    ms = dict(zip(fns, median_ms(list(fns.values()), repeats), strict=True))
    io_bytes = x.nbytes + m * n * np.dtype(dtype).itemsize
    row: dict[str, Any] = {
        "m": m, "dense_ms": ms["dense"], "dequantize_ms": ms["dequantize"],
        "dense_gbps": (w.nbytes + io_bytes) / ms["dense"] / 1e6, "paths": {},
    }
    for path in PATHS:
        if path in skipped:
            row["paths"][path] = {"ms": None, "ratio": None, "gbps": None, "skipped": skipped[path]}
        else:
            row["paths"][path] = {"ms": ms[path], "ratio": ms[path] / ms["dense"],
                                  "gbps": (q.nbytes + io_bytes) / ms[path] / 1e6}
    return row


def _cannot_run(path: str, x: jax.Array, q: qj.QuantizedArray) -> str:
    """Why `path` cannot run here (interpret mode is not benchmarked), or ''."""
    if path == "pallas_gpu":
        return qj.can_use_pallas_gpu(x, q).reason
    if path == "pallas_tpu":
        return qj.can_use_pallas_tpu(x, q).reason
    return ""


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per M and path: time, ratio to dense, effective GB/s.

    Example:
        >>> print(results_table([]).splitlines()[0])
        | M | path | ms | ratio to dense | GB/s | dense ms | dense GB/s | dequantize ms |
    """
    lines = []
    for row in rows:
        for path, r in row["paths"].items():
            if r["ms"] is None:
                lines.append([row["m"], path, NA, NA, NA, f"{row['dense_ms']:.3f}", f"{row['dense_gbps']:.1f}",
                              f"{row['dequantize_ms']:.3f}"])
            else:
                lines.append([row["m"], path, f"{r['ms']:.3f}", f"{r['ratio']:.2f}", f"{r['gbps']:.1f}",
                              f"{row['dense_ms']:.3f}", f"{row['dense_gbps']:.1f}", f"{row['dequantize_ms']:.3f}"])
    return markdown_table(["M", "path", "ms", "ratio to dense", "GB/s", "dense ms", "dense GB/s", "dequantize ms"],
                          lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints its table and writes JSON.

    Example:
        >>> main(["--m", "1", "--k", "256", "--n", "128", "--repeats", "1", "--json", "/tmp/qm.json"])  # doctest: +SKIP
        0
    """
    args = parse_args(argv)
    runtime = None if args.default_runtime else configure_cpu_for_command()  # before JAX starts; CPU only
    dtype = np.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    machine = machine_info()
    print(f"# qlora_jax qmatmul benchmark\n\nmachine: {machine['processor']} | jax device: "
          f"{machine['device_kind']} | cpus: {machine['cpu_count']} | jax {machine['jax']}\n")
    print(f"runtime: {runtime_text(runtime)}\n")
    kernel = jax.random.normal(jax.random.key(0), (args.k, args.n), jnp.float32) * 0.02
    q = qj.quantize(kernel, args.fmt, args.block_size, not args.no_double_quant)
    w = kernel.astype(dtype)
    rows = [bench_case(m, q, w, dtype, args.repeats) for m in tqdm(args.m, desc="M", unit="case")]
    skipped = {p: r["skipped"] for row in rows for p, r in row["paths"].items() if r["ms"] is None}
    print(f"## x [M, {args.k}] {dtype} @ {args.fmt} kernel [{args.k}, {args.n}], block {args.block_size}, "
          f"double quant {not args.no_double_quant} (median of {args.repeats}, interleaved, after warm-up)\n")
    print(results_table(rows) + "\n")
    for path, reason in skipped.items():
        print(f"- {path}: not run: {reason}")
    settings = {"k": args.k, "n": args.n, "fmt": args.fmt, "block_size": args.block_size,
                "double_quant": not args.no_double_quant, "dtype": str(dtype), "repeats": args.repeats,
                "runtime": None if runtime is None else dataclasses.asdict(runtime)}
    write_json(args.json, {"machine": machine, "settings": settings, "rows": rows})
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

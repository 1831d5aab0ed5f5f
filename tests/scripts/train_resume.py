"""Trains a tiny QLoRA Llama on deterministic random batches; run by tests/test_train.py.

Three uses: a straight run (`--steps 20 --out straight.npz`); a run that
checkpoints every `--save-every` steps and, at the start of step `--hang-at`,
writes `--marker` and stalls inside that step until the test kills it with
SIGKILL; and a run that `--resume`s from the last complete checkpoint. Each
run that finishes writes its final adapters, RNG state and optimizer state
(and the losses of the steps it ran) to `--out`, for a bit-exact comparison.

The batches come from one seeded numpy generator, whose state is the data
position saved with each checkpoint. Settings mirror tests/conftest.py
(eight CPU devices, strict dtype promotion), and `--cache` shares compiled programs between the
three processes (JAX's persistent compilation cache), which keeps the test fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

VOCAB, BATCH, SEQ, STEPS = 128, 2, 16, 20


def make_batch(rng: np.random.Generator, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> dict:
    """A packed batch as the data pipeline makes it: random segments, padding at the end of each row.

    `weights` is 0 on padding, on each segment's last token (its target would
    be the next segment's first token) and on a random prompt prefix.
    """
    ids = rng.integers(1, vocab, (batch, seq), dtype=np.int32)
    segment_ids = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    weights = np.zeros((batch, seq), np.float32)
    for row in range(batch):
        start, segment = 0, 1
        used = int(rng.integers(seq // 2, seq + 1))
        while start < used:
            length = min(int(rng.integers(3, seq // 2 + 1)), used - start)
            prompt = int(rng.integers(0, length))
            segment_ids[row, start:start + length] = segment
            positions[row, start:start + length] = np.arange(length)
            weights[row, start + prompt:start + length - 1] = 1.0
            start, segment = start + length, segment + 1
    ids[segment_ids == 0] = 0
    targets = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    return {"input_ids": ids, "targets": targets, "weights": weights, "positions": positions,
            "segment_ids": segment_ids}


def build(config_kwargs: dict | None = None):
    """The tiny QLoRA model (dropout 0.1, so the RNG state matters) and its Trainer."""
    from flax import nnx

    import qlora_jax as qj
    from qlora_jax.models import CausalLM, ModelConfig

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2)
    model = qj.apply_qlora(CausalLM(cfg, rngs=nnx.Rngs(0)), quant=qj.QuantConfig(),
                           lora=qj.LoraConfig(rank=4, alpha=8, dropout=0.1), rngs=nnx.Rngs(1))
    config = qj.train.TrainConfig(total_steps=STEPS, lr=1e-3, schedule="cosine", warmup_ratio=0.1, grad_accum=2,
                                  seed=7, **(config_kwargs or {}))
    return model, qj.train.Trainer(model, config)


def snapshot(trainer) -> dict[str, np.ndarray]:
    """Adapters, RNG state and optimizer state as flat numpy arrays keyed by path."""
    import jax
    from flax import nnx

    parts = {"adapters": nnx.state(trainer.model, nnx.LoRAParam), "rng": nnx.state(trainer.model, nnx.RngState),
             "optimizer": nnx.state(trainer.optimizer)}
    out = {}
    for name, state in parts.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            out[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", type=Path, help="checkpoint directory")
    parser.add_argument("--out", type=Path, help="write the final state here (.npz)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--hang-at", type=int, default=0, help="stall in this step (1-based) until killed")
    parser.add_argument("--marker", type=Path, help="written when step --hang-at starts")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt")
    parser.add_argument("--cache", type=Path, help="JAX persistent compilation cache directory")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    if args.cache is not None:
        jax.config.update("jax_compilation_cache_dir", str(args.cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    _, trainer = build()
    rng = np.random.default_rng(1234)
    if args.resume:
        rng.bit_generator.state = trainer.restore(args.ckpt)
    start, losses = trainer.step, []
    while trainer.step < args.steps:
        if trainer.step + 1 == args.hang_at:
            args.marker.write_text(str(trainer.step + 1))
        metrics = trainer.train_step(make_batch(rng))
        if trainer.step == args.hang_at:
            jax.block_until_ready(metrics)
            time.sleep(300)  # "still computing step hang_at": the test kills the process here
            sys.exit("train_resume.py: was not killed")
        losses.append(float(metrics["loss"]))
        if args.save_every and trainer.step % args.save_every == 0:
            trainer.save(args.ckpt, data_state=rng.bit_generator.state)
    if args.out is not None:
        np.savez(args.out, start=np.int64(start), losses=np.asarray(losses, np.float32), **snapshot(trainer))


if __name__ == "__main__":
    main()

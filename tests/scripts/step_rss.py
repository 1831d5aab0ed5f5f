"""Peak RSS of real train steps over the RSS before them, for one step flavour (run in a fresh process).

Usage: python step_rss.py FLAVOUR, FLAVOUR one of "function" (`qj.train.train_step`), "trainer"
(`qj.train.Trainer.train_step`), "readme" (the README's `nnx.jit(..., graph_updates=False)` step) and
"nnx-jit-default" (the same step under NNX's default `nnx.jit`, which writes every variable out again).
Prints one JSON line: frozen bytes, RSS once the model is built, RSS before the timed steps (two steps
later), their peak (VmHWM after a reset) and the RSS after them.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import qlora_jax as qj
from qlora_jax.models import CausalLM, ModelConfig


def status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def main(flavour: str) -> None:
    # ~134M frozen float32 parameters (512 MiB) in the decoder's linear layers, rank-2 adapters.
    cfg = ModelConfig(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_layers=8, num_heads=8,
                      num_kv_heads=8)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    model = qj.apply_qlora(model, quant=None, lora=qj.LoraConfig(rank=2, dropout=0.1), rngs=nnx.Rngs(1))
    frozen = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, qj.nnx.FrozenWeight)))
    ids = np.arange(32, dtype=np.int32).reshape(1, 32) % cfg.vocab_size
    batch = {"input_ids": ids, "targets": (ids + 1) % cfg.vocab_size, "weights": np.ones((1, 32), np.float32)}
    config = qj.train.TrainConfig(total_steps=10, warmup_ratio=0.0)
    if flavour == "trainer":
        trainer = qj.train.Trainer(model, config)
        step = lambda: trainer.train_step(batch)["loss"]  # noqa: E731
    elif flavour == "function":
        optimizer = nnx.Optimizer(model, qj.train.make_optimizer(config), wrt=nnx.LoRAParam)
        step = lambda: qj.train.train_step(model, optimizer, batch)["loss"]  # noqa: E731
    else:
        optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)

        def loss_fn(model, batch):
            logits = model(batch["input_ids"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        def user_step(model, optimizer, batch):
            loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
            optimizer.update(model, grads)
            return loss

        jitted = nnx.jit(user_step) if flavour == "nnx-jit-default" else nnx.jit(user_step, graph_updates=False,
                                                                                 donate_argnums=1)
        step = lambda: jitted(model, optimizer, batch)  # noqa: E731
    built = status_bytes("VmRSS")
    jax.block_until_ready(step())  # compiles; its temporaries are allocated once
    jax.block_until_ready(step())
    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # VmHWM := VmRSS
    for _ in range(4):
        jax.block_until_ready(step())
    print(json.dumps({"flavour": flavour, "frozen": frozen, "built": built, "before": before,
                      "peak": status_bytes("VmHWM"), "after": status_bytes("VmRSS"),
                      "loss": float(jnp.asarray(step()))}))


if __name__ == "__main__":
    main(sys.argv[1])

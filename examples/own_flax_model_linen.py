"""QLoRA on a Flax Linen model you already have, without editing its source.

`convert_params` rewrites the model's params: every `nn.Dense` kernel but the
output head moves to the "frozen" collection as packed NF4 codes, and the
targets get LoRA adapters `lora_a`, `lora_b` in "params". The unmodified model
runs under `nn.intercept_methods(qlora_interceptor(...))`, and
`masked(optax.adamw(...), params)` trains the adapters only.

Run: python examples/own_flax_model_linen.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import qlora_jax as qj
from qlora_jax.linen import convert_params, masked, qlora_interceptor


class Block(nn.Module):
    """A small pre-norm MLP block with an output head, written with plain nn.Dense."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, 128] -> [batch, 16]
        h = nn.Dense(256, name="up")(nn.LayerNorm(name="norm")(x))
        return nn.Dense(16, name="head")(x + nn.Dense(128, name="down")(jax.nn.gelu(h)))


def main() -> None:
    model = Block()
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (256, 128))
    y = jnp.tanh(x @ jax.random.normal(kw, (128, 16)) * 0.2)  # a toy task: a fixed random function
    params = model.init(jax.random.key(0), x)["params"]  # stands in for pretrained weights

    quant = qj.QuantConfig(fmt="nf4", block_size=64, double_quant=True)
    lora = qj.LoraConfig(rank=8, alpha=16, dropout=0.05)
    variables, report = convert_params(params, quant=quant, lora=lora, rng=jax.random.key(1))
    print(report)
    params, frozen = variables["params"], variables["frozen"]

    def loss_fn(params, frozen, key: jax.Array, deterministic: bool) -> jax.Array:
        with nn.intercept_methods(qlora_interceptor(quant=quant, lora=lora, deterministic=deterministic)):
            out = model.apply({"params": params, "frozen": frozen}, x, rngs={"dropout": key})
        return jnp.mean((out - y) ** 2)

    tx = masked(optax.adamw(1e-2), params)  # optimizer state for the adapters only
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, frozen, opt_state, key: jax.Array):  # grads for "params" only
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, key, False)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = jax.jit(lambda params, frozen: loss_fn(params, frozen, jax.random.key(0), True))
    before = float(evaluate(params, frozen))
    for step in range(40):
        params, opt_state, _ = train_step(params, frozen, opt_state, jax.random.key(100 + step))
    after = float(evaluate(params, frozen))
    print(f"loss before training: {before:.4f}")
    print(f"loss after training:  {after:.4f}")
    frozen_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(frozen))
    print(f"base weights of the converted layers: {report.bytes_before:,} bytes before, {frozen_bytes:,} bytes after")
    state_floats = sum(leaf.size for leaf in jax.tree.leaves(opt_state) if leaf.dtype == jnp.float32)
    print(f"adapter parameters: {report.lora_params:,}; adamw state floats: {state_floats:,}")


if __name__ == "__main__":
    main()

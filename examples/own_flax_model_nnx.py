"""QLoRA on a Flax NNX model you already have: quantize, train the adapters, merge.

`qj.apply_qlora` replaces the model's `nnx.Linear` layers in place (every one but
the output head is stored as packed NF4 codes; the targets get LoRA adapters),
`nnx.Optimizer(..., wrt=nnx.LoRAParam)` trains the adapters only, and
`merge_lora` folds them into float kernels, giving a plain Flax model back
(`unmerge_lora(model, original)` would put the QLoRA layers back).

Run: python examples/own_flax_model_nnx.py
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import qlora_jax as qj
from qlora_jax.nnx import merge_lora, merge_report


class Block(nnx.Module):
    """A small pre-norm MLP block with an output head: the kind of model you already have."""

    def __init__(self, d: int, hidden: int, n_out: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d, rngs=rngs)
        self.head = nnx.Linear(d, n_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, d] -> [batch, n_out]
        return self.head(x + self.down(jax.nn.gelu(self.up(self.norm(x)))))


def main() -> None:
    model = Block(128, 256, 16, nnx.Rngs(0))
    model = qj.apply_qlora(model, quant=qj.QuantConfig(fmt="nf4", block_size=64, double_quant=True),
                           lora=qj.LoraConfig(rank=8, alpha=16, dropout=0.05), rngs=nnx.Rngs(1))
    print(qj.qlora_report(model))  # paths, kernel shapes, parameter counts, bytes before and after

    # A toy task: match a fixed random function of the input.
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (256, 128))
    y = jnp.tanh(x @ jax.random.normal(kw, (128, 16)) * 0.2)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)  # state for the adapters only

    def loss_fn(model: Block) -> jax.Array:
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit(graph_updates=False, donate_argnums=1)  # only what changes comes out; optimizer updated in place
    def train_step(model: Block, optimizer: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    model.eval()
    before = float(loss_fn(model))
    model.train()
    for _ in range(40):
        train_step(model, optimizer)
    model.eval()  # no dropout from here on
    after = float(loss_fn(model))
    print(f"loss before training: {before:.4f}")
    print(f"loss after training:  {after:.4f}")

    outputs = model(x)
    original = nnx.clone(model)  # shares the arrays (no copy): the layers unmerge_lora(model, original) puts back
    model = merge_lora(model)  # in place: float kernels = dequantized base + s * A @ B; a plain Flax model
    print(merge_report(model, original))
    difference = float(jnp.max(jnp.abs(model(x) - outputs)))
    print(f"merged model: {type(model.up).__name__} layers, max |output difference| {difference:.2e}")


if __name__ == "__main__":
    main()

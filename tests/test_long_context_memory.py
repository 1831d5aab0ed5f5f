"""What a long sequence's step keeps: the decoder layers recomputed from their inputs (`remat_layers`), the MLP
over chunks of tokens (`MLP`), against the plain (`nnx.scan` + `nnx.remat`) layers and the unchunked MLP for
values and gradients, and on the compiled step's memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlora_jax as qj
from qlora_jax._src.models import llama
from qlora_jax.models import CausalLM, ModelConfig

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_layers=3, num_heads=4, num_kv_heads=2)


def qlora_model(cfg, remat, dtype=jnp.float32, dropout=0.0):
    model = CausalLM(cfg, remat=remat, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    return qj.apply_qlora(model, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=4, dropout=dropout),
                          rngs=nnx.Rngs(1))


def loss_and_grads(model, ids, steps=1):
    def loss(m):
        return jnp.mean(m(ids).astype(jnp.float32) ** 2)

    step = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))
    return [step(model) for _ in range(steps)]


def assert_close(a, b, atol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def test_remat_layers_equal_the_scanned_layers_with_dropout():
    """`remat=True` (`remat_layers`: own backward pass, recomputing each layer) against `remat=False` (the layers
    under `nnx.scan`, autodiff keeping `_KEEP`): the same loss and adapter gradients, with dropout drawing the
    same masks in the recomputation as in the forward pass, over two steps (the RNG counts advance alike)."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 50)))
    models = [qlora_model(CFG, remat, dropout=0.2) for remat in (True, False)]
    for model in models:
        model.train()
    got, want = (loss_and_grads(m, ids, steps=2) for m in models)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want[0][1]))
    assert scale > 0
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, atol=1e-6 * scale)
    counts = [jax.tree.leaves(nnx.state(m, nnx.RngCount)) for m in models]
    for a, b in zip(*counts, strict=True):
        np.testing.assert_array_equal(a, b)


def test_remat_layers_differentiate_only_what_is_asked():
    """The embeddings' gradient flows through `remat_layers` too (the input of the first layer), and a frozen
    model gets no gradient computed for its frozen weights (symbolic zeros)."""
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 128, (1, 20)))
    models = [CausalLM(CFG, remat=remat, rngs=nnx.Rngs(0)) for remat in (True, False)]

    def loss(m):
        return jnp.mean(m(ids) ** 2)

    grads = [nnx.jit(nnx.grad(loss))(m) for m in models]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", [True, False])
def test_mlp_over_chunks_equals_the_whole_mlp(monkeypatch, remat):
    """1400 tokens (2 x 700) in chunks of 256: five whole chunks and a last one of 120."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 700)))
    results = []
    for elements in (1 << 24, 256 * CFG.intermediate_size):
        monkeypatch.setattr(llama, "MLP_CHUNK_ELEMENTS", elements)
        results.append(loss_and_grads(qlora_model(CFG, remat), ids)[0])
    assert llama.mlp_chunk(CFG.intermediate_size) == 256
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(results[1][1]))
    assert_close(*results, atol=1e-6 * scale)


def test_mlp_chunks_recompute_their_dropout_masks(monkeypatch):
    """With dropout, each chunk draws its own masks: the recomputing model (`remat`) gets the gradients of the
    one that keeps the masks (`_KEEP`), so the backward pass saw the forward pass's masks."""
    monkeypatch.setattr(llama, "MLP_CHUNK_ELEMENTS", 256 * CFG.intermediate_size)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 700)))
    results = []
    for remat in (True, False):
        model = qlora_model(CFG, remat, dropout=0.3)
        model.train()
        results.append(loss_and_grads(model, ids)[0])
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(results[1][1]))
    assert_close(*results, atol=1e-6 * scale)


def step_temp(cfg, seq, dtype=jnp.bfloat16):
    model = qlora_model(cfg, remat=True, dtype=dtype)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def loss(lora, rest, ids):
        return jnp.mean(nnx.merge(graphdef, lora, rest, copy=True)(ids))

    grad = jax.jit(jax.grad(loss))
    return grad.lower(lora, rest, ids).compile().memory_analysis().temp_size_in_bytes


def test_each_layer_keeps_only_its_bfloat16_input():
    """A Llama-3-8B-shaped QLoRA step (bfloat16, `remat`, 8192 tokens; a 1024-token vocabulary), compiled
    abstractly for 2 and 4 layers: each further layer adds its input (`seq x hidden x 2` bytes) to the
    temporaries. (XLA:CPU stacks 16-bit floats in float32; the scanned `nnx.remat` layers' inputs, kept as
    bfloat16 by JAX, cost 2x that, and 4x from 16 layers on: a float32 copy of the whole stack.)"""
    import dataclasses

    from qlora_jax._src.memory import step_memory
    from qlora_jax.app.report import PRESETS

    seq, cfg = 8192, dataclasses.replace(PRESETS["llama-3-8b"], vocab_size=1024)
    temps = [step_memory(dataclasses.replace(cfg, num_layers=n), "qlora", seq_len=seq, loss_chunk=1024).temp_bytes
             for n in (2, 4)]
    per_layer = (temps[1] - temps[0]) / 2
    layer_input = seq * cfg.hidden_size * 2
    assert per_layer < 1.25 * layer_input, (per_layer, layer_input)


def test_long_sequence_mlp_keeps_one_chunk(monkeypatch):
    """The MLP's activations (`seq x intermediate`) of 8192 tokens exist one chunk of 1024 at a time: the compiled
    gradient's temporaries stay under two float32 copies of them (whole: more than four)."""
    import dataclasses

    cfg = dataclasses.replace(CFG, hidden_size=64, intermediate_size=1024, num_layers=1, vocab_size=256)
    seq = 8192
    activations = seq * cfg.intermediate_size * 4
    monkeypatch.setattr(llama, "MLP_CHUNK_ELEMENTS", 1024 * cfg.intermediate_size)  # chunks of 1024 tokens
    chunked = step_temp(cfg, seq)
    monkeypatch.setattr(llama, "MLP_CHUNK_ELEMENTS", 1 << 30)
    whole = step_temp(cfg, seq)
    assert whole > 4 * activations and chunked < 2 * activations, (whole, chunked, activations)


@pytest.mark.parametrize("group", [2, pytest.param(5, marks=pytest.mark.slow), 7])
def test_remat_groups_equal_every_layer_kept(group):
    """`remat_group`: 5 layers in groups of 2 (the last one alone), one group of 5, and a group larger than the
    model: the same loss, adapter gradients and RNG counts as keeping every layer's input, with dropout."""
    import dataclasses

    cfg = dataclasses.replace(CFG, num_layers=5)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 30)))
    results = []
    for g in (1, group):
        model = CausalLM(cfg, remat=True, remat_group=g, rngs=nnx.Rngs(0))
        model = qj.apply_qlora(model, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=4, dropout=0.2),
                               rngs=nnx.Rngs(1))
        model.train()
        results.append((loss_and_grads(model, ids, steps=2), jax.tree.leaves(nnx.state(model, nnx.RngCount))))
    (want, want_counts), (got, got_counts) = results
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want[0][1]))
    assert scale > 0
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, atol=1e-6 * scale)  # float32 rounding of differently grouped programs (~4e-7 x scale)
    for a, b in zip(got_counts, want_counts, strict=True):
        np.testing.assert_array_equal(a, b)


def test_remat_group_keeps_fewer_layer_inputs():
    """Compiled QLoRA steps of 4 and 8 layers: keeping every layer's input adds one input per layer; keeping
    every 4th adds one per 4 layers, and XLA a little more per layer (0.65 inputs measured at this size)."""
    import dataclasses

    from qlora_jax._src.memory import step_memory

    seq, cfg = 4096, dataclasses.replace(CFG, hidden_size=512, intermediate_size=1024, vocab_size=256,
                                         num_heads=8, num_kv_heads=4)
    layer_input = seq * cfg.hidden_size * 4  # float32

    def per_layer(group):
        temps = [step_memory(dataclasses.replace(cfg, num_layers=n), "qlora", seq_len=seq, dtype=jnp.float32,
                             loss_chunk=1024, remat_group=group, rank=4).temp_bytes for n in (4, 8)]
        return (temps[1] - temps[0]) / 4

    every, fourth = per_layer(1), per_layer(4)
    assert every > 0.9 * layer_input and fourth < 0.75 * layer_input, (every, fourth, layer_input)

"""The 16-bit output head under float32 compute: `head_logits` converts it a chunk at a time.

Against a float64 NumPy product (values and gradients, frozen and trained kernel, `nnx.Linear` layout and tied
embeddings, a vocabulary that the chunk does not divide), and on the compiled step's memory: no float32 copy of
the whole head among the temporaries (the plain `nnx.Linear` under float32 compute has one).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qlora_jax as qj
from qlora_jax._src.models import llama
from qlora_jax.models import CausalLM, ModelConfig


@pytest.mark.parametrize("vocab_axis", [1, 0])
def test_head_logits_and_gradients_match_float64(monkeypatch, vocab_axis):
    monkeypatch.setattr(llama, "HEAD_CHUNK", 64)  # 200 entries: 3 chunks of 64 and one of 8
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 3, 16)).astype(np.float32)
    kernel = jnp.asarray(rng.standard_normal((16, 200) if vocab_axis == 1 else (200, 16)), jnp.bfloat16)
    k64 = np.asarray(kernel.astype(jnp.float32), np.float64)
    w64 = k64 if vocab_axis == 1 else k64.T  # [hidden, vocab]
    g = rng.standard_normal((2, 3, 200))
    np.testing.assert_allclose(llama.head_logits(jnp.asarray(h), kernel, vocab_axis), h @ w64, rtol=1e-5, atol=1e-5)

    def loss(h, kernel):  # <logits, g>: d/dh = g @ w.T, d/dw = h.T @ g
        return jnp.sum(llama.head_logits(h, kernel, vocab_axis) * jnp.asarray(g, jnp.float32))

    dh, dk = jax.jit(jax.grad(loss, (0, 1)))(jnp.asarray(h), kernel)
    np.testing.assert_allclose(dh, g @ w64.T, rtol=1e-5, atol=1e-4)
    dw64 = h.reshape(-1, 16).T.astype(np.float64) @ g.reshape(-1, 200)
    expected_dk = dw64 if vocab_axis == 1 else dw64.T
    assert dk.dtype == jnp.bfloat16 and dk.shape == kernel.shape
    np.testing.assert_allclose(np.asarray(dk.astype(jnp.float32)), expected_dk, rtol=1e-2, atol=1e-2)
    dh_frozen = jax.jit(jax.grad(loss))(jnp.asarray(h), kernel)  # kernel not differentiated: no dw at all
    np.testing.assert_allclose(dh_frozen, dh, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_with_16_bit_head_keeps_no_float32_copy_of_it(tied):
    """Float32 compute over a 16-bit model."""
    cfg = ModelConfig(vocab_size=32768, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4,
                      num_kv_heads=4, tie_word_embeddings=tied)

    def build(param_dtype):
        model = CausalLM(cfg, dtype=jnp.float32, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        return qj.apply_qlora(model, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=2), rngs=nnx.Rngs(1))

    ids = np.arange(8, dtype=np.int32).reshape(1, 8)

    def loss_fn(model):
        logits = model(ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, (ids + 1) % cfg.vocab_size).mean()

    model = build(jnp.bfloat16)
    grad = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam)))
    temp = grad.lower(model).compile().memory_analysis().temp_size_in_bytes
    head_f32 = cfg.vocab_size * cfg.hidden_size * 4  # 32 MiB
    assert temp < 0.5 * head_f32, (temp, head_f32)
    # the same logits and adapter gradients as the float32 head holding the same (bfloat16-exact) values
    reference = build(jnp.float32)
    nnx.update(reference, jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x,
                                       nnx.state(model)))
    np.testing.assert_allclose(model(ids), reference(ids), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grad(model)), jax.tree.leaves(grad(reference)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_bfloat16_compute_on_the_cpu_converts_the_head_a_chunk_at_a_time(tied):
    """On the CPU, XLA computes a bfloat16 product in float32 and would convert the whole 16-bit head for it:
    the model's logits of bfloat16 hidden states are the float32 product (against float64), and the compiled
    gradient holds no float32 copy of the head."""
    assert jax.default_backend() == "cpu"
    cfg = ModelConfig(vocab_size=32768, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4,
                      num_kv_heads=4, tie_word_embeddings=tied)
    model = CausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model = qj.apply_qlora(model, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=2), rngs=nnx.Rngs(1))
    ids = np.arange(8, dtype=np.int32).reshape(1, 8)
    h = model.hidden_states(ids)
    assert h.dtype == jnp.bfloat16
    kernel = model.embed_tokens.embedding[...].T if tied else model.lm_head.kernel[...]
    want = np.asarray(h.astype(jnp.float32), np.float64) @ np.asarray(kernel.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(model.logits_from_hidden(h), want, rtol=1e-5, atol=1e-5)

    def loss_fn(model):
        logits = model(ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, (ids + 1) % cfg.vocab_size).mean()

    grad = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam)))
    temp = grad.lower(model).compile().memory_analysis().temp_size_in_bytes
    assert temp < 0.5 * cfg.vocab_size * cfg.hidden_size * 4, temp

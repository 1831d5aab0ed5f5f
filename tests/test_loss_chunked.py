"""`chunked_cross_entropy`: the loss of `masked_cross_entropy` from hidden states, without the full logits.

Values and gradients (hidden states, head weights, LoRA factors of a targeted
`lm_head`, a tied embedding) equal the unchunked loss's to float32 rounding
for chunk sizes that divide the tokens, do not, and exceed them; a float64
NumPy reference checks the numbers themselves; the train step's loss on a
`CausalLM` is unchanged by `loss_chunk`; and the compiled step's temporaries
stay below one `[seq, vocab]` float32 array only when the loss is chunked.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import by_default
from flax import nnx

import qlora_jax as qj
from qlora_jax._src.train.step import _loss_sums
from qlora_jax.train import chunked_cross_entropy, masked_cross_entropy

BATCH, SEQ, HIDDEN, VOCAB = 2, 12, 16, 40
CHUNKS = [1, 5, 8, 24, 100]  # 24 tokens in all: 5 divides nothing, 8 divides, 24 is one chunk, 100 exceeds


def _data(seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((BATCH, SEQ, HIDDEN)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
    weights = (rng.random((BATCH, SEQ)) < 0.7) * rng.uniform(0.5, 2.0, (BATCH, SEQ))  # some tokens masked
    return hidden, targets, jnp.asarray(weights, jnp.float32)


def _assert_close(actual, expected, rtol=1e-6):
    """Equal up to `rtol` of the largest magnitude (float32 sums added in another order)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _lora_head(dropout=0.0):
    """A QLoRA output head (`[HIDDEN, VOCAB]`, NF4) with non-zero B, as `apply_qlora` makes for a targeted lm_head."""
    kernel = jax.random.normal(jax.random.key(3), (HIDDEN, VOCAB)) * 0.3
    head = qj.nnx.QLoRALinear(qj.quantize(kernel, "nf4", block_size=32),
                              lora=qj.LoraConfig(rank=4, alpha=8, dropout=dropout), rngs=nnx.Rngs(params=4, dropout=5))
    head.lora_b.set_value(jax.random.normal(jax.random.key(6), head.lora_b.get_value().shape) * 0.2)
    return head


def _plain(module_head, hidden, targets, weights):
    return masked_cross_entropy(module_head(hidden), targets, weights)


@pytest.mark.parametrize("chunk", by_default(CHUNKS, 5, 24))
def test_values_and_gradients_equal_the_unchunked_loss(chunk):
    """A dense head: the sums, and the gradients w.r.t. the hidden states and the kernel and bias."""
    hidden, targets, weights = _data()
    head = nnx.Linear(HIDDEN, VOCAB, rngs=nnx.Rngs(0))

    def loss(fn, head, hidden):
        loss_sum, weight_sum = fn(head, hidden)
        return loss_sum, weight_sum

    chunked = functools.partial(loss, lambda m, h: chunked_cross_entropy(h, m, targets, weights, chunk_size=chunk))
    plain = functools.partial(loss, lambda m, h: _plain(m, h, targets, weights))
    grad = functools.partial(nnx.value_and_grad, argnums=(0, 1), has_aux=True)
    (c_sum, c_w), (c_head, c_hidden) = grad(chunked)(head, hidden)
    (p_sum, p_w), (p_head, p_hidden) = grad(plain)(head, hidden)
    assert float(c_w) == float(p_w) == pytest.approx(float(weights.sum()))
    _assert_close(c_sum, p_sum)
    _assert_close(c_hidden, p_hidden)
    _assert_close(c_head["kernel"][...], p_head["kernel"][...])
    _assert_close(c_head["bias"][...], p_head["bias"][...])
    assert np.abs(np.asarray(c_hidden)).max() > 0 and np.all(np.asarray(c_hidden)[np.asarray(weights) == 0] == 0)


@pytest.mark.parametrize("chunk", by_default(CHUNKS, 8, 100))
def test_lora_head_adapter_gradients_equal_the_unchunked_loss(chunk):
    """A QLoRA `lm_head`: the LoRA factors' gradients (only `nnx.LoRAParam` differentiated, as the train step)."""
    hidden, targets, weights = _data(1)
    head = _lora_head()

    def chunked(m, h):
        return chunked_cross_entropy(h, m, targets, weights, chunk_size=chunk)[0]

    def plain(m, h):
        return _plain(m, h, targets, weights)[0]

    argnums = (nnx.DiffState(0, nnx.LoRAParam), 1)
    c_loss, (c_lora, c_hidden) = nnx.value_and_grad(chunked, argnums=argnums)(head, hidden)
    p_loss, (p_lora, p_hidden) = nnx.value_and_grad(plain, argnums=argnums)(head, hidden)
    _assert_close(c_loss, p_loss)
    _assert_close(c_hidden, p_hidden)
    for name in ("lora_a", "lora_b"):
        assert np.abs(np.asarray(p_lora[name][...])).max() > 0
        _assert_close(c_lora[name][...], p_lora[name][...])


@pytest.mark.parametrize("chunk", [5, 100])
def test_tied_embedding_head_and_plain_functions(chunk):
    """`embed.attend` (a bound method: the embedding's gradient gathers the lookup's and the head's), and a plain
    function of arrays."""
    hidden, targets, weights = _data(2)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
    embed = nnx.Embed(VOCAB, HIDDEN, rngs=nnx.Rngs(0))

    def chunked(e):
        return chunked_cross_entropy(e(ids) + hidden, e.attend, targets, weights, chunk_size=chunk)[0]

    def plain(e):
        return _plain(e.attend, e(ids) + hidden, targets, weights)[0]

    c_loss, c_grad = nnx.value_and_grad(chunked)(embed)
    p_loss, p_grad = nnx.value_and_grad(plain)(embed)
    _assert_close(c_loss, p_loss)
    _assert_close(c_grad["embedding"][...], p_grad["embedding"][...])

    kernel = jax.random.normal(jax.random.key(0), (HIDDEN, VOCAB))
    fn_grad = jax.grad(lambda k, h: chunked_cross_entropy(h, lambda x: x @ k, targets, weights, chunk_size=chunk)[0],
                       argnums=(0, 1))(kernel, hidden)
    ref_grad = jax.grad(lambda k, h: masked_cross_entropy(h @ k, targets, weights)[0], argnums=(0, 1))(kernel, hidden)
    for mine, ref in zip(fn_grad, ref_grad, strict=True):
        _assert_close(mine, ref)


def test_matches_a_float64_numpy_reference():
    """`Σ w·ce` and `Σ w` against log-softmax in float64 NumPy, under jit, with chunks that do not divide."""
    hidden, targets, weights = _data(3)
    kernel = np.random.default_rng(3).standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    loss_sum, weight_sum = jax.jit(lambda h: chunked_cross_entropy(h, lambda x: x @ kernel, targets, weights,
                                                                   chunk_size=7))(hidden)
    logits = np.asarray(hidden, np.float64) @ kernel.astype(np.float64)  # [batch, seq, vocab]
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)[..., 0]
    w = np.asarray(weights, np.float64)
    np.testing.assert_allclose(float(loss_sum), (w * ce).sum(), rtol=2e-6)
    np.testing.assert_allclose(float(weight_sum), w.sum(), rtol=1e-7)


def test_head_dropout_is_recomputed_with_the_same_masks():
    """With adapter dropout in the head, the RNG state runs through the chunk loop: the gradient equals that of
    the same chunks computed one after another without remat (same keys, in the same order), and the head's
    dropout count advances once per chunk."""
    hidden, targets, weights = _data(4)
    chunk, n_chunks = 5, 5  # 24 tokens: 5 chunks of 5, the last padded

    def chunked(m):
        return chunked_cross_entropy(hidden, m, targets, weights, chunk_size=chunk)[0]

    def unrolled(m):
        h = jnp.pad(hidden.reshape(-1, HIDDEN), ((0, 1), (0, 0))).reshape(n_chunks, 1, chunk, HIDDEN)
        t = jnp.pad(targets.reshape(-1), (0, 1)).reshape(n_chunks, 1, chunk)
        w = jnp.pad(weights.reshape(-1), (0, 1)).reshape(n_chunks, 1, chunk)
        return sum(masked_cross_entropy(m(h[i]), t[i], w[i])[0] for i in range(n_chunks))

    heads = [_lora_head(dropout=0.5) for _ in range(2)]
    start = int(heads[0].rngs.count[...])
    wrt = nnx.DiffState(0, nnx.LoRAParam)
    c_loss, c_grad = nnx.jit(nnx.value_and_grad(chunked, argnums=wrt))(heads[0])
    u_loss, u_grad = nnx.value_and_grad(unrolled, argnums=wrt)(heads[1])
    assert int(heads[0].rngs.count[...]) == int(heads[1].rngs.count[...]) == start + n_chunks
    _assert_close(c_loss, u_loss)
    for name in ("lora_a", "lora_b"):
        _assert_close(c_grad[name][...], u_grad[name][...])
    plain = _plain(_lora_head(dropout=0.5), hidden, targets, weights)[0]
    assert abs(float(c_loss) - float(plain)) > 1e-3  # the masks did apply (other keys than one unchunked call)


def test_bad_arguments_are_named():
    hidden, targets, weights = _data()
    head = nnx.Linear(HIDDEN, VOCAB, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, head, targets, weights, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(hidden, head, targets[:, :-1], weights, chunk_size=4)
    with pytest.raises(TypeError, match="head"):
        chunked_cross_entropy(hidden, "lm_head", targets, weights, chunk_size=4)
    with pytest.raises(ValueError, match="loss_chunk"):
        qj.train.TrainConfig(total_steps=1, loss_chunk=0)
    assert qj.train.TrainConfig(total_steps=1, loss_chunk=None).loss_chunk is None
    assert qj.train.TrainConfig(total_steps=1).to_dict()["loss_chunk"] == 1024


def _causal_lm(tied, vocab=256, hidden=64, dropout=0.0):
    cfg = qj.models.ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_layers=2,
                                num_heads=4, num_kv_heads=2, tie_word_embeddings=tied)
    targets = ["q_proj", "v_proj", "down_proj"] + ([] if tied else ["lm_head"])
    model = qj.apply_qlora(qj.models.CausalLM(cfg, rngs=nnx.Rngs(0)), quant=qj.QuantConfig(block_size=32),
                           lora=qj.LoraConfig(rank=4, alpha=8, targets=targets, dropout=dropout), rngs=nnx.Rngs(1))
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] == "lora_b":  # non-zero B: every adapter changes the loss
            v.set_value(jax.random.normal(jax.random.key(len(path)), v.get_value().shape) * 0.05)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_train_step_loss_and_gradients_do_not_depend_on_loss_chunk(tied):
    """`_loss_sums` (the train step's loss) of a QLoRA `CausalLM` (LoRA on `lm_head` when untied), packed
    segments: the loss and every adapter gradient are the same with `loss_chunk=7` (6 chunks, the last padded)
    as with None."""
    model = _causal_lm(tied)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (2, 20)).astype(np.int32)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, axis=1),
             "weights": (rng.random((2, 20)) < 0.8).astype(np.float32),
             "segment_ids": np.repeat([[1] * 12 + [2] * 8], 2, axis=0).astype(np.int32),
             "positions": np.repeat([list(range(12)) + list(range(8))], 2, axis=0).astype(np.int32)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    grad_fn = nnx.jit(nnx.value_and_grad(_loss_sums, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True),
                      static_argnames="loss_chunk")
    (_, (ref_loss, ref_tokens)), ref = grad_fn(model, batch, loss_chunk=None)
    ref = nnx.to_flat_state(ref)
    assert any(path[0] == "lm_head" for path, _ in ref) != tied
    (_, (loss, tokens)), grads = grad_fn(model, batch, loss_chunk=7)
    assert float(tokens) == float(ref_tokens)
    _assert_close(loss, ref_loss)
    for (path, g), (ref_path, r) in zip(nnx.to_flat_state(grads), ref, strict=True):
        assert path == ref_path
        assert np.abs(np.asarray(r[...])).max() > 0, path
        _assert_close(g[...], r[...])


def test_model_without_the_hidden_state_api_keeps_the_plain_loss():
    """A model that only returns logits: `loss_chunk` is ignored, the loss is the plain one."""
    class TinyLM(nnx.Module):
        def __init__(self):
            self.embed = nnx.Embed(16, 8, rngs=nnx.Rngs(0))

        def __call__(self, input_ids, **kwargs):
            return self.embed.attend(self.embed(input_ids))

    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    batch = {"input_ids": ids, "targets": (ids + 1) % 16, "weights": jnp.ones((2, 6), jnp.float32)}
    model = TinyLM()
    plain = _loss_sums(model, batch)[1]
    chunked = _loss_sums(model, batch, loss_chunk=4)[1]
    assert [float(x) for x in chunked] == [float(x) for x in plain]


def _step_temp_bytes(model, batch, loss_chunk):
    """Temporaries of the compiled gradient of the train step's loss (adapters only, as the train step)."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora, rest, batch):
        return _loss_sums(nnx.merge(graphdef, lora, rest, copy=True), batch, loss_chunk=loss_chunk)[0]

    compiled = jax.jit(jax.value_and_grad(loss)).lower(lora, rest, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_step_never_holds_the_full_logits():
    """Vocabulary 32768, 512 tokens: one `[seq, vocab]` float32 array is 64 MiB. The compiled gradient of the
    train step's loss needs less than that in temporaries with `loss_chunk=64`, and more without chunking;
    `step_memory` (the memory report's AdamW step, bfloat16) shows the same."""
    model = _causal_lm(tied=False, vocab=32768, hidden=64)
    seq = 512
    logits_bytes = seq * 32768 * 4
    batch = {"input_ids": jax.ShapeDtypeStruct((1, seq), jnp.int32),
             "targets": jax.ShapeDtypeStruct((1, seq), jnp.int32),
             "weights": jax.ShapeDtypeStruct((1, seq), jnp.float32)}
    chunked, plain = _step_temp_bytes(model, batch, 64), _step_temp_bytes(model, batch, None)
    assert chunked < 0.5 * logits_bytes < logits_bytes < plain, (chunked, plain, logits_bytes)

    from qlora_jax._src.memory import step_memory

    cfg = model.config
    rows = [step_memory(cfg, "qlora", rank=4, seq_len=seq, loss_chunk=c) for c in (64, None)]
    assert rows[0].temp_bytes < logits_bytes < rows[1].temp_bytes, [r.temp_bytes for r in rows]


def test_checkpoint_without_loss_chunk_resumes(tmp_path):
    """A checkpoint whose stored TrainConfig predates `loss_chunk` restores under today's config (the new field
    is not compared), and a real difference is still refused."""
    import dataclasses

    head = _lora_head()
    config = qj.train.TrainConfig(total_steps=10)
    optimizer = nnx.Optimizer(head, qj.train.make_optimizer(config), wrt=nnx.LoRAParam)
    old_fields = {k: v for k, v in config.to_dict().items() if k != "loss_chunk"}
    old = dataclasses.make_dataclass("TrainConfig", list(old_fields))(**old_fields)  # TrainConfig before loss_chunk
    qj.checkpoint.save(tmp_path, head, optimizer, step=3, data_state={"row": 7}, config=old)
    meta = qj.checkpoint.restore(tmp_path, head, optimizer, config=config)
    assert (meta.step, meta.data_state) == (3, {"row": 7})
    with pytest.raises(ValueError, match=r"different TrainConfig.*'lr'"):
        qj.checkpoint.restore(tmp_path, head, optimizer, config=qj.train.TrainConfig(total_steps=10, lr=1e-3))

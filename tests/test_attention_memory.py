"""`attention`'s memory-efficient backward pass: values and gradients against a float64 NumPy softmax
attention, and the compiled gradient's temporaries against the whole `[heads, s, s]` probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax._src.models import llama
from qlora_jax.models import causal_mask


def reference(q, k, v, mask, grad_out):
    """Softmax attention and its gradients `(out, dq, dk, dv)` in float64 (`[b, s, heads, d]` in and out).

    Every row of `mask` must let its query see at least one key.
    """
    q, k, v, grad_out = (np.asarray(x, np.float64) for x in (q, k, v, grad_out))
    b, sq, heads, d = q.shape
    groups = heads // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # [b, sk, heads, d]
    mask = np.asarray(mask)[:, None]  # [b, 1, sq, sk]
    scores = np.where(mask, np.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # [b, heads, sq, sk]
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    grad_probs = np.einsum("bqhd,bkhd->bhqk", grad_out, v)
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdims=True)) * d**-0.5
    dq = np.einsum("bhqk,bkhd->bqhd", grad_scores, k)
    dk = np.einsum("bhqk,bqhd->bkhd", grad_scores, q)
    dv = np.einsum("bhqk,bqhd->bkhd", probs, grad_out)
    kv_sum = lambda x: x.reshape(b, x.shape[1], -1, groups, d).sum(3)  # noqa: E731  (GQA: sum over a group)
    return out, dq, kv_sum(dk), kv_sum(dv)


def check(q, k, v, mask, causal, rtol=2e-5):
    rng = np.random.default_rng(1)
    b, sq, heads, d = q.shape
    grad_out = jnp.asarray(rng.normal(size=(b, sq, heads * d)), q.dtype)

    def loss(q, k, v):
        out = llama.attention(q, k, v, mask, causal=causal)
        return jnp.sum(out * grad_out), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    want = reference(q, k, v, mask, np.asarray(grad_out, np.float64).reshape(b, sq, heads, d))
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), want, strict=True):
        got = np.asarray(got, np.float64).reshape(ref.shape)
        err = np.abs(got - ref).max() / (np.abs(ref).max() or 1.0)  # dq = 0 with a single key
        assert err < rtol, f"{name}: relative error {err:.2e}"


def inputs(seq, heads=4, kv_heads=2, d=16, batch=2, sk=None, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    sk = seq if sk is None else sk
    q = jnp.asarray(rng.normal(size=(batch, seq, heads, d)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, sk, kv_heads, d)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, sk, kv_heads, d)), dtype)
    return q, k, v


@pytest.mark.parametrize("seq", [1, 37, 300, 1100])
def test_causal_matches_float64(seq):
    """One block (37), blocks that do not divide the sequence (300: 5 of 60; 1100: 8 of 137 or 138)."""
    q, k, v = inputs(seq)
    check(q, k, v, causal_mask(seq, batch=2), causal=True)


def test_causal_with_padding_and_segments_matches_float64():
    """Right padding and two packed segments (`causal_mask`'s rows all see at least their own token)."""
    seq = 333
    attention_mask = np.ones((2, seq), np.int32)
    attention_mask[0, -40:] = 0  # a padded query still sees the real keys before it
    segment_ids = np.zeros((2, seq), np.int32)
    segment_ids[1, 150:] = 1
    mask = causal_mask(seq, jnp.asarray(attention_mask), jnp.asarray(segment_ids), None, 2)
    attention_mask[0, -40:] = 1  # the reference needs a key per row: let padded queries see themselves
    mask = mask | jnp.eye(seq, dtype=bool)[None]
    q, k, v = inputs(seq, heads=6, kv_heads=3)
    check(q, k, v, mask, causal=True)


def test_many_blocks_match_float64(monkeypatch):
    """Blocks of at most 16 queries: 19 blocks of the causal mask, 5 of a non-causal one."""
    monkeypatch.setattr(llama, "_LARGEST_QUERY_BLOCK", 16)
    assert len(llama._query_blocks(300, 300, causal=True)) == 19
    q, k, v = inputs(300)
    check(q, k, v, causal_mask(300, batch=2), causal=True)
    q, k, v = inputs(70, sk=90)
    check(q, k, v, jnp.asarray(np.random.default_rng(2).random((2, 70, 90)) < 0.3) | jnp.eye(70, 90, dtype=bool)[None],
          causal=False)


@pytest.mark.parametrize(("seq", "sk"), [(5, 700), (600, 600)])
def test_non_causal_matches_float64(seq, sk):
    """Queries against a longer cache (one block) and a long non-causal mask (two blocks)."""
    q, k, v = inputs(seq, sk=sk)
    mask = jnp.asarray(np.random.default_rng(3).random((2, seq, sk)) < 0.5) | jnp.eye(seq, sk, dtype=bool)[None]
    check(q, k, v, mask, causal=False)


def test_bfloat16_matches_float64():
    q, k, v = inputs(200, dtype=jnp.bfloat16)
    check(q, k, v, causal_mask(200, batch=2), causal=True, rtol=3e-2)


@pytest.mark.parametrize(("seq", "causal", "sizes"), [
    (100, True, {50}),  # at most 8 blocks of at least 64 queries, as the sequence allows
    (4096, True, {512}),
    (8192, True, {512}),  # blocks of at most _LARGEST_QUERY_BLOCK
    (1000, False, {500}),
    (100, False, {100}),
])
def test_query_blocks_cover_the_queries(seq, causal, sizes):
    blocks = llama._query_blocks(seq, seq, causal)
    assert [b[0] for b in blocks[1:]] == [b[1] for b in blocks[:-1]] and blocks[0][0] == 0 and blocks[-1][1] == seq
    assert {stop - start for start, stop, _ in blocks} == sizes
    assert all(keys == (stop if causal else seq) for _, stop, keys in blocks)


def test_gradient_keeps_one_block_of_probabilities(monkeypatch):
    """The compiled gradient of attention over 2048 tokens in 32 blocks of 64 queries needs less than a quarter
    of the float32 probabilities of all heads, which a backward pass that keeps them holds (autodiff of a
    plain softmax attention: checked too, so that the bound can fail). The blocks run one after the other,
    and the backward pass's recomputed scores are not merged with the forward pass's."""
    monkeypatch.setattr(llama, "_LARGEST_QUERY_BLOCK", 64)
    seq, heads, kv_heads, d = 2048, 4, 2, 32
    q = jax.ShapeDtypeStruct((1, seq, heads, d), jnp.float32)
    k = jax.ShapeDtypeStruct((1, seq, kv_heads, d), jnp.float32)
    mask = causal_mask(seq)

    def plain(q, k, v):
        k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * np.float32(d**-0.5)
        probs = jax.nn.softmax(jnp.where(mask[:, None], scores, np.finfo(np.float32).min), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

    def temp(f):
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
        return grad.lower(q, k, k).compile().memory_analysis().temp_size_in_bytes

    probs_bytes = heads * seq * seq * 4
    assert temp(plain) > probs_bytes
    assert temp(lambda q, k, v: llama.attention(q, k, v, mask, causal=True)) < probs_bytes / 4

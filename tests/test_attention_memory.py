"""`attention` in tiles (FlashAttention): values and gradients against a float64 NumPy softmax attention (dense
masks and `AttentionMask`s, tiles skipped or not), and the compiled gradient's temporaries against the whole
`[heads, s, s]` probabilities."""

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


def check(q, k, v, mask, causal, rtol=2e-5, dense=None):
    rng = np.random.default_rng(1)
    b, sq, heads, d = q.shape
    grad_out = jnp.asarray(rng.normal(size=(b, sq, heads * d)), q.dtype)

    def loss(q, k, v):
        out = llama.attention(q, k, v, mask, causal=causal) if causal else llama.attention(q, k, v, mask)
        return jnp.sum(out * grad_out), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    grad_out64 = np.asarray(grad_out, np.float64).reshape(b, sq, heads, d)
    want = reference(q, k, v, mask if dense is None else dense, grad_out64)
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


def test_many_tiles_match_float64(monkeypatch):
    """Tiles of 16: 19 query tiles of a causal mask (each over its own key tiles), 5 x 6 of a non-causal one."""
    monkeypatch.setattr(llama, "_BLOCK", 16)
    monkeypatch.setattr(llama, "_MIN_BLOCK", 8)
    assert llama._Tiling(300, 300, True, 1.0).nq == 19
    q, k, v = inputs(300)
    check(q, k, v, causal_mask(300, batch=2), causal=True)
    q, k, v = inputs(70, sk=90)
    check(q, k, v, jnp.asarray(np.random.default_rng(2).random((2, 70, 90)) < 0.3) | jnp.eye(70, 90, dtype=bool)[None],
          causal=False)


def test_attention_mask_matches_its_dense_mask(monkeypatch):
    """An `AttentionMask` (padding, packed segments, sliding window) gives the attention of its dense mask,
    tile by tile with the tiles before the window skipped."""
    monkeypatch.setattr(llama, "_BLOCK", 32)
    monkeypatch.setattr(llama, "_MIN_BLOCK", 8)
    seq = 250
    key_valid = np.ones((2, seq), bool)
    key_valid[0, -40:] = False  # right padding: padded queries still see the real keys in their window
    segments = np.zeros((2, seq), np.int32)
    segments[1, 100:] = 1
    mask = llama.AttentionMask(key_valid=jnp.asarray(key_valid),
                               query_segments=jnp.asarray(segments), key_segments=jnp.asarray(segments), window=70)
    dense = mask.dense(seq, seq)
    assert dense.shape == (2, seq, seq) and bool(dense.any(-1).all())
    q, k, v = inputs(seq, heads=6, kv_heads=3)
    check(q, k, v, mask, causal=False, dense=dense)


@pytest.mark.parametrize(("sq", "sk", "offset", "window"), [
    (300, 300, 0, None), (300, 300, 0, 50), (1, 700, 433, None), (5, 700, 600, 64), (40, 100, 60, 33),
])
def test_skipped_tiles_hold_no_visible_key(monkeypatch, sq, sk, offset, window):
    """Every (query, key) pair the mask allows lies in a tile that the loops visit (and causal loops skip some)."""
    monkeypatch.setattr(llama, "_BLOCK", 16)
    monkeypatch.setattr(llama, "_MIN_BLOCK", 8)
    mask = llama.AttentionMask(query_offset=offset, window=window)
    dense = np.asarray(mask.dense(sq, sk))[0]
    tiling = llama._Tiling(sq, sk, True, 1.0)  # (the scale does not change the tiles)
    visited = np.zeros((tiling.nq * tiling.bq, tiling.nk * tiling.bk), bool)
    for i in range(tiling.nq):
        first, stop = (int(x) for x in tiling.key_tiles(mask, i))
        visited[i * tiling.bq:(i + 1) * tiling.bq, first * tiling.bk:stop * tiling.bk] = True
    assert not (dense & ~visited[:sq, :sk]).any()
    assert (~visited[:sq, :sk]).any() or sq < tiling.bq


@pytest.mark.parametrize(("seq", "sk"), [(5, 700), (600, 600)])
def test_non_causal_matches_float64(seq, sk):
    """Queries against a longer cache (one block) and a long non-causal mask (two blocks)."""
    q, k, v = inputs(seq, sk=sk)
    mask = jnp.asarray(np.random.default_rng(3).random((2, seq, sk)) < 0.5) | jnp.eye(seq, sk, dtype=bool)[None]
    check(q, k, v, mask, causal=False)


def test_bfloat16_matches_float64():
    q, k, v = inputs(200, dtype=jnp.bfloat16)
    check(q, k, v, causal_mask(200, batch=2), causal=True, rtol=3e-2)


def test_gradient_keeps_one_block_of_probabilities(monkeypatch):
    """The compiled gradient of attention over 2048 tokens in 32 blocks of 64 queries needs less than a quarter
    of the float32 probabilities of all heads, which a backward pass that keeps them holds (autodiff of a
    plain softmax attention: checked too, so that the bound can fail). The blocks run one after the other,
    and the backward pass's recomputed scores are not merged with the forward pass's."""
    monkeypatch.setattr(llama, "_BLOCK", 64)
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

"""A Llama-style decoder in Flax NNX (Llama 2/3, Mistral, Qwen2/2.5/3, Gemma 1/2/3, Phi-3, OLMo-2, Granite, Mixtral).

One `CausalLM` serves every family; `ModelConfig`'s switches choose the norm kind and placement, the MLP's
activation (or Mixtral's experts, `MoE`), fused projections, q/k norms, RoPE variants, soft-capping and scalar
multipliers. Layers that alternate between sliding-window and global attention (Gemma 2/3) stay one stacked,
scanned layer: each layer's kind comes into the scan as a per-layer flag that selects its window and RoPE
frequencies.

Module and parameter names follow the Hugging Face checkpoints
(`model.layers.N.self_attn.q_proj` → `model.layers.self_attn.q_proj`,
stacked over N), so LoRA targets read as in PEFT ("q_proj", "down_proj").
The decoder layers are created with `nnx.vmap` (every variable gets a leading
layer axis); with `remat=True` they run in `remat_layers` (a scan whose
backward pass recomputes each layer from its kept input), otherwise with
`nnx.scan` under `nnx.remat` keeping their products' outputs, attention
softmax statistics and residual stream (`_KEEP`). Attention works in tiles
(FlashAttention) from per-token masks (`AttentionMask`), and the MLP over
chunks of tokens, so a long sequence's step holds neither `[s, s]` nor
`[s, intermediate]` arrays of all tokens; linear
layers are plain `nnx.Linear` until `apply_qlora` (or the loader) replaces
them. Numerics follow `transformers`' eager implementation: RMSNorm in
float32, RoPE with rotate-half, softmax in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qlora_jax._src.models.config import ModelConfig

__all__ = ["AttentionMask", "CausalLM", "KVCache", "LLAMA_AXES", "RMSNorm", "causal_mask"]

# Logical (input, output) axes of each kernel by module name (a regex on the path element that holds it), in the
# Llama family's names; an embedding table is (vocab, embed). `qj.shard_model` reads them as `CausalLM.logical_axes`.
LLAMA_AXES: dict[str, tuple[str | None, str | None]] = {
    r"[qkv]_proj|qkv_proj": ("embed", "heads"),
    r"o_proj": ("heads", "embed"),
    r"(gate|up|gate_up)_proj|w[13]": ("embed", "mlp"),
    r"down_proj|w2": ("mlp", "embed"),
    r"lm_head": ("embed", "vocab"),
    r"embed_tokens": ("vocab", "embed"),
}


class RMSNorm(nnx.Module):
    """`weight * (x / sqrt(mean(x²) + eps))`, normalized in float32, as `LlamaRMSNorm`.

    `style` "llama" casts the normalized value to `x.dtype` before the weight multiplies it (`LlamaRMSNorm`);
    "olmo2" multiplies in float32 and casts after (`Olmo2RMSNorm`); "gemma" multiplies by `1 + weight` in
    float32 and casts after (`GemmaRMSNorm`, whose weight starts at zero).

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.models import RMSNorm
        >>> RMSNorm(4)(jnp.asarray([[3.0, -3.0, 3.0, -3.0]])).round(4).tolist()
        [[1.0, -1.0, 1.0, -1.0]]
    """

    def __init__(self, size: int, eps: float = 1e-6, *, style: str = "llama", param_dtype: jnp.dtype = jnp.float32):
        if style not in ("llama", "gemma", "olmo2"):
            raise ValueError(f"style: {style!r}, expected 'llama', 'gemma' or 'olmo2'")
        self.weight = nnx.Param((jnp.zeros if style == "gemma" else jnp.ones)((size,), param_dtype))
        self.eps = float(eps)
        self.style = style

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + np.float32(self.eps))
        weight = self.weight[...].reshape((1,) * (x.ndim - 1) + (-1,))
        if self.style == "llama":
            return weight.astype(x.dtype) * h.astype(x.dtype)
        weight = weight.astype(jnp.float32)
        return ((1 + weight if self.style == "gemma" else weight) * h).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE (and q/k norms, a fused `qkv_proj`, partial RoPE, soft-capping).

    `mask` is an `AttentionMask` (or a dense `[batch, s, keys]` array); with
    a cache, the keys are the cache's.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.fused_qkv:  # Phi-3: one projection, quantized and adapted as one kernel, as stored
            self.qkv_proj = nnx.Linear(d, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd, use_bias=cfg.qkv_bias, **kw)
        else:
            self.q_proj = nnx.Linear(d, cfg.num_heads * hd, use_bias=cfg.qkv_bias, **kw)
            self.k_proj = nnx.Linear(d, cfg.num_kv_heads * hd, use_bias=cfg.qkv_bias, **kw)
            self.v_proj = nnx.Linear(d, cfg.num_kv_heads * hd, use_bias=cfg.qkv_bias, **kw)
        self.o_proj = nnx.Linear(cfg.num_heads * hd, d, use_bias=cfg.o_bias, **kw)
        self.fused_qkv, self.qk_norm_width = cfg.fused_qkv, cfg.qk_norm_width
        if cfg.qk_norm:
            per_head = cfg.qk_norm_width == "head"
            norm = functools.partial(RMSNorm, eps=cfg.rms_norm_eps, style=cfg.norm_style, param_dtype=param_dtype)
            self.q_norm = norm(hd if per_head else cfg.num_heads * hd)
            self.k_norm = norm(hd if per_head else cfg.num_kv_heads * hd)
        else:
            self.q_norm = self.k_norm = nnx.data(None)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.scale = float(hd**-0.5 if cfg.attn_scale is None else cfg.attn_scale)
        self.softcap = cfg.attn_logit_softcap

    def __call__(self, x, cos, sin, mask, cache=None):
        q, k, v = self.project(x, cos, sin)
        if cache is not None:  # write this step's keys/values at `start`, attend over the whole cache
            cache_k, cache_v, start = cache
            cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), start, axis=1)
            cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), start, axis=1)
            k, v = cache_k.astype(q.dtype), cache_v.astype(q.dtype)
        out = attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)  # [b, s, heads * head_dim]
        if cache is not None:
            return self.o_proj(out), (cache_k, cache_v)
        return self.o_proj(out)

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values `[b, s, heads, head_dim]` of `x [b, s, hidden]`, RoPE applied."""
        b, s, _ = x.shape
        hd = self.head_dim
        if self.fused_qkv:
            qkv = self.qkv_proj(x)  # [b, s, (heads + 2 kv_heads) * head_dim], q then k then v
            q_end, k_end = self.num_heads * hd, (self.num_heads + self.num_kv_heads) * hd
            q, k, v = qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = checkpoint_name(q, "proj_q"), checkpoint_name(k, "proj_k")
        if self.q_norm is not None and self.qk_norm_width == "projection":  # OLMo-2: over all heads at once
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, s, self.num_heads, hd)
        k = k.reshape(b, s, self.num_kv_heads, hd)
        v = v.reshape(b, s, self.num_kv_heads, hd)
        if self.q_norm is not None and self.qk_norm_width == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        return checkpoint_name(q, "attn_q"), checkpoint_name(k, "attn_k"), checkpoint_name(v, "attn_v")


# What a decoder layer keeps for its backward pass when the model is not rematerialized: the products'
# outputs that the backward pass reads (q/k/v after RoPE, and before it where Qwen3's q/k norms need them),
# the softmax's row statistics (attention's backward pass recomputes the probabilities from them, one block
# of queries at a time: keeping the float32 probabilities would cost heads x seq x seq x 4 bytes a layer) and
# the attention output, the residual stream after attention (the layer's input is the scan's carry), the
# MLP's gate and up products and the adapters' dropout masks (drawing the random bits again costs more than
# keeping one byte per input). The RMSNorm outputs (the projections' inputs) and the SwiGLU product
# (down_proj's input) are recomputed from these in the backward pass: elementwise passes, where keeping them
# costs a copy into the scan's stacked residuals and one out of it.
_KEPT = ("proj_q", "proj_k", "attn_q", "attn_k", "attn_v", "attn_stats", "attn_out", "h_mid", "mlp_gate", "mlp_up",
         "lora_dropout_mask")
_KEEP = jax.checkpoint_policies.save_only_these_names(*_KEPT)


# Attention is computed in tiles of at most `_BLOCK` queries by `_BLOCK` keys (see `attention`); shorter
# sequences get tiles of a quarter of their length, but not under `_MIN_BLOCK` (nor a tile longer than the
# sequence).
_BLOCK = 512
_MIN_BLOCK = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see, as facts about tokens instead of a `[batch, queries, keys]` array.

    Query `i` sits at key position `query_offset + i` and sees key `j` when `j <= query_offset + i` (causal),
    `query_offset + i - j < window` (when a sliding window is set), `key_valid[:, j]` (not padding) and
    `query_segments[:, i] == key_segments[:, j]` (packed sequences). `attention` builds each tile's mask from
    these, so a long sequence's mask costs `O(seq)` memory, and it skips the tiles that no query can see.

    Attributes:
        query_offset: Key position of the first query: 0 for self-attention, the cache's length when
            decoding (a scalar, may be traced).
        key_valid: `[batch, keys]` bool, False for padding; None: every key.
        query_segments: `[batch, queries]` segment ids (None: one segment); given with `key_segments`.
        key_segments: `[batch, keys]` segment ids.
        window: Sliding window in positions (static), or None.
        window_active: With a `window`: a bool scalar (may be traced), False where this layer attends
            globally (layers that alternate, Gemma 2/3: the flag comes per layer through the scan); None:
            the window applies.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.models import AttentionMask
        >>> AttentionMask(window=2).dense(3, 3).astype(int).tolist()
        [[[1, 0, 0], [1, 1, 0], [0, 1, 1]]]
    """

    query_offset: jax.Array | int = 0
    key_valid: jax.Array | None = None
    query_segments: jax.Array | None = None
    key_segments: jax.Array | None = None
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    window_active: jax.Array | None = None

    def allowed(self, queries: jax.Array, keys: jax.Array, key_valid: jax.Array | None = None,
                query_segments: jax.Array | None = None, key_segments: jax.Array | None = None) -> jax.Array:
        """`[batch or 1, len(queries), len(keys)]` bool for query indices `queries` and key indices `keys`.

        The per-token arrays default to this mask's own, indexed by `keys`/`queries`; a tile passes its slices.
        """
        position = self.query_offset + queries[:, None]  # [q, 1]
        allowed = keys[None, :] <= position
        if self.window is not None:
            inside = position - keys[None, :] < self.window
            allowed = allowed & (inside if self.window_active is None else inside | ~self.window_active)
        allowed = allowed[None]
        if self.key_valid is not None:
            valid = self.key_valid[:, keys] if key_valid is None else key_valid
            allowed = allowed & valid[:, None, :]
        if self.query_segments is not None:
            q_seg = self.query_segments[:, queries] if query_segments is None else query_segments
            k_seg = self.key_segments[:, keys] if key_segments is None else key_segments
            allowed = allowed & (q_seg[:, :, None] == k_seg[:, None, :])
        return allowed

    def dense(self, queries: int, keys: int) -> jax.Array:
        """The whole mask, `[batch or 1, queries, keys]` bool (see the class example)."""
        return self.allowed(jnp.arange(queries), jnp.arange(keys))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | jax.Array, *,
              causal: bool = False, scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """Grouped-query softmax attention in tiles (FlashAttention), scores and softmax in float32.

    As in FlashAttention (Dao et al., 2022, https://arxiv.org/abs/2205.14135; the backward pass as in
    FlashAttention-2), queries and keys are cut into tiles of at most `_BLOCK`; a loop over the query tiles
    runs an inner loop over the key tiles that the tile's queries can see (with an `AttentionMask`, or a
    causal dense mask: none after the tile's last query, none before its sliding window), keeping a running
    maximum, normalizer and weighted sum of the values per query. The forward pass saves each query's
    log-sum-exp of the scores (`[b, kv, groups, s]`); the backward pass runs the same loops and recomputes
    each tile's probabilities from it. So one tile's `[.., tile, tile]` scores exist at a time, forward and
    backward, and the cost of long causal sequences is about half of the full product.

    Masked scores are `finfo(float32).min` (as `transformers`' eager attention): a query that sees no key at
    all averages the values of the keys its tiles cover.

    Args:
        q: Queries `[b, sq, heads, d]` (after RoPE).
        k: Keys `[b, sk, kv_heads, d]`; `heads` a multiple of `kv_heads`.
        v: Values, as `k`.
        mask: An `AttentionMask` (causal), or a dense `[b or 1, sq, sk]` bool array, True where a query may
            attend to a key.
        causal: With a dense mask: whether it lets no query `i` see a key after `i` (`sq == sk`), so that the
            tiles after each query tile are skipped.
        scale: Scores are `scale * q·k` (the queries are scaled first); None: `d ** -0.5`.
        softcap: Scores become `softcap * tanh(scores / softcap)` before masking (Gemma 2), or None.

    Returns:
        `[b, sq, heads * d]` in `v.dtype`.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.models import AttentionMask
        >>> from qlora_jax._src.models.llama import attention
        >>> q, kv = jnp.ones((1, 3, 4, 8)), jnp.ones((1, 3, 2, 8))
        >>> attention(q, kv, kv, AttentionMask()).shape
        (1, 3, 32)
    """
    sq, sk = q.shape[1], k.shape[1]
    if not isinstance(mask, AttentionMask):
        mask = jnp.asarray(mask, jnp.bool_)
        if mask.ndim != 3 or mask.shape[1:] != (sq, sk):
            raise ValueError(f"attention: mask of shape {mask.shape}, expected [batch, {sq}, {sk}]")
    elif causal:
        raise ValueError("attention: `causal` is for dense masks; an AttentionMask is causal by definition")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    tiling = _Tiling(sq, sk, isinstance(mask, AttentionMask) or causal, scale,
                     None if softcap is None else float(softcap))
    return _flash(q, k, v, mask, tiling)


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """Tile sizes and counts of an attention of `sq` queries over `sk` keys."""

    sq: int
    sk: int
    causal: bool
    scale: float
    softcap: float | None = None

    @staticmethod
    def _size(n: int) -> int:
        if n <= _MIN_BLOCK:
            return n
        return min(_BLOCK, -(-max(_MIN_BLOCK, -(-n // 4)) // 8) * 8)

    @property
    def bq(self) -> int:
        return self._size(self.sq)

    @property
    def bk(self) -> int:
        return self._size(self.sk)

    @property
    def nq(self) -> int:
        return -(-self.sq // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.sk // self.bk)

    def key_tiles(self, mask, i):
        """`(first, stop)` key tiles that query tile `i` can see (traced)."""
        if not self.causal:
            return 0, self.nk
        offset = mask.query_offset if isinstance(mask, AttentionMask) else 0
        last = offset + (i + 1) * self.bq - 1  # the tile's last query's position
        stop = jnp.minimum(self.nk, last // self.bk + 1)
        window = mask.window if isinstance(mask, AttentionMask) else None
        first = 0 if window is None else jnp.maximum(0, (offset + i * self.bq - (window - 1)) // self.bk)
        if window is not None and mask.window_active is not None:
            first = jnp.where(mask.window_active, first, 0)
        return first, stop


def _pad(x, axis, size, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value) if size != x.shape[axis] else x


def _tile_mask(mask, tiling: _Tiling, q_start, k_start, tables):
    """`(allowed [b|1, bq, bk], in_range [1, 1, 1, 1, bk])` of the tile at query `q_start`, key `k_start`."""
    bq, bk = tiling.bq, tiling.bk
    keys = k_start + jnp.arange(bk)
    in_range = (keys < tiling.sk).reshape(1, 1, 1, 1, bk)
    if isinstance(mask, AttentionMask):
        queries = q_start + jnp.arange(bq)
        sliced = {name: jax.lax.dynamic_slice_in_dim(table, q_start if name == "query_segments" else k_start,
                                                     bq if name == "query_segments" else bk, axis=1)
                  for name, table in tables.items()}
        return mask.allowed(queries, keys, **sliced), in_range
    dense = tables["dense"]
    return jax.lax.dynamic_slice(dense, (0, q_start, k_start), (dense.shape[0], bq, bk)), in_range


def _tables(mask, tiling: _Tiling):
    """The mask's per-token arrays (or the dense mask), padded to whole tiles."""
    sq_pad, sk_pad = tiling.nq * tiling.bq, tiling.nk * tiling.bk
    if not isinstance(mask, AttentionMask):
        return {"dense": _pad(_pad(mask, 1, sq_pad, False), 2, sk_pad, False)}
    tables = {}
    if mask.key_valid is not None:
        tables["key_valid"] = _pad(jnp.asarray(mask.key_valid, jnp.bool_), 1, sk_pad, False)
    if mask.query_segments is not None:
        tables["query_segments"] = _pad(mask.query_segments, 1, sq_pad, -1)
        tables["key_segments"] = _pad(mask.key_segments, 1, sk_pad, -2)
    return tables


def _tile_scores(q_tile, k_tile, allowed, in_range, softcap=None):
    """Scores `[b, kv, g, bq, bk]` in float32 (soft-capped): `finfo.min` where masked, -inf on padded keys."""
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q_tile, k_tile, preferred_element_type=jnp.float32)
    if softcap is not None:
        scores = np.float32(softcap) * jnp.tanh(scores / np.float32(softcap))
    scores = jnp.where(allowed[:, None, None], scores, np.finfo(np.float32).min)
    return jnp.where(in_range, scores, -np.inf)


def _split_heads(q, k, v, tiling: _Tiling):
    """`q [b, kv, g, sq_pad, d]` scaled by `tiling.scale`, `k, v [b, kv, sk_pad, d]`, zero-padded to whole tiles."""
    b, sq, heads, d = q.shape
    kv_heads = k.shape[2]
    q = q * np.float32(tiling.scale).astype(q.dtype)
    q = q.reshape(b, sq, kv_heads, heads // kv_heads, d).transpose(0, 2, 3, 1, 4)
    sk_pad = tiling.nk * tiling.bk
    return (_pad(q, 3, tiling.nq * tiling.bq), _pad(k.transpose(0, 2, 1, 3), 2, sk_pad),
            _pad(v.transpose(0, 2, 1, 3), 2, sk_pad))


def _merge_heads(x, sq):
    """`[b, kv, g, sq_pad, d]` → `[b, sq, heads * d]`."""
    b, kv, g, _, d = x.shape
    return x[:, :, :, :sq].transpose(0, 3, 1, 2, 4).reshape(b, sq, kv * g * d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, mask, tiling):
    return _flash_fwd(q, k, v, mask, tiling)[0]


def _flash_fwd(q, k, v, mask, tiling: _Tiling):
    bq, bk = tiling.bq, tiling.bk
    qs, ks, vs = _split_heads(q, k, v, tiling)
    b, kv, g, _, d = qs.shape
    tables = _tables(mask, tiling)

    def query_tile(_, i):
        q_tile = jax.lax.dynamic_slice_in_dim(qs, i * bq, bq, axis=3)

        def key_tile(j, carry):
            row_max, row_sum, acc = carry
            allowed, in_range = _tile_mask(mask, tiling, i * bq, j * bk, tables)
            scores = _tile_scores(q_tile, jax.lax.dynamic_slice_in_dim(ks, j * bk, bk, axis=2), allowed, in_range,
                                  tiling.softcap)
            new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1, keepdims=True))
            scale = jnp.exp(row_max - new_max)
            probs = jnp.exp(scores - new_max)
            acc = acc * scale + jnp.einsum("bkgqs,bksd->bkgqd", probs.astype(vs.dtype),
                                           jax.lax.dynamic_slice_in_dim(vs, j * bk, bk, axis=2),
                                           preferred_element_type=jnp.float32)
            return new_max, row_sum * scale + jnp.sum(probs, axis=-1, keepdims=True), acc

        first, stop = tiling.key_tiles(mask, i)
        init = (jnp.full((b, kv, g, bq, 1), -np.inf, jnp.float32), jnp.zeros((b, kv, g, bq, 1), jnp.float32),
                jnp.zeros((b, kv, g, bq, d), jnp.float32))
        row_max, row_sum, acc = jax.lax.fori_loop(first, stop, key_tile, init)
        return None, ((acc / row_sum).astype(v.dtype), row_max + jnp.log(row_sum))

    _, (out, lse) = jax.lax.scan(query_tile, None, jnp.arange(tiling.nq))  # [nq, b, kv, g, bq, .]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv, g, -1, d)
    lse = checkpoint_name(jnp.moveaxis(lse, 0, 3).reshape(b, kv, g, -1, 1), "attn_stats")
    out = checkpoint_name(_merge_heads(out, tiling.sq), "attn_out")  # [b, sq, heads * d], kept by `_KEEP`
    return out, (q, k, v, mask, out, lse)


def _flash_bwd(tiling: _Tiling, res, grad_out):
    q, k, v, mask, out, lse = res
    bq, bk = tiling.bq, tiling.bk
    qs, ks, vs = _split_heads(q, k, v, tiling)
    b, kv, g, sq_pad, d = qs.shape
    heads = kv * g

    def split(x):  # [b, sq, heads * d] -> [b, kv, g, sq_pad, d]
        x = x.reshape(b, tiling.sq, kv, g, d).transpose(0, 2, 3, 1, 4)
        return _pad(x, 3, sq_pad)

    grad_outs = split(grad_out.astype(v.dtype))
    # D = rowsum(dO * O), one value per query (FlashAttention-2's backward pass).
    delta = jnp.sum(grad_outs.astype(jnp.float32) * split(out).astype(jnp.float32), axis=-1, keepdims=True)
    tables = _tables(mask, tiling)

    def query_tile(carry, i):
        q_tile, grad_tile, lse_tile, delta_tile = (jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=3)
                                                   for x in (qs, grad_outs, lse, delta))

        def key_tile(j, carry):
            grad_q, grad_k, grad_v = carry
            allowed, in_range = _tile_mask(mask, tiling, i * bq, j * bk, tables)
            k_tile = jax.lax.dynamic_slice_in_dim(ks, j * bk, bk, axis=2)
            v_tile = jax.lax.dynamic_slice_in_dim(vs, j * bk, bk, axis=2)
            scores = _tile_scores(q_tile, k_tile, allowed, in_range, tiling.softcap)
            probs = jnp.exp(scores - lse_tile)
            grad_probs = jnp.einsum("bkgqd,bksd->bkgqs", grad_tile, v_tile, preferred_element_type=jnp.float32)
            grad_scores = jnp.where(allowed[:, None, None] & in_range, probs * (grad_probs - delta_tile), 0.0)
            if tiling.softcap is not None:  # d(cap tanh(x / cap))/dx = 1 - tanh² = 1 - (capped / cap)²
                capped = jnp.where(allowed[:, None, None] & in_range, scores, 0.0) / np.float32(tiling.softcap)
                grad_scores = grad_scores * (1 - capped * capped)
            grad_scores = grad_scores.astype(qs.dtype)
            grad_q = grad_q + jnp.einsum("bkgqs,bksd->bkgqd", grad_scores, k_tile, preferred_element_type=jnp.float32)
            grad_k = _add_slice(grad_k, jnp.einsum("bkgqs,bkgqd->bksd", grad_scores, q_tile,
                                                   preferred_element_type=jnp.float32), j * bk)
            grad_v = _add_slice(grad_v, jnp.einsum("bkgqs,bkgqd->bksd", probs.astype(vs.dtype), grad_tile,
                                                   preferred_element_type=jnp.float32), j * bk)
            return grad_q, grad_k, grad_v

        first, stop = tiling.key_tiles(mask, i)
        grad_q, grad_k, grad_v = jax.lax.fori_loop(
            first, stop, key_tile, (jnp.zeros((b, kv, g, bq, d), jnp.float32), *carry))
        return (grad_k, grad_v), (grad_q * np.float32(tiling.scale)).astype(q.dtype)  # the tile's queries are done

    zeros = jnp.zeros(ks.shape, jnp.float32)
    (grad_k, grad_v), grad_q = jax.lax.scan(query_tile, (zeros, zeros), jnp.arange(tiling.nq))
    grad_q = jnp.moveaxis(grad_q, 0, 3).reshape(b, kv, g, sq_pad, d)
    grad_q = _merge_heads(grad_q, tiling.sq).reshape(b, tiling.sq, heads, d)
    grad_k = grad_k[:, :, :tiling.sk].transpose(0, 2, 1, 3).astype(k.dtype)
    grad_v = grad_v[:, :, :tiling.sk].transpose(0, 2, 1, 3).astype(v.dtype)
    return grad_q, grad_k, grad_v, None


def _add_slice(total, part, start):
    """`total[:, :, start:start + len(part)] += part` (axis 2)."""
    current = jax.lax.dynamic_slice_in_dim(total, start, part.shape[2], axis=2)
    return jax.lax.dynamic_update_slice_in_dim(total, current + part, start, axis=2)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _after(xs, *deps):
    """The arrays `xs`, computed after `deps`: `x + 0 * dep[0, ..., 0]` (summed over `deps`).

    XLA does not fold a float `y * 0` to 0 (it is NaN for y = ±inf or NaN), so this data dependency
    orders the blocks of `_attend`, where XLA:CPU drops optimization barriers before scheduling.
    """
    if not deps:
        return xs
    zero = sum(dep[(0,) * dep.ndim].astype(jnp.float32) * 0 for dep in deps)
    return tuple(x + zero.astype(x.dtype) for x in xs)



def _rope(x, cos, sin):
    """`x * cos + rotate_half(x) * sin` over the last axis; cos/sin `[b, s, rotary_dim]`.

    With `rotary_dim < head_dim` (partial RoPE, Phi-3) only the first `rotary_dim` dimensions rotate.
    """
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return jnp.concatenate([_rope(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class MLP(nnx.Module):
    """A gated MLP: `down(act(gate(x)) * up(x))`, SwiGLU (`act` silu) or GeGLU (gelu, tanh approximation).

    Phi-3 stores gate and up as one `gate_up_proj` (gate first), kept fused.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.fused_gate_up:
            self.gate_up_proj = nnx.Linear(d, 2 * f, **kw)
        else:
            self.gate_proj = nnx.Linear(d, f, **kw)
            self.up_proj = nnx.Linear(d, f, **kw)
        self.down_proj = nnx.Linear(f, d, **kw)
        self.intermediate_size = f
        self.fused = cfg.fused_gate_up
        self.act = swiglu if cfg.hidden_act == "silu" else geglu

    def __call__(self, x: jax.Array, *, keep: bool = True) -> jax.Array:
        """The MLP of `x [..., hidden]`, over chunks of tokens (`over_tokens`) when there are many."""
        flat = x.reshape(1, -1, x.shape[-1])
        out = over_tokens(self, MLP._forward, (flat,), mlp_chunk(self.intermediate_size), keep)
        return out.reshape(x.shape[:-1] + out.shape[-1:])

    def _forward(self, x):
        if self.fused:
            gate_up = self.gate_up_proj(x)  # [..., 2 * intermediate]
            gate, up = gate_up[..., :self.intermediate_size], gate_up[..., self.intermediate_size:]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")
        return self.down_proj(self.act(gate, up))


class Expert(nnx.Module):
    """One Mixtral expert: SwiGLU `w2(silu(w1(x)) * w3(x))` (the checkpoint's names)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w1, self.w3, self.w2 = nnx.Linear(d, f, **kw), nnx.Linear(d, f, **kw), nnx.Linear(f, d, **kw)

    def __call__(self, x):
        gate, up = checkpoint_name(self.w1(x), "mlp_gate"), checkpoint_name(self.w3(x), "mlp_up")
        return self.w2(swiglu(gate, up))


class Router(nnx.Module):
    """A mixture-of-experts router: logits `x @ kernel` (`[hidden, experts]`). Not an `nnx.Linear`, so that
    `apply_qlora` neither quantizes it nor gives it an adapter: it stays a float parameter."""

    def __init__(self, hidden: int, experts: int, *, param_dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (hidden, experts), param_dtype))

    def __call__(self, x):
        return x @ self.kernel[...].astype(x.dtype)


class MoE(nnx.Module):
    """Mixtral's sparse MLP: softmax over the router's logits (float32), the top-k experts per token, their
    weights renormalized to sum to one, the output `sum_k weight_k * expert_k(x)` (as transformers).

    The experts are stacked (`nnx.vmap`, each variable gets a leading expert axis after the layer axis), so
    quantized they are one packed kernel per projection and a step stays one compiled program. Every expert
    runs on every token and the unrouted ones get weight zero: exact, at `num_experts / top_k` times the
    MLP's work of a routed implementation.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.gate = Router(cfg.hidden_size, cfg.num_experts, param_dtype=param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_experts)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs) -> Expert:
            return Expert(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.experts = create(rngs)
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.intermediate_size = cfg.num_experts * cfg.intermediate_size  # activations per token (chunk sizes)

    def __call__(self, x: jax.Array, *, keep: bool = True) -> jax.Array:
        """The MoE MLP of `x [..., hidden]`, over chunks of tokens (`over_tokens`) when there are many."""
        flat = x.reshape(1, -1, x.shape[-1])
        out = over_tokens(self, MoE._forward, (flat,), mlp_chunk(self.intermediate_size), keep)
        return out.reshape(x.shape[:-1] + out.shape[-1:])

    def _forward(self, x):
        probs = jax.nn.softmax(self.gate(x).astype(jnp.float32), axis=-1)  # [..., experts]
        top, index = jax.lax.top_k(probs, self.top_k)  # [..., k]
        top = top / jnp.sum(top, axis=-1, keepdims=True)
        weights = jnp.sum(jax.nn.one_hot(index, self.num_experts, dtype=jnp.float32) * top[..., None], axis=-2)
        out = nnx.vmap(lambda expert, x: expert(x), in_axes=(0, None), out_axes=0)(self.experts, x)  # [e, ..., d]
        return jnp.einsum("e...d,...e->...d", out.astype(jnp.float32), weights).astype(out.dtype)


# Floats of one chunk's MLP activations (`tokens × intermediate`) when a sequence is cut into chunks (`over_tokens`).
MLP_CHUNK_ELEMENTS = 1 << 24


def mlp_chunk(intermediate_size: int) -> int:
    """Tokens per chunk of a decoder layer: the largest power of two whose MLP activations stay within
    `MLP_CHUNK_ELEMENTS` (at least 256).

    Example:
        >>> from qlora_jax._src.models.llama import mlp_chunk
        >>> mlp_chunk(14336)
        1024
    """
    return max(256, 1 << int(math.log2(max(1, MLP_CHUNK_ELEMENTS // intermediate_size))))


def over_tokens(module: nnx.Module, fn, inputs: tuple[jax.Array, ...], chunk: int, keep: bool):
    """`fn(module, *inputs)` over chunks of `chunk` tokens, each recomputed in the backward pass from its inputs.

    For what works token by token (projections, norms, the MLP): the activations of all tokens (`tokens ×
    intermediate` floats, several times over in the backward pass) are the largest arrays of a long sequence's
    step; a `lax.scan` over chunks bounds them to one chunk's. The module's RNG state (dropout) advances from
    chunk to chunk, and the backward pass recomputes each chunk with the state it had. `keep`: whether a chunk
    keeps `_KEEP`'s values for the backward pass (as the model without `remat`) or nothing (with `remat`).

    Args:
        module: The module `fn` runs (its variables are read, its RNG state advanced).
        fn: `fn(module, *inputs) -> pytree of [b, s, ...]` arrays, token by token.
        inputs: Arrays `[b, s, ...]`.
        chunk: Tokens per chunk; `b × s <= chunk` runs `fn` once.
        keep: See above.

    Returns:
        `fn`'s outputs for all tokens.
    """
    lead = inputs[0].shape[:2]
    tokens = math.prod(lead)
    if tokens <= chunk:
        return fn(module, *inputs)
    graphdef, rng_state, rest = nnx.split(module, nnx.RngState, ...)

    def run(rng_state, xs):
        chunk_module = nnx.merge(graphdef, rng_state, rest, copy=True)
        out = fn(chunk_module, *xs)
        return nnx.state(chunk_module, nnx.RngState), out

    run = jax.checkpoint(run, prevent_cse=False, policy=_KEEP if keep else None)
    flat = [x.reshape((tokens,) + x.shape[2:]) for x in inputs]
    whole = tokens - tokens % chunk
    rng_state, out = jax.lax.scan(run, rng_state, [x[:whole].reshape((-1, 1, chunk) + x.shape[1:]) for x in flat])
    out = jax.tree.map(lambda y: y.reshape((whole,) + y.shape[3:]), out)  # [n, 1, chunk, ...] -> [whole, ...]
    if whole < tokens:
        rng_state, last = run(rng_state, [x[whole:][None] for x in flat])
        out = jax.tree.map(lambda y, z: jnp.concatenate([y, z[0]]), out, last)
    nnx.update(module, rng_state)
    return jax.tree.map(lambda y: y.reshape(lead + y.shape[1:]), out)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`silu(gate) * up`, whose gradient keeps only `gate` and `up` for the backward pass.

    Autodiff of `gate * sigmoid(gate) * up` would also keep the sigmoid and the
    intermediate products, each as large as the MLP's hidden activations; the
    backward pass recomputes the sigmoid instead (one cheap elementwise pass).

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax._src.models.llama import swiglu
        >>> swiglu(jnp.zeros(2), jnp.ones(2)).tolist()
        [0.0, 0.0]
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    # d silu(x) / dx = sigmoid(x) + x * sigmoid(x) * (1 - sigmoid(x))
    return g * up * (sig + gate * sig * (1 - sig)), g * (gate * sig)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)

_GELU_C = math.sqrt(2 / math.pi)  # the tanh approximation: 0.5 x (1 + tanh(c (x + 0.044715 x³)))


@jax.custom_vjp
def geglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`gelu(gate) * up` with the tanh approximation (`gelu_pytorch_tanh`), keeping only `gate` and `up` for the
    backward pass (as `swiglu`).

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax._src.models.llama import geglu
        >>> geglu(jnp.zeros(2), jnp.ones(2)).tolist()
        [0.0, 0.0]
    """
    return jax.nn.gelu(gate, approximate=True) * up


def _geglu_fwd(gate, up):
    return geglu(gate, up), (gate, up)


def _geglu_bwd(res, g):
    gate, up = res
    c = np.float32(_GELU_C).astype(gate.dtype)
    t = jnp.tanh(c * (gate + np.asarray(0.044715, gate.dtype) * gate**3))
    gelu = 0.5 * gate * (1 + t)
    d_gelu = 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * c * (1 + np.asarray(3 * 0.044715, gate.dtype) * gate**2)
    return g * up * d_gelu, g * gelu


geglu.defvjp(_geglu_fwd, _geglu_bwd)


class DecoderLayer(nnx.Module):
    """Attention and MLP blocks with residual connections and RMSNorms placed as `norm_placement` says.

    "pre" (Llama): `x + attn(input_layernorm(x))`, then `h + mlp(post_attention_layernorm(h))`.
    "sandwich" (Gemma 2/3): `x + post_attention_layernorm(attn(input_layernorm(x)))`, then
    `h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`.
    "post" (OLMo-2): `x + post_attention_layernorm(attn(x))`, then `h + post_feedforward_layernorm(mlp(h))`.
    Each block's output is multiplied by `residual_multiplier` (Granite) before it is added.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = functools.partial(RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, style=cfg.norm_style,
                                 param_dtype=param_dtype)
        placement = self.placement = cfg.norm_placement
        self.input_layernorm = norm() if placement != "post" else nnx.data(None)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm() if placement == "sandwich" else nnx.data(None)
        self.post_feedforward_layernorm = norm() if placement != "pre" else nnx.data(None)
        if cfg.num_experts:
            self.mlp = MoE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.residual_multiplier = float(cfg.residual_multiplier)

    def __call__(self, x, cos, sin, mask, cache=None, *, keep: bool = True):
        if cache is None:
            # Everything but attention itself works token by token: over chunks of tokens (`over_tokens`).
            chunk = mlp_chunk(self.mlp.intermediate_size)
            q, k, v = over_tokens(self, DecoderLayer._project, (x, cos, sin), chunk, keep)
            return over_tokens(self, DecoderLayer._finish, (x, attention(q, k, v, mask, scale=self.self_attn.scale,
                                                                       softcap=self.self_attn.softcap)), chunk, keep)
        attn, cache = self.self_attn(self._attention_input(x), cos, sin, mask, cache)
        x = self._add_attention(x, attn)
        return self._add_mlp(x, self.mlp), cache

    def _attention_input(self, x):
        return x if self.input_layernorm is None else self.input_layernorm(x)

    def _add_attention(self, x, attn):
        """`x` plus the attention block's output `attn` (after `o_proj`)."""
        if self.placement != "pre":
            attn = self.post_attention_layernorm(attn)
        return x + self._scaled(attn)

    def _add_mlp(self, x, mlp):
        """`x` plus the MLP block's output; `mlp` runs the MLP (`self.mlp` chunked, or `self.mlp._forward`)."""
        if self.placement == "pre":
            return x + self._scaled(mlp(self.post_attention_layernorm(x)))
        if self.placement == "sandwich":
            x_in = self.pre_feedforward_layernorm(x)
        else:
            x_in = x
        return x + self._scaled(self.post_feedforward_layernorm(mlp(x_in)))

    def _scaled(self, y):
        return y if self.residual_multiplier == 1.0 else y * np.float32(self.residual_multiplier).astype(y.dtype)

    def _project(self, x, cos, sin):
        return self.self_attn.project(self._attention_input(x), cos, sin)

    def _finish(self, x, attn_out):
        """The rest of the layer after attention: output projection, residual, MLP, residual."""
        x = checkpoint_name(self._add_attention(x, self.self_attn.o_proj(attn_out)), "h_mid")
        return self._add_mlp(x, self.mlp._forward)


class CausalLM(nnx.Module):
    """A Llama-style causal language model: embeddings (scaled by `embed_scale`), scanned decoder layers,
    final RMSNorm and the output head (the embedding matrix when tied; logits divided by `logits_scaling`
    and soft-capped when configured).

    Attributes:
        config: The `ModelConfig`.
        embed_tokens: `nnx.Embed` `[vocab, hidden]`.
        layers: One `DecoderLayer` whose variables are stacked over the layers.
        norm: Final `RMSNorm`.
        lm_head: `nnx.Linear` `[hidden, vocab]` without bias, or None when tied.
        dtype: Compute dtype (float32 on CPU, bfloat16 on GPU/TPU is usual).
        remat: Rematerialize each layer in the backward pass (`remat_layers`); without it a
            layer keeps its products' outputs, attention statistics and residual stream,
            and recomputes its RMSNorm outputs and SwiGLU product (elementwise passes).
        remat_group: With `remat`, keep the input of every `remat_group`-th layer only and
            recompute groups of that many layers (`remat_layers`): less memory for long
            sequences, one more forward pass of every layer. 1: keep every layer's input.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.models import CausalLM, ModelConfig
        >>> cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_layers=2,
        ...                   num_heads=4, num_kv_heads=2)
        >>> model = CausalLM(cfg, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((1, 5), jnp.int32)).shape
        (1, 5, 128)
    """

    logical_axes = LLAMA_AXES  # read by `qj.shard_model` / `qj.partition_specs` (a class attribute, not state)

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        remat_group: int = 1,
        rngs: nnx.Rngs,
    ):
        """Builds the model with random weights (use `from_pretrained` to load a checkpoint).

        Args:
            config: Architecture.
            dtype: Compute dtype of activations and matmuls.
            param_dtype: Dtype of the float parameters.
            remat: Rematerialize each decoder layer in the backward pass (keep only its
                input); otherwise keep what its backward pass reads but the RMSNorm
                outputs and the SwiGLU product, which are recomputed.
            remat_group: See the class attributes.
            rngs: Initializers' randomness.
        """
        if remat_group < 1:
            raise ValueError(f"remat_group: {remat_group}, expected an integer >= 1")
        self.config = config
        self.dtype = np.dtype(dtype)
        self.remat = bool(remat)
        self.remat_group = int(remat_group)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, param_dtype=param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = create(rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, style=config.norm_style, param_dtype=param_dtype)
        if config.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits `[batch, seq, vocab]` in float32 (and the updated cache when given one).

        Args:
            input_ids: Token ids `[batch, seq]`.
            positions: RoPE positions `[batch, seq]`; default `0..seq-1`
                (restart them per segment for packed sequences).
            attention_mask: `[batch, seq]`, 1 for tokens that may be attended to
                (0 for padding), as in `transformers`.
            segment_ids: `[batch, seq]`: tokens attend only within their segment
                (sequence packing).
            cache: A `KVCache` for incremental decoding: the tokens are placed
                after the `cache.length` tokens already in it, attend to those,
                and `(logits, new_cache)` is returned; `attention_mask` then
                marks this call's tokens (0 for left padding).
        """
        h, cache = self._decode(input_ids, positions, attention_mask, segment_ids, cache)
        logits = self.logits_from_hidden(h)
        return logits if cache is None else (logits, cache)

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The final hidden states `[batch, seq, hidden]` (after the final norm), in `dtype`.

        `logits_from_hidden` of these is what `__call__` returns; a loss can
        apply the head to chunks of them instead (`chunked_cross_entropy`),
        so that the `[batch, seq, vocab]` logits never exist at once.

        Args:
            input_ids: Token ids `[batch, seq]`.
            positions: As `__call__`.
            attention_mask: As `__call__`.
            segment_ids: As `__call__`.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> from qlora_jax.models import CausalLM, ModelConfig
            >>> cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_layers=2,
            ...                   num_heads=4, num_kv_heads=2)
            >>> model, ids = CausalLM(cfg, rngs=nnx.Rngs(0)), jnp.zeros((1, 5), jnp.int32)
            >>> h = model.hidden_states(ids)
            >>> h.shape, bool(jnp.array_equal(model.logits_from_hidden(h), model(ids)))
            ((1, 5, 64), True)
        """
        return self._decode(input_ids, positions, attention_mask, segment_ids, None)[0]

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """The output head: logits `[..., vocab]` in float32 from final hidden states `[..., hidden]`.

        `lm_head(h)`, or `embed_tokens.attend(h)` when the embeddings are
        tied. Example: see `hidden_states`.
        """
        if self.lm_head is None:
            table = self.embed_tokens.embedding[...]  # [vocab, hidden]
            if _float32_product(h, table):
                logits = head_logits(h.astype(jnp.float32), table, 0)
            else:
                logits = self.embed_tokens.attend(h)
        else:
            head = self.lm_head
            if type(head) is nnx.Linear and head.bias is None and _float32_product(h.astype(head.dtype or h.dtype),
                                                                                head.kernel[...]):
                logits = head_logits(h.astype(jnp.float32), head.kernel[...], 1)
            else:
                logits = head(h)
        logits = logits.astype(jnp.float32)
        if self.config.logits_scaling != 1.0:  # Granite
            logits = logits / np.float32(self.config.logits_scaling)
        if self.config.final_logit_softcap is not None:  # Gemma 2
            cap = np.float32(self.config.final_logit_softcap)
            logits = cap * jnp.tanh(logits / cap)
        return logits

    def _decode(self, input_ids, positions, attention_mask, segment_ids, cache):
        """Embeddings, decoder layers and final norm: `(h [batch, seq, hidden], updated cache or None)`."""
        b, s = input_ids.shape
        start = None if cache is None else cache.length
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if cache is not None:
                positions = positions + start
        config = self.config
        h = self.embed_tokens(input_ids).astype(self.dtype)
        if config.embed_scale is not None:  # the scale rounded to the compute dtype first, as transformers' Gemma
            h = h * np.float32(config.embed_scale).astype(self.dtype)
        flags = None if config.layer_types is None else jnp.asarray(config.sliding_layers)  # [layers] bool
        all_local = config.layer_types is None and config.sliding_window is not None
        cos, sin = _rope_tables(positions, config.inv_freq(local=all_local), self.dtype)  # [b, s, rotary_dim]
        local = None
        if flags is not None and config.rope_local_theta is not None:  # Gemma 3: the sliding layers' own RoPE
            local = _rope_tables(positions, config.inv_freq(local=True), self.dtype)
        if cache is None:
            mask = _self_attention_mask(attention_mask, segment_ids, config.sliding_window)
        else:
            mask = cache.attention_mask(attention_mask, config.sliding_window)
        consts = (cos, sin, mask, local)

        if cache is None:
            def body(h, layer, flag):
                return layer(h, *_layer_consts(consts, flag), keep=not self.remat)

            # Only the variables a layer changes (dropout's RNG counts) come out of the remat, so the frozen
            # weights stay the arrays (and shardings) they were. Without `remat`, a policy keeps `_KEEP`'s
            # values; inside a scan that recomputation needs no CSE barrier (`jax.checkpoint`'s `prevent_cse`).
            if self.remat:
                graphdef, state = nnx.split(self.layers)
                h, rng_state = remat_layers(graphdef, h, {"layer": state, "flag": flags}, consts, self.remat_group)
                nnx.update(self.layers, rng_state)
            else:
                if flags is None:
                    uniform = nnx.remat(lambda h, layer: body(h, layer, None), prevent_cse=False, policy=_KEEP,
                                        graph_updates=False)
                    h = nnx.scan(uniform, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(h, self.layers)
                else:
                    body = nnx.remat(body, prevent_cse=False, policy=_KEEP, graph_updates=False)
                    h = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)(h, self.layers, flags)
        else:
            def body(h, layer, k, v, *flag):
                return layer(h, *_layer_consts(consts, flag[0] if flag else None), (k, v, start))

            xs = (self.layers, cache.keys, cache.values) + (() if flags is None else (flags,))
            h, (keys, values) = nnx.scan(body, in_axes=(nnx.Carry,) + (0,) * len(xs), out_axes=(nnx.Carry, 0))(
                h, *xs)
            cache = KVCache(keys, values, start + s, cache.valid if attention_mask is None else
                            jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask.astype(jnp.bool_),
                                                                start, axis=1))
        return self.norm(h), cache


def _rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """RoPE's `(cos, sin)` `[b, s, rotary_dim]` of `positions [b, s]`, in `dtype`."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)[None, None]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _layer_consts(consts, flag):
    """`(cos, sin, mask)` of one layer from `(cos, sin, mask, local RoPE tables or None)` and its sliding flag.

    `flag` (a traced bool, or None when every layer is alike) switches the mask's window on or off and, with
    `local` tables (Gemma 3), picks the sliding layers' RoPE.
    """
    cos, sin, mask, local = consts
    if flag is None:
        return cos, sin, mask
    if mask.window is not None:
        mask = dataclasses.replace(mask, window_active=flag)
    if local is not None:
        cos, sin = jnp.where(flag, local[0], cos), jnp.where(flag, local[1], sin)
    return cos, sin, mask


def _layer_step(graphdef, state, h, consts):
    """One decoder layer on `h`: `(output, the layer's RNG state afterwards)`.

    `state`: `{"layer": the layer's variables, "flag": its sliding flag or None}`.
    """
    layer = nnx.merge(graphdef, state["layer"], copy=True)
    out = layer(h, *_layer_consts(consts, state["flag"]), keep=False)
    return out, nnx.state(layer, nnx.RngState)


def _to_bits(x):
    """A 16-bit float array as `uint16` (XLA:CPU stacks 16-bit floats in float32: twice the bytes, plus copies)."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _from_bits(x, dtype):
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def remat_layers(graphdef, h, state, consts, group: int = 1):
    """The stacked decoder layers `state` run over `h`, recomputed in the backward pass from kept inputs.

    What `jax.checkpoint` around a scanned layer does, with its own gradient: the forward pass keeps each
    layer's input (a `uint16` view of 16-bit activations: XLA:CPU would stack them in float32), the backward
    pass runs the layers in reverse, each recomputing its forward pass (`jax.vjp`) from the kept input and
    differentiating only what the caller differentiates (the adapters when the base is frozen).

    With `group > 1`, only the input of every `group`-th layer is kept (two-level checkpointing, Chen et al.,
    2016, https://arxiv.org/abs/1604.06174): the backward pass first runs each group forward again from its
    kept input, keeping its layers' inputs, then goes back through them. The kept inputs shrink from `layers`
    to `layers / group + group`, for one more forward pass of every layer. The last group holds the remainder
    when `group` does not divide the layers.

    Returns:
        `(h, RNG state of the layers)`.
    """
    return _remat_layers_fwd(graphdef, h, state, consts, group)[0]


def _groups(state, group):
    """`state` (leading axis: layers) as `(whole groups [n, group, ...], remainder [r, ...] or None)`."""
    layers = jax.tree.leaves(state)[0].shape[0]
    n, r = divmod(layers, group)
    whole = jax.tree.map(lambda x: x[:n * group].reshape((n, group) + x.shape[1:]), state) if n else None
    rest = jax.tree.map(lambda x: x[n * group:], state) if r else None
    return whole, rest


def _run_layers(graphdef, h, state, consts, keep_inputs):
    """The layers of `state` in order: `(h, kept inputs or None, RNG states)`."""
    def body(h, state_i):
        out, rng = _layer_step(graphdef, state_i, h, consts)
        return out, (_to_bits(h) if keep_inputs else None, rng)

    out, (inputs, rng) = jax.lax.scan(body, h, state)
    return out, inputs, rng


def _remat_layers_fwd(graphdef, h, state, consts, group):
    # `symbolic_zeros`: the arguments come as `CustomVJPPrimal`s saying whether they are differentiated; whether a
    # leaf of `state` is travels as the residuals' structure (`(leaf,)` differentiated, `(leaf, ())` not).
    if _is_primal(h):
        marked = jax.tree.map(lambda p: (p.value,) if p.perturbed else (p.value, ()), state, is_leaf=_is_primal)
        h, state, consts = (jax.tree.map(lambda p: p.value, x, is_leaf=_is_primal) for x in (h, state, consts))
    else:
        marked = jax.tree.map(lambda x: (x,), state)
    if group == 1:
        out, inputs, rng = _run_layers(graphdef, h, state, consts, keep_inputs=True)
        return (out, rng), (inputs, marked, consts)
    whole, rest = _groups(state, group)
    kept, rngs = [], []
    if whole is not None:
        def body(h, group_state):
            out, _, rng = _run_layers(graphdef, h, group_state, consts, keep_inputs=False)
            return out, (_to_bits(h), rng)

        h, (inputs, rng) = jax.lax.scan(body, h, whole)
        kept.append(inputs)
        rngs.append(jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), rng))
    if rest is not None:
        kept.append(_to_bits(h))
        h, _, rng = _run_layers(graphdef, h, rest, consts, keep_inputs=False)
        rngs.append(rng)
    rng = rngs[0] if len(rngs) == 1 else jax.tree.map(lambda *x: jnp.concatenate(x), *rngs)
    return (h, rng), (tuple(kept), marked, consts)


def _is_primal(x):
    return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def _layers_backward(graphdef, grad_h, inputs, leaves, flags, treedef, consts):
    """From the layers' kept inputs, in reverse: `(gradient of the first input, differentiated leaves' gradients)`."""
    def body(grad_h, xs):
        bits, layer_leaves = xs
        diff = [x for x, f in zip(layer_leaves, flags, strict=True) if f]

        def run(h, diff):
            it = iter(diff)
            merged = [next(it) if f else x for x, f in zip(layer_leaves, flags, strict=True)]
            return _layer_step(graphdef, jax.tree.unflatten(treedef, merged), h, consts)[0]

        _, vjp = jax.vjp(run, _from_bits(bits, grad_h.dtype), diff)
        return vjp(grad_h)

    return jax.lax.scan(body, grad_h, (inputs, leaves), reverse=True)


def _remat_layers_bwd(graphdef, group, res, grads):
    inputs, marked, consts = res
    leaves, treedef = jax.tree.flatten(marked, is_leaf=lambda x: type(x) is tuple)
    flags = [len(leaf) == 1 for leaf in leaves]
    leaves = [leaf[0] for leaf in leaves]
    grad_h = grads[0]
    if isinstance(grad_h, jax.custom_derivatives.SymbolicZero):
        grad_h = jnp.zeros(grad_h.shape, grad_h.dtype)
    if group == 1:
        grad_h, grad_diff = _layers_backward(graphdef, grad_h, inputs, leaves, flags, treedef, consts)
    else:
        whole, rest = _groups(leaves, group)
        parts = []
        if rest is not None:  # the last layers ran last: their gradients come first
            rest_inputs = _run_layers(graphdef, _from_bits(inputs[-1], grad_h.dtype),
                                      jax.tree.unflatten(treedef, rest), consts, keep_inputs=True)[1]
            grad_h, grad_rest = _layers_backward(graphdef, grad_h, rest_inputs, rest, flags, treedef, consts)
            parts.append(grad_rest)
        if whole is not None:
            def body(grad_h, xs):
                bits, group_leaves = xs
                group_inputs = _run_layers(graphdef, _from_bits(bits, grad_h.dtype),
                                           jax.tree.unflatten(treedef, group_leaves), consts, keep_inputs=True)[1]
                return _layers_backward(graphdef, grad_h, group_inputs, group_leaves, flags, treedef, consts)

            grad_h, grad_whole = jax.lax.scan(body, grad_h, (inputs[0], whole), reverse=True)
            parts.insert(0, [g.reshape((-1,) + g.shape[2:]) for g in grad_whole])
        grad_diff = parts[0] if len(parts) == 1 else [jnp.concatenate(g) for g in zip(*parts, strict=True)]
    it = iter(grad_diff)
    grad_state = jax.tree.unflatten(treedef, [next(it) if f else None for f in flags])
    return grad_h, grad_state, None


remat_layers.defvjp(_remat_layers_fwd, _remat_layers_bwd, symbolic_zeros=True)


def _float32_product(h: jax.Array, kernel: jax.Array) -> bool:
    """Whether `h @ kernel` with a 16-bit kernel is a float32 product: float32 activations (float32 compute over
    a 16-bit model), or 16-bit ones on the CPU, where XLA computes 16-bit products in float32. Either way XLA
    would convert the whole kernel to float32 first; `head_logits` converts it a slice at a time."""
    if kernel.dtype.itemsize != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
        return False
    return h.dtype == jnp.float32 or (h.dtype == kernel.dtype and jax.default_backend() == "cpu")


# Vocabulary entries of a 16-bit head converted to float32 at a time (`head_logits`).
HEAD_CHUNK = 4096


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def head_logits(h: jax.Array, kernel: jax.Array, vocab_axis: int) -> jax.Array:
    """Float32 logits `h @ kernel` of a 16-bit output head, converted to float32 `HEAD_CHUNK` entries at a time.

    A dot of float32 activations with a 16-bit kernel converts the whole kernel to float32 first, a temporary
    of `4 × hidden × vocab` bytes that XLA cannot fuse into the dot. Here the kernel is cut into static slices
    of the vocabulary, each converted and multiplied only after the previous slice's product (`_after`), in the
    forward and the backward pass, so one converted slice exists at a time; the result is the same float32 dot
    per vocabulary entry. The kernel's gradient is computed only when the kernel is differentiated.

    Args:
        h: Float32 hidden states `[..., hidden]`.
        kernel: The 16-bit head, `[hidden, vocab]` (`vocab_axis=1`, `nnx.Linear`) or `[vocab, hidden]`
            (`vocab_axis=0`, tied embeddings).
        vocab_axis: Which axis of `kernel` runs over the vocabulary.

    Returns:
        Logits `[..., vocab]`, float32.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from qlora_jax._src.models.llama import head_logits
        >>> h = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8)), jnp.float32)
        >>> w = jnp.asarray(np.random.default_rng(1).standard_normal((8, 5000)), jnp.bfloat16)
        >>> bool(jnp.allclose(head_logits(h, w, 1), h @ w.astype(jnp.float32), rtol=1e-6, atol=1e-5))
        True
    """
    return _head_forward(h, kernel, vocab_axis)


def _chunk(kernel: jax.Array, vocab_axis: int, start: int, stop: int, after: jax.Array) -> jax.Array:
    """Entries `start:stop` of the 16-bit head as float32 `[hidden, stop - start]`, converted after `after`.

    Static slices, each converted on its own (in a loop over dynamic slices XLA converts the whole,
    loop-invariant kernel before the loop instead); `_after` makes the conversion wait for the previous
    chunk's product, so one converted chunk is alive at a time instead of all of them, converted up front.
    """
    (w,) = _after((jax.lax.slice_in_dim(kernel, start, stop, axis=vocab_axis).astype(jnp.float32),), after)
    return w if vocab_axis == 1 else w.T


def _head_forward(h, kernel, vocab_axis):
    vocab, parts = kernel.shape[vocab_axis], []
    after = jnp.zeros((1,), jnp.float32)
    for start in range(0, vocab, HEAD_CHUNK):
        parts.append(h @ _chunk(kernel, vocab_axis, start, min(start + HEAD_CHUNK, vocab), after))
        after = parts[-1]
    return jnp.concatenate(parts, axis=-1)  # [..., vocab]


def _head_fwd(h, kernel, vocab_axis):
    # `symbolic_zeros`: the arguments come as `CustomVJPPrimal`s saying whether they are differentiated. The head
    # of a QLoRA model is frozen: then no kernel gradient is computed. The flag travels as the residuals' structure.
    res = (h.value, kernel.value) if kernel.perturbed else (h.value, kernel.value, ())
    return _head_forward(h.value, kernel.value, vocab_axis), res


def _head_bwd(vocab_axis, res, g):
    h, kernel = res[:2]
    want_dw = len(res) == 2
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros_like(h), jnp.zeros_like(kernel) if want_dw else None
    h2, g2 = h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1])  # [tokens, hidden], [tokens, vocab]
    dh = jnp.zeros(h2.shape, jnp.float32)
    dws = []
    vocab = kernel.shape[vocab_axis]
    for start in range(0, vocab, HEAD_CHUNK):
        stop = min(start + HEAD_CHUNK, vocab)
        gi = g2[:, start:stop]
        dh = dh + gi @ _chunk(kernel, vocab_axis, start, stop, dh).T
        if want_dw:
            dw = (h2.T @ gi).astype(kernel.dtype)  # [hidden, chunk]
            dws.append(dw if vocab_axis == 1 else dw.T)
    return dh.reshape(h.shape).astype(h.dtype), jnp.concatenate(dws, axis=vocab_axis) if want_dw else None


head_logits.defvjp(_head_fwd, _head_bwd, symbolic_zeros=True)


def causal_mask(
    seq_len: int,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    batch: int = 1,
) -> jax.Array:
    """Boolean `[batch, q, k]`: causal, within the sliding window, not padding, same segment.

    Example:
        >>> from qlora_jax.models import causal_mask
        >>> causal_mask(3).astype(int).tolist()
        [[[1, 0, 0], [1, 1, 0], [1, 1, 1]]]
    """
    mask = _self_attention_mask(attention_mask, segment_ids, sliding_window).dense(seq_len, seq_len)
    return jnp.broadcast_to(mask, (max(batch, mask.shape[0]), seq_len, seq_len))


def _self_attention_mask(attention_mask, segment_ids, sliding_window) -> AttentionMask:
    """The `AttentionMask` of causal self-attention over a batch's tokens."""
    return AttentionMask(key_valid=None if attention_mask is None else attention_mask != 0,
                         query_segments=segment_ids, key_segments=segment_ids, window=sliding_window)



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for incremental decoding.

    Attributes:
        keys: `[layers, batch, max_len, kv_heads, head_dim]`.
        values: Same shape.
        length: Tokens written so far (a scalar int32 array).
        valid: `[batch, max_len]` bool, False for padding tokens.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.models import KVCache, ModelConfig
        >>> cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4,
        ...                   num_kv_heads=2)
        >>> KVCache.create(cfg, batch=1, max_len=8).keys.shape
        (2, 1, 8, 2, 16)
    """

    keys: jax.Array
    values: jax.Array
    length: jax.Array
    valid: jax.Array

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_len` tokens."""
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32),
                   jnp.ones((batch, max_len), jnp.bool_))

    def attention_mask(self, attention_mask: jax.Array | None, sliding_window: int | None) -> AttentionMask:
        """The mask of `s` new tokens placed after the cache's `length`: they see the valid keys at or before them.

        Args:
            attention_mask: `[batch, s]`, 0 for this call's padding tokens (None: all valid).
            sliding_window: The model's sliding window, or None.
        """
        valid = self.valid
        if attention_mask is not None:
            valid = jax.lax.dynamic_update_slice_in_dim(valid, attention_mask.astype(jnp.bool_), self.length, axis=1)
        return AttentionMask(query_offset=self.length, key_valid=valid, window=sliding_window)

    def mask(self, s: int, attention_mask: jax.Array | None, sliding_window: int | None) -> jax.Array:
        """`[batch, s, max_len]` bool: `attention_mask(...)` as a dense array."""
        mask = self.attention_mask(attention_mask, sliding_window).dense(s, self.keys.shape[2])
        return jnp.broadcast_to(mask, (self.valid.shape[0], s, self.keys.shape[2]))

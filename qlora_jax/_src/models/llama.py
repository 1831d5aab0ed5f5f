"""A Llama-family decoder in Flax NNX (Llama 2/3, Mistral, Qwen2/2.5, Qwen3).

Module and parameter names follow the Hugging Face checkpoints
(`model.layers.N.self_attn.q_proj` → `model.layers.self_attn.q_proj`,
stacked over N), so LoRA targets read as in PEFT ("q_proj", "down_proj").
The decoder layers are created with `nnx.vmap` (every variable gets a leading
layer axis) and run with `nnx.scan` under `nnx.remat`: with `remat=True` a
layer keeps only its input for the backward pass, otherwise its products'
outputs, attention softmax statistics and residual stream (`_KEEP`); linear
layers are plain `nnx.Linear` until `apply_qlora` (or the loader) replaces
them. Numerics follow `transformers`' eager implementation: RMSNorm in
float32, RoPE with rotate-half, softmax in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qlora_jax._src.models.config import ModelConfig

__all__ = ["CausalLM", "KVCache", "RMSNorm", "causal_mask"]


class RMSNorm(nnx.Module):
    """`weight * (x / sqrt(mean(x²) + eps))`, computed in float32, as `LlamaRMSNorm`.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.models import RMSNorm
        >>> RMSNorm(4)(jnp.asarray([[3.0, -3.0, 3.0, -3.0]])).round(4).tolist()
        [[1.0, -1.0, 1.0, -1.0]]
    """

    def __init__(self, size: int, eps: float = 1e-6, *, param_dtype: jnp.dtype = jnp.float32):
        self.weight = nnx.Param(jnp.ones((size,), param_dtype))
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + np.float32(self.eps))
        weight = self.weight[...].astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return weight * h.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE (and Qwen3's q/k norms).

    Called without a cache, the mask must be causal (as `causal_mask` makes
    it): `attention` then skips the keys after each block of queries.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d, cfg.num_heads * hd, use_bias=cfg.qkv_bias, **kw)
        self.k_proj = nnx.Linear(d, cfg.num_kv_heads * hd, use_bias=cfg.qkv_bias, **kw)
        self.v_proj = nnx.Linear(d, cfg.num_kv_heads * hd, use_bias=cfg.qkv_bias, **kw)
        self.o_proj = nnx.Linear(cfg.num_heads * hd, d, use_bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = nnx.data(None)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd

    def __call__(self, x, cos, sin, mask, cache=None):
        b, s, _ = x.shape
        q = checkpoint_name(self.q_proj(x), "proj_q").reshape(b, s, self.num_heads, self.head_dim)
        k = checkpoint_name(self.k_proj(x), "proj_k").reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        q, k, v = checkpoint_name(q, "attn_q"), checkpoint_name(k, "attn_k"), checkpoint_name(v, "attn_v")
        if cache is not None:  # write this step's keys/values at `start`, attend over the whole cache
            cache_k, cache_v, start = cache
            cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), start, axis=1)
            cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), start, axis=1)
            k, v = cache_k.astype(q.dtype), cache_v.astype(q.dtype)
        out = checkpoint_name(attention(q, k, v, mask, causal=cache is None), "attn_out")  # [b, s, heads * head_dim]
        if cache is not None:
            return self.o_proj(out), (cache_k, cache_v)
        return self.o_proj(out)


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


# Queries per block of attention (see `attention`): causal self-attention is cut into at least
# `_MAX_QUERY_BLOCKS` blocks of at least `_QUERY_BLOCK` queries where the sequence allows, and every
# attention into blocks of at most `_LARGEST_QUERY_BLOCK` queries, which bounds one block's scores.
_QUERY_BLOCK = 64
_MAX_QUERY_BLOCKS = 8
_LARGEST_QUERY_BLOCK = 512


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, causal: bool = False) -> jax.Array:
    """Grouped-query softmax attention, scores and softmax in float32, memory-efficient backward pass.

    The heads are moved in front of the sequence once (`[b, kv, groups, s,
    d]`), so that every product is a batched matmul over contiguous blocks
    and no score-sized tensor is transposed, forward or backward. The
    queries are cut into blocks of at most `_LARGEST_QUERY_BLOCK`, one after
    the other, so that only one block's `[.., queries, keys]` float32 scores
    exist at a time. With `causal` (self-attention whose mask lets no query
    see a later key, as `causal_mask` always does) there are at least
    `_MAX_QUERY_BLOCKS` blocks of at least `_QUERY_BLOCK` queries, and each
    block attends only to the keys up to its last query: the skipped scores
    are masked anyway, so the result is the same for about (n + 1) / 2n of
    the work with n blocks.

    As in FlashAttention (Dao et al., 2022, https://arxiv.org/abs/2205.14135),
    the backward pass keeps no probabilities: the forward pass saves each
    query's softmax maximum and normalizer (`[b, kv, groups, s]`), and the
    backward pass recomputes one block's probabilities from the queries,
    keys and these, then its gradients, block after block.

    Args:
        q: Queries `[b, sq, heads, d]` (after RoPE).
        k: Keys `[b, sk, kv_heads, d]`; `heads` a multiple of `kv_heads`.
        v: Values, as `k`.
        mask: `[b, sq, sk]` bool, True where a query may attend to a key.
        causal: Whether `sq == sk` and the mask is causal (query i sees no key after i).

    Returns:
        `[b, sq, heads * d]` in `v.dtype`.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.models import causal_mask
        >>> from qlora_jax._src.models.llama import attention
        >>> q, kv = jnp.ones((1, 3, 4, 8)), jnp.ones((1, 3, 2, 8))
        >>> attention(q, kv, kv, causal_mask(3), causal=True).shape
        (1, 3, 32)
    """
    b, sq, heads, d = q.shape
    kv_heads = k.shape[2]
    q = q * np.float32(d**-0.5).astype(q.dtype)
    q = q.reshape(b, sq, kv_heads, heads // kv_heads, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, sq, d]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, sk, d]
    out = _attend(q, k, v, mask, _query_blocks(sq, k.shape[2], causal))  # [b, kv, g, sq, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, sq, heads * d)


def _query_blocks(sq: int, sk: int, causal: bool) -> tuple[tuple[int, int, int], ...]:
    """`(start, stop, keys)` of each block of queries: queries `start:stop` attend to keys `:keys`."""
    n_blocks = -(-sq // _LARGEST_QUERY_BLOCK)
    if causal:
        n_blocks = max(n_blocks, min(_MAX_QUERY_BLOCKS, -(-sq // _QUERY_BLOCK)))
    bounds = np.linspace(0, sq, n_blocks + 1).round().astype(int).tolist()
    return tuple((start, stop, stop if causal else sk) for start, stop in zip(bounds[:-1], bounds[1:], strict=True))


def _scores(q, k, mask):
    """Scores `[b, kv, g, m, n]` in float32, `finfo.min` where masked (as `transformers`' eager attention)."""
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q, k).astype(jnp.float32)
    return jnp.where(mask[:, None, None], scores, np.finfo(np.float32).min)


def _probs(q, k, mask, row_max, row_sum):
    """Softmax probabilities `[b, kv, g, m, n]` in float32 from the scores and each row's max and sum."""
    return jnp.exp(_scores(q, k, mask) - row_max) / row_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, mask, blocks):
    """Queries `q [b, kv, g, sq, d]` (scaled) over keys and values `[b, kv, sk, d]`; mask `[b, sq, sk]`."""
    return _attend_fwd(q, k, v, mask, blocks)[0]


def _attend_fwd(q, k, v, mask, blocks):
    outs, row_maxes, row_sums = [], [], []
    for start, stop, end in blocks:
        # One block after the other (`_after`), each slicing its keys and values when it starts.
        q_block, k_block, v_block = _after((q, k, v), *outs[-1:])
        q_block, k_block, v_block = q_block[:, :, :, start:stop], k_block[:, :, :end], v_block[:, :, :end]
        scores = _scores(q_block, k_block, mask[:, start:stop, :end])  # [b, kv, g, m, n]
        row_max = jnp.max(scores, axis=-1, keepdims=True)  # [b, kv, g, m, 1]
        unnormalized = jnp.exp(scores - row_max)
        row_sum = jnp.sum(unnormalized, axis=-1, keepdims=True)
        outs.append(jnp.einsum("bkgqs,bksd->bkgqd", (unnormalized / row_sum).astype(v.dtype), v_block))
        row_maxes.append(row_max)
        row_sums.append(row_sum)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)  # [b, kv, g, sq, d]
    row_max = checkpoint_name(jnp.concatenate(row_maxes, axis=3), "attn_stats")  # [b, kv, g, sq, 1]
    row_sum = checkpoint_name(jnp.concatenate(row_sums, axis=3), "attn_stats")
    return out, (q, k, v, mask, row_max, row_sum)


def _attend_bwd(blocks, res, grad_out):
    # Per block, autodiff's products with the probabilities recomputed, and the key and value gradients
    # computed transposed (`[b, kv, d, n]`, contracting the score-sized operand over its rows in place), so
    # that no score-sized array is transposed. The key and value gradients add up over blocks in float32.
    q, k, v, mask, row_max, row_sum = res
    b, kv, g, sq, d = q.shape
    sk = k.shape[2]
    grad_q = []
    grad_k = grad_v = jnp.zeros((b, kv, d, sk), jnp.float32)
    for start, stop, end in blocks:
        # The first block's scores come after the output's gradient (else XLA merges them, and the row
        # statistics broadcast to their shape, with the forward pass's: every block's would live from the
        # forward pass on), each next block after the last, and each block slices its keys and values when it
        # starts (else XLA makes every block's copies first).
        after = _after((q, k, v, row_max, row_sum), *((grad_k, grad_v) if grad_q else (grad_out,)))
        q_block, block_max, block_sum = (x[:, :, :, start:stop] for x in (after[0], *after[3:]))  # [b, kv, g, m, .]
        k_block, v_block = after[1][:, :, :end], after[2][:, :, :end]  # [b, kv, n, d]
        grad_out_block, mask_block = grad_out[:, :, :, start:stop], mask[:, start:stop, :end]
        probs = _probs(q_block, k_block, mask_block, block_max, block_sum)
        grad_probs = jnp.einsum("bkgqd,bksd->bkgqs", grad_out_block, v_block).astype(jnp.float32)
        grad_scores = probs * (grad_probs - jnp.sum(grad_probs * probs, axis=-1, keepdims=True))
        grad_scores = jnp.where(mask_block[:, None, None], grad_scores, 0.0).astype(q.dtype)  # [b, kv, g, m, n]
        grad_q.append(jnp.einsum("bkgqs,bksd->bkgqd", grad_scores, k_block))
        rows = (b, kv, g * (stop - start), -1)
        pad = ((0, 0), (0, 0), (0, 0), (0, sk - end))
        grad_k += jnp.pad(jnp.einsum("bkmd,bkms->bkds", q_block.reshape(rows), grad_scores.reshape(rows),
                                     preferred_element_type=jnp.float32), pad)
        grad_v += jnp.pad(jnp.einsum("bkmd,bkms->bkds", grad_out_block.reshape(rows),
                                     probs.astype(v.dtype).reshape(rows), preferred_element_type=jnp.float32), pad)
    grad_q = grad_q[0] if len(grad_q) == 1 else jnp.concatenate(grad_q, axis=3)
    return grad_q, grad_k.swapaxes(2, 3).astype(k.dtype), grad_v.swapaxes(2, 3).astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


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
    """`x * cos + rotate_half(x) * sin` over the last axis; cos/sin `[b, s, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(d, f, **kw)
        self.up_proj = nnx.Linear(d, f, **kw)
        self.down_proj = nnx.Linear(f, d, **kw)

    def __call__(self, x):
        gate, up = checkpoint_name(self.gate_proj(x), "mlp_gate"), checkpoint_name(self.up_proj(x), "mlp_up")
        return self.down_proj(swiglu(gate, up))


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


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks with residual connections."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None):
        if cache is None:
            x = checkpoint_name(x + self.self_attn(self.input_layernorm(x), cos, sin, mask), "h_mid")
            return x + self.mlp(self.post_attention_layernorm(x))
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class CausalLM(nnx.Module):
    """A Llama-family causal language model: embeddings, scanned decoder layers,
    final RMSNorm and the output head (the embedding matrix when tied).

    Attributes:
        config: The `ModelConfig`.
        embed_tokens: `nnx.Embed` `[vocab, hidden]`.
        layers: One `DecoderLayer` whose variables are stacked over the layers.
        norm: Final `RMSNorm`.
        lm_head: `nnx.Linear` `[hidden, vocab]` without bias, or None when tied.
        dtype: Compute dtype (float32 on CPU, bfloat16 on GPU/TPU is usual).
        remat: Rematerialize each layer in the backward pass (`nnx.remat`); without it a
            layer keeps its products' outputs, attention probabilities and residual stream,
            and recomputes its RMSNorm outputs and SwiGLU product (elementwise passes).

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

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
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
            rngs: Initializers' randomness.
        """
        self.config = config
        self.dtype = np.dtype(dtype)
        self.remat = bool(remat)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, param_dtype=param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = create(rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
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
            if _mixed(h, table):
                return head_logits(h, table, 0)
            logits = self.embed_tokens.attend(h)
        else:
            head = self.lm_head
            if type(head) is nnx.Linear and head.bias is None and _mixed(h, head.kernel[...]):
                return head_logits(h.astype(head.dtype or h.dtype), head.kernel[...], 1)
            logits = head(h)
        return logits.astype(jnp.float32)

    def _decode(self, input_ids, positions, attention_mask, segment_ids, cache):
        """Embeddings, decoder layers and final norm: `(h [batch, seq, hidden], updated cache or None)`."""
        b, s = input_ids.shape
        start = None if cache is None else cache.length
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if cache is not None:
                positions = positions + start
        h = self.embed_tokens(input_ids).astype(self.dtype)
        angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(self.config.inv_freq(), jnp.float32)[None, None]
        angles = jnp.concatenate([angles, angles], axis=-1)  # [b, s, head_dim]
        cos, sin = jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)
        if cache is None:
            mask = causal_mask(s, attention_mask, segment_ids, self.config.sliding_window, b)
        else:
            mask = cache.mask(s, attention_mask, self.config.sliding_window)

        if cache is None:
            def body(h, layer):
                return layer(h, cos, sin, mask)

            # Only the variables a layer changes (dropout's RNG counts) come out of the remat, so the frozen
            # weights stay the arrays (and shardings) they were. Without `remat`, a policy keeps `_KEEP`'s
            # values; inside a scan that recomputation needs no CSE barrier (`jax.checkpoint`'s `prevent_cse`).
            if self.remat:
                body = nnx.remat(body, graph_updates=False)
            else:
                body = nnx.remat(body, prevent_cse=False, policy=_KEEP, graph_updates=False)
            h = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(h, self.layers)
        else:
            def body(h, layer, k, v):
                return layer(h, cos, sin, mask, (k, v, start))

            h, (keys, values) = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))(
                h, self.layers, cache.keys, cache.values)
            cache = KVCache(keys, values, start + s, cache.valid if attention_mask is None else
                            jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask.astype(jnp.bool_),
                                                                start, axis=1))
        return self.norm(h), cache


def _mixed(h: jax.Array, kernel: jax.Array) -> bool:
    """A 16-bit head kernel multiplied with float32 activations (float32 compute over a 16-bit model)."""
    return h.dtype == jnp.float32 and kernel.dtype.itemsize == 2 and jnp.issubdtype(kernel.dtype, jnp.floating)


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
    q = jnp.arange(seq_len)[:, None]
    k = jnp.arange(seq_len)[None, :]
    mask = k <= q
    if sliding_window is not None:
        mask = mask & (q - k < sliding_window)
    mask = jnp.broadcast_to(mask, (batch, seq_len, seq_len))
    if attention_mask is not None:
        mask = mask & (attention_mask[:, None, :] != 0)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask



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

    def mask(self, s: int, attention_mask: jax.Array | None, sliding_window: int | None) -> jax.Array:
        """`[batch, s, max_len]`: query `i` (at `length + i`) sees valid keys at or before it."""
        max_len = self.keys.shape[2]
        q = self.length + jnp.arange(s)[:, None]
        k = jnp.arange(max_len)[None, :]
        allowed = k <= q
        if sliding_window is not None:
            allowed = allowed & (q - k < sliding_window)
        valid = self.valid
        if attention_mask is not None:
            valid = jax.lax.dynamic_update_slice_in_dim(valid, attention_mask.astype(jnp.bool_), self.length, axis=1)
        return allowed[None] & valid[:, None, :]

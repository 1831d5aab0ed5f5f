"""Text generation with a KV cache: greedy, temperature and top-p sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax._src.models.llama import CausalLM, KVCache

__all__ = ["generate"]


def generate(
    model: CausalLM,
    input_ids: np.ndarray | jax.Array,
    *,
    max_new_tokens: int,
    attention_mask: np.ndarray | jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """Continues each prompt by up to `max_new_tokens` tokens.

    The prompt is run once to fill a `KVCache`; every new token then costs one
    step over the cache, all inside one jitted `lax.scan`. Dropout is off.

    Args:
        model: A `CausalLM` (quantized or not, with or without adapters).
        input_ids: Prompts `[batch, prompt_len]`; pad shorter prompts on the left.
        max_new_tokens: Tokens to generate.
        attention_mask: `[batch, prompt_len]`, 0 on left padding; default all ones.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: Nucleus sampling: sample from the smallest set of tokens whose
            probability reaches `top_p` (1.0: all tokens).
        eos_token_id: After this token a sequence only produces `pad_token_id`.
        pad_token_id: Filler after `eos_token_id`.
        seed: Sampling seed.

    Returns:
        The new tokens `[batch, max_new_tokens]` (int32 NumPy).

    Raises:
        ValueError: Non-positive `max_new_tokens`, a negative temperature,
            `top_p` outside (0, 1], or shapes that do not match.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlora_jax.models import CausalLM, ModelConfig, generate
        >>> cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4,
        ...                   num_kv_heads=2)
        >>> generate(CausalLM(cfg, rngs=nnx.Rngs(0)), np.array([[1, 2, 3]]), max_new_tokens=4).shape
        (1, 4)
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must lie in (0, 1], got {top_p}")
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, prompt_len], got shape {ids.shape}")
    mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask: shape {mask.shape} does not match input_ids {ids.shape}")
    total = ids.shape[1] + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"max_new_tokens: prompt ({ids.shape[1]}) + {max_new_tokens} new tokens exceed the model's "
                         f"max_position_embeddings {model.config.max_position_embeddings}")
    graphdef, state = nnx.split(model)
    tokens = _run(graphdef, state, ids, mask, jax.random.key(seed), max_new_tokens=max_new_tokens,
                  temperature=float(temperature), top_p=float(top_p),
                  eos=-1 if eos_token_id is None else int(eos_token_id), pad=int(pad_token_id))
    return np.asarray(tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p", "eos", "pad"))
def _run(graphdef, state, ids, mask, key, *, max_new_tokens, temperature, top_p, eos, pad):
    model = nnx.merge(graphdef, state)
    model.eval()
    batch, prompt_len = ids.shape
    cache = KVCache.create(model.config, batch, prompt_len + max_new_tokens, model.dtype)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    logits, cache = model(ids, positions=positions, attention_mask=mask, cache=cache)
    lengths = jnp.sum(mask, axis=-1).astype(jnp.int32)  # real prompt tokens: the next position

    eval_graphdef, eval_state = nnx.split(model)

    def step(carry, t):
        weights, cache, logits, key, done = carry
        key, sub = jax.random.split(key)
        token = _choose(logits, sub, temperature, top_p)
        token = jnp.where(done, jnp.int32(pad), token)
        done = done | (token == eos)
        # The weights ride in the carry so that the module is built from values of this trace level.
        step_model = nnx.merge(eval_graphdef, weights)
        out, cache = step_model(token[:, None], positions=(lengths + t)[:, None], cache=cache)
        return (weights, cache, out[:, -1], key, done), token

    init = (eval_state, cache, logits[:, -1], key, jnp.zeros((batch,), jnp.bool_))
    _, tokens = jax.lax.scan(step, init, jnp.arange(max_new_tokens, dtype=jnp.int32))
    return tokens.T


def _choose(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """The next token per row: argmax, or a sample at `temperature` from the top-p nucleus."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / np.float32(temperature)
    if top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        sorted_logits = jnp.where(before < np.float32(top_p), sorted_logits, -jnp.inf)
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

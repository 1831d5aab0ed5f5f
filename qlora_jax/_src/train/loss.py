"""Token-level cross entropy with per-token weights, returned as sums.

Returning `(Σ w·ce, Σ w)` rather than their ratio is what makes gradient
accumulation exact: the loss of a batch split into micro-batches is the sum
of their numerators over the sum of their denominators, the weighted mean
over every token, not the mean of the micro-batch means.

`chunked_cross_entropy` gives the same sums from the final hidden states
without ever holding the `[batch, seq, vocab]` logits: the output head runs
on chunks of tokens in a loop whose body is rematerialized, so the backward
pass recomputes each chunk's logits and memory grows with the chunk, not the
sequence (the idea of Liger Kernel's fused linear cross entropy, Hsu et al.,
2024, https://arxiv.org/abs/2410.10989, in plain JAX).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = ["masked_cross_entropy", "chunked_cross_entropy"]


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(Σ w·ce, Σ w)` over every token; the loss is their ratio.

    Args:
        logits: `[batch, seq, vocab]` (computed in float32).
        targets: `[batch, seq]` int, the next token at each position.
        weights: `[batch, seq]`, 0 where no loss is taken (prompt, padding,
            the last token of a packed segment), usually 1 elsewhere.

    Returns:
        `(loss_sum, weight_sum)`, two float32 scalars.

    Raises:
        ValueError: `targets` or `weights` not of shape `logits.shape[:-1]`.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.train import masked_cross_entropy
        >>> logits = jnp.zeros((1, 3, 4))  # uniform over 4 tokens: ce = log 4 everywhere
        >>> loss_sum, n = masked_cross_entropy(logits, jnp.asarray([[1, 2, 3]]), jnp.asarray([[1.0, 1.0, 0.0]]))
        >>> round(float(loss_sum / n), 4), float(n)
        (1.3863, 2.0)
    """
    if targets.shape != logits.shape[:-1] or weights.shape != logits.shape[:-1]:
        raise ValueError(f"masked_cross_entropy: targets {tuple(targets.shape)} and weights {tuple(weights.shape)} "
                         f"must both be logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [batch, seq]
    w = weights.astype(jnp.float32)
    return jnp.sum(w * ce), jnp.sum(w)


def chunked_cross_entropy(
    hidden: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """`masked_cross_entropy(head(hidden), targets, weights)` without the `[batch, seq, vocab]` logits.

    The batch and sequence axes are flattened into tokens and cut into
    `ceil(batch * seq / chunk_size)` chunks of equal length (at most
    `chunk_size`; the last is padded with weight 0). A `lax.scan` over the
    chunks applies `head` to `[1, chunk, hidden]`, takes the cross entropy
    in float32 and adds up `Σ w·ce`; its body is rematerialized
    (`jax.checkpoint`), so the backward pass recomputes one chunk's logits at
    a time and the step holds about `chunk_size × vocab` floats of logits and
    their gradient instead of `batch × seq × vocab`. Gradients reach
    `hidden` and every variable `head` reads (LoRA adapters of a targeted
    `lm_head`, a tied embedding). The sums equal the unchunked ones up to
    float32 rounding (they are added chunk by chunk).

    When `head` is an `nnx.Module` or a bound method of one (e.g.
    `model.logits_from_hidden`), that module's RNG state is carried through
    the loop, so adapter dropout inside the head draws fresh masks per chunk
    (other masks than an unchunked call, as the keys are split differently)
    and the backward pass recomputes the same ones. Any other callable may
    read modules it closes over, but not advance their RNG streams.

    Args:
        hidden: Final hidden states `[batch, seq, hidden]` (after the final norm).
        head: Maps `[1, chunk, hidden]` to logits `[1, chunk, vocab]` (cast to float32 here).
        targets: `[batch, seq]` int, the next token at each position.
        weights: `[batch, seq]`, 0 where no loss is taken.
        chunk_size: The most tokens whose logits exist at once (>= 1).

    Returns:
        `(loss_sum, weight_sum)`, two float32 scalars, as `masked_cross_entropy`.

    Raises:
        ValueError: `targets` or `weights` not of shape `hidden.shape[:-1]`,
            or `chunk_size` not a positive integer.
        TypeError: `head` is not callable.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.train import chunked_cross_entropy, masked_cross_entropy
        >>> head = nnx.Linear(8, 32, rngs=nnx.Rngs(0))
        >>> hidden = jnp.ones((2, 5, 8))
        >>> targets, weights = jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5))
        >>> chunked = chunked_cross_entropy(hidden, head, targets, weights, chunk_size=4)  # 3 chunks of 4 tokens
        >>> plain = masked_cross_entropy(head(hidden), targets, weights)
        >>> bool(jnp.allclose(chunked[0], plain[0])), float(chunked[1])
        (True, 10.0)
    """
    if hidden.ndim != 3 or targets.shape != hidden.shape[:-1] or weights.shape != hidden.shape[:-1]:
        raise ValueError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)} must be [batch, seq, hidden] and "
                         f"targets {tuple(targets.shape)} and weights {tuple(weights.shape)} both "
                         f"hidden.shape[:-1] = {tuple(hidden.shape[:-1])}")
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be an integer >= 1, got {chunk_size!r}")
    module, call = _split_head(head)
    tokens, width = hidden.shape[0] * hidden.shape[1], hidden.shape[2]
    n_chunks = -(-tokens // int(chunk_size))
    chunk = -(-tokens // n_chunks)  # as equal as possible: fewer than n_chunks padding tokens
    pad = n_chunks * chunk - tokens
    w = weights.astype(jnp.float32)
    xs = (hidden.reshape(tokens, width), targets.reshape(tokens), w.reshape(tokens))
    if pad:
        xs = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in xs)
    xs = tuple(x.reshape(n_chunks, 1, chunk, *x.shape[1:]) for x in xs)  # [n_chunks, 1, chunk(, hidden)]
    if module is None:
        graphdef, rng_state, rest = None, None, None
    else:
        graphdef, rng_state, rest = nnx.split(module, nnx.RngState, ...)

    @jax.checkpoint  # the backward pass recomputes the chunk's logits instead of keeping them
    def chunk_loss(rng_state, h, t, w):
        m = None if module is None else nnx.merge(graphdef, rng_state, rest)
        logits = call(m, h).astype(jnp.float32)  # [1, chunk, vocab]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, t)  # [1, chunk]
        return jnp.sum(w * ce), (None if m is None else nnx.state(m, nnx.RngState))

    def body(carry, x):
        loss_sum, rng_state = carry
        chunk_sum, rng_state = chunk_loss(rng_state, *x)
        return (loss_sum + chunk_sum, rng_state), None

    (loss_sum, rng_state), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), rng_state), xs)
    if module is not None:
        nnx.update(module, rng_state)  # dropout streams in the head advance as after any call
    return loss_sum, jnp.sum(w)


def _split_head(head: Callable[[jax.Array], jax.Array]) -> tuple[nnx.Module | None, Callable[[Any, jax.Array], Any]]:
    """The module whose state `head` uses (or None) and `call(module, h)` that applies `head` with it."""
    if isinstance(head, nnx.Module):
        return head, lambda m, h: m(h)
    if inspect.ismethod(head) and isinstance(head.__self__, nnx.Module):
        return head.__self__, head.__func__
    if not callable(head):
        raise TypeError(f"head: expected a callable (hidden -> logits), got {type(head).__name__}")
    return None, lambda _, h: head(h)

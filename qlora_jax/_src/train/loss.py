"""Token-level cross entropy with per-token weights, returned as sums.

Returning `(Σ w·ce, Σ w)` rather than their ratio is what makes gradient
accumulation exact: the loss of a batch split into micro-batches is the sum
of their numerators over the sum of their denominators, the weighted mean
over every token, not the mean of the micro-batch means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["masked_cross_entropy"]


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

"""The optimizer of a QLoRA run: gradient clipping, then AdamW on a warmup schedule.

QLoRA (Dettmers et al., 2023) trains with (paged) AdamW, a constant learning
rate after a short warmup, and gradients clipped to a global norm of 0.3.
The schedules are written out as `transformers` defines them, rather than
assembled from optax's, whose `linear_schedule` holds its initial value when
the warmup has zero steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qlora_jax._src.train.config import TrainConfig

__all__ = ["make_optimizer", "make_schedule"]


def make_schedule(config: TrainConfig) -> optax.Schedule:
    """The learning rate as a function of the number of updates already applied.

    `lr · s / W` during the warmup (`s < W = config.warmup_steps`), then
    `lr` ("constant"), `lr · (T - s) / (T - W)` ("linear") or
    `lr · ½(1 + cos(π (s - W) / (T - W)))` ("cosine"), with `T =
    config.total_steps` (and `T - W` at least 1), as `transformers`' schedules;
    both decays stay at 0 after `T`.

    Args:
        config: The `TrainConfig`.

    Returns:
        An optax schedule: count (int array) → float32 learning rate.

    Example:
        >>> from qlora_jax.train import TrainConfig, make_schedule
        >>> sched = make_schedule(TrainConfig(total_steps=10, lr=1.0, warmup_ratio=0.2, schedule="linear"))
        >>> [round(float(sched(s)), 3) for s in (0, 1, 2, 6, 10, 12)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    lr, kind = np.float32(config.lr), config.schedule
    warmup, total = config.warmup_steps, config.total_steps
    decay_steps = np.float32(max(1, total - warmup))

    def schedule(count: jax.Array) -> jax.Array:
        s = jnp.asarray(count).astype(jnp.float32)
        warm = s / np.float32(max(1, warmup))
        progress = jnp.clip((s - np.float32(warmup)) / decay_steps, 0.0, 1.0)
        if kind == "constant":
            after = jnp.ones_like(s)
        elif kind == "linear":
            after = jnp.clip((np.float32(total) - s) / decay_steps, 0.0, 1.0)
        else:
            after = 0.5 * (1.0 + jnp.cos(np.float32(np.pi) * progress))
        return lr * jnp.where(s < np.float32(warmup), warm, after)

    return schedule


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping at `config.max_grad_norm` (unless None), then AdamW on `make_schedule(config)`.

    Wrap it for the adapters with `nnx.Optimizer(model, make_optimizer(config),
    wrt=nnx.LoRAParam)` (`Trainer` does). AdamW is wrapped in
    `optax.inject_hyperparams`, so the learning rate of the latest update
    lives in the optimizer state under the name `learning_rate`, where
    `train_step` reads its `lr` metric. `init` and `update` run under
    standard dtype promotion (optax mixes its int32 step count with Python
    floats), so the transformation also works where
    `jax_numpy_dtype_promotion` is "strict". Equal configs give the same
    object, so a new optimizer does not make `train_step` compile again.

    Args:
        config: The `TrainConfig`.

    Returns:
        The optax transformation.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.train import TrainConfig, make_optimizer
        >>> tx = make_optimizer(TrainConfig(total_steps=10, lr=0.1, warmup_ratio=0.0, max_grad_norm=1.0))
        >>> params = {"w": jnp.zeros(2)}
        >>> updates, _ = tx.update({"w": jnp.asarray([30.0, 40.0])}, tx.init(params), params)
        >>> [round(float(u), 4) for u in updates["w"]]  # Adam's first step moves each weight by -lr
        [-0.1, -0.1]
        >>> make_optimizer(TrainConfig(total_steps=10)) is make_optimizer(TrainConfig(total_steps=10))
        True
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    return _make_optimizer(config)


@functools.cache
def _make_optimizer(config: TrainConfig) -> optax.GradientTransformationExtraArgs:
    # One object per config: `nnx.Optimizer` keeps `tx` in its static graph, so a new (equal) transformation
    # would make `train_step` compile again for every new optimizer.
    def adamw(learning_rate):
        return optax.adamw(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay)

    adamw = optax.inject_hyperparams(adamw)(learning_rate=make_schedule(config))
    tx = adamw if config.max_grad_norm is None else optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
    return _standard_promotion(tx)


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`tx` with its `init` and `update` traced under standard dtype promotion."""
    tx = optax.with_extra_args_support(tx)

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init, update)

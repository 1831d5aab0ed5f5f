"""Checkpoints for exact resumption: adapters, RNG state, optimizer state, step and data position.

A thin layer over `qj.checkpoint`: the data pipeline's position (any
JSON-serializable value, e.g. a seeded generator's state) and the
`TrainConfig` travel in the checkpoint's `extra`. Restoring all of it and
replaying the same batches gives bit-identical adapters and optimizer state
to a run that was never interrupted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flax import nnx

from qlora_jax._src import checkpoint
from qlora_jax._src.train.config import TrainConfig

__all__ = ["save", "restore"]


def save(
    directory: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    step: int,
    data_state: Any = None,
    *,
    config: TrainConfig | None = None,
    max_to_keep: int | None = 3,
) -> Path:
    """Saves everything a run needs to continue exactly: `qj.checkpoint.save` plus data position and config.

    Args:
        directory: The run's checkpoint directory (one subdirectory per step;
            a save that is interrupted leaves the previous ones intact).
        model: The model; its `nnx.LoRAParam` adapters and RNG state (dropout
            keys and counts) are saved, not the frozen base.
        optimizer: The `nnx.Optimizer` (moments, counts, step).
        step: Updates applied so far.
        data_state: JSON-serializable position of the data pipeline (tuples
            come back as lists), e.g. `np.random.Generator.bit_generator.state`.
        config: The run's `TrainConfig`; stored so that `restore` can refuse
            a different one.
        max_to_keep: Keep this many latest checkpoints (None: all).

    Returns:
        The step's directory.

    Example:
        >>> import tempfile, jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> model = qj.nnx.QLoRALinear(qj.quantize(jnp.ones((64, 8)), "nf4"), rank=2, alpha=4,
        ...                            rngs=nnx.Rngs(0))
        >>> config = qj.train.TrainConfig(total_steps=100)
        >>> optimizer = nnx.Optimizer(model, qj.train.make_optimizer(config), wrt=nnx.LoRAParam)
        >>> d = tempfile.mkdtemp()
        >>> qj.train.save(d, model, optimizer, step=5, data_state={"epoch": 0, "row": 40}, config=config).name
        '5'
        >>> qj.train.restore(d, model, optimizer, config=config)
        (5, {'epoch': 0, 'row': 40})
    """
    extra = {"data": data_state, "train_config": None if config is None else config.to_dict()}
    return checkpoint.save(directory, model, optimizer, step, extra, max_to_keep=max_to_keep)


def restore(
    directory: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    *,
    step: int | None = None,
    config: TrainConfig | None = None,
) -> tuple[int, Any]:
    """Restores the adapters, RNG state and optimizer state in place; returns `(step, data_state)`.

    Build the model and optimizer exactly as for the original run (same
    base weights, `apply_qlora` and `TrainConfig`), restore, then continue
    from batch `step` with the returned data position.

    Args:
        directory: The run's checkpoint directory.
        model: The model to fill.
        optimizer: The optimizer to fill.
        step: The step to restore; default the latest complete one.
        config: The `TrainConfig` of the continuing run, checked against the
            saved one before anything is restored (None: no check).

    Returns:
        `(step, data_state)` as given to `save`.

    Raises:
        FileNotFoundError: No complete checkpoint in `directory`.
        ValueError: `config` differs from the saved config (the fields are
            named), or the checkpoint does not fit the model or optimizer.

    Example:
        See `save`.
    """
    if config is not None:
        if step is None:  # pin the step that is checked and restored
            step = checkpoint.latest_step(directory)
        _, extra = checkpoint.restore(directory, _NoVariables(), step=step)  # reads only the metadata
        saved = extra.get("train_config")
        # Fields added to TrainConfig after the checkpoint was written (e.g. loss_chunk) are not compared.
        given = {k: v for k, v in config.to_dict().items() if saved is None or k in saved}
        if saved is not None and saved != given:
            diff = {k: (saved.get(k), v) for k, v in given.items() if saved.get(k) != v}
            raise ValueError(f"{Path(directory) / str(step)}: saved with a different TrainConfig; (saved, given): "
                             f"{diff}. Pass config=None to restore anyway")
    step, extra = checkpoint.restore(directory, model, optimizer, step=step)
    return step, extra.get("data")


class _NoVariables(nnx.Module):
    """A module without variables: `checkpoint.restore` into it reads only `(step, extra)`."""

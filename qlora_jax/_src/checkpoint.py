"""Orbax checkpoints of a fine-tuning run: adapters, optimizer state, step, extras.

The frozen base is normally not saved (it is rebuilt from its source
checkpoint); `include_base=True` saves every other variable too (packed codes
and scales, norms, embeddings), so a run can restart without the original
checkpoint. Orbax writes each step to a temporary directory and renames it
when complete, so an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

__all__ = ["save", "restore", "latest_step"]

_TRAINABLE = nnx.LoRAParam


def _split_keys(tree: Any) -> Any:
    """PRNG key arrays as their uint32 data (orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _parts(model: nnx.Module, optimizer: nnx.Optimizer | None, include_base: bool) -> dict[str, nnx.State]:
    parts = {"adapters": nnx.state(model, _TRAINABLE), "rng": nnx.state(model, nnx.RngState)}
    if optimizer is not None:
        parts["optimizer"] = nnx.state(optimizer)
    if include_base:
        parts["base"] = nnx.state(model, nnx.Not(nnx.Any(_TRAINABLE, nnx.RngState)))
    return {name: state for name, state in parts.items() if jax.tree.leaves(state)}


def save(
    directory: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    *,
    include_base: bool = False,
    max_to_keep: int | None = 3,
) -> Path:
    """Saves adapters (+ RNG state), optimizer state and `extra` as step `step`.

    Args:
        directory: The run's checkpoint directory (one subdirectory per step).
        model: The model; its `nnx.LoRAParam` variables and RNG state are saved.
        optimizer: An `nnx.Optimizer`, or None.
        step: The step number of this checkpoint.
        extra: JSON-serializable metadata (e.g. data position, config).
        include_base: Also save every other variable (the quantized base).
        max_to_keep: Keep this many latest checkpoints (None: all).

    Returns:
        The step's directory.

    Example:
        >>> import tempfile, jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> layer = qj.nnx.QLoRALinear(qj.quantize(jnp.ones((64, 64)), "nf4"), rank=2, alpha=2, rngs=nnx.Rngs(0))
        >>> d = tempfile.mkdtemp()
        >>> qj.checkpoint.save(d, layer, step=3, extra={"epoch": 1}).name
        '3'
        >>> qj.checkpoint.restore(d, layer)
        (3, {'epoch': 1})
    """
    directory = Path(directory).absolute()
    items = {name: ocp.args.StandardSave(_split_keys(nnx.to_pure_dict(state)))
             for name, state in _parts(model, optimizer, include_base).items()}
    items["extra"] = ocp.args.JsonSave({"extra": extra or {}, "include_base": include_base,
                                        "optimizer": optimizer is not None, "parts": sorted(items)})
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)) as manager:
        manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
    return directory / str(int(step))


def latest_step(directory: str | os.PathLike) -> int | None:
    """The last complete step in `directory`, or None.

    Example:
        >>> import tempfile, qlora_jax as qj
        >>> qj.checkpoint.latest_step(tempfile.mkdtemp()) is None
        True
    """
    directory = Path(directory).absolute()
    if not directory.exists():
        return None
    with ocp.CheckpointManager(directory) as manager:
        return manager.latest_step()


def restore(
    directory: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    step: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restores a checkpoint into `model` (and `optimizer`) in place.

    The model must have the same structure as the saved one (build it the same
    way, e.g. `from_pretrained` with the same configs). Arrays are placed with
    the shardings of the current model's variables, so a checkpoint saved on
    one mesh restores on another.

    Args:
        directory: The run's checkpoint directory.
        model: The model to fill.
        optimizer: The optimizer to fill, or None.
        step: The step to restore; default the latest.

    Returns:
        `(step, extra)`.

    Raises:
        FileNotFoundError: No checkpoint in `directory`.
        ValueError: The checkpoint lacks optimizer state that was asked for, or
            its arrays do not fit the model (names the variable).

    Example:
        See `save`.
    """
    directory = Path(directory).absolute()
    step = latest_step(directory) if step is None else int(step)
    if step is None:
        raise FileNotFoundError(f"{directory}: no complete checkpoint")
    with ocp.CheckpointManager(directory) as manager:
        meta = manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
        if optimizer is not None and not meta["optimizer"]:
            raise ValueError(f"{directory / str(step)}: saved without optimizer state")
        parts = _parts(model, optimizer, meta["include_base"])
        if not set(parts) <= set(meta["parts"]):
            raise ValueError(f"{directory / str(step)}: holds {meta['parts']}, this model and optimizer have "
                             f"{sorted(parts)}")
        targets = {name: _split_keys(nnx.to_pure_dict(state)) for name, state in parts.items()}
        abstract = {name: jax.tree.map(_abstract, t) for name, t in targets.items()}
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(a) for name, a in abstract.items()}))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{directory / str(step)}: does not fit this model: {e}") from e
    for name, state in parts.items():
        leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
        new = jax.tree.leaves(restored[name])
        if len(new) != len(leaves):
            raise ValueError(f"{directory / str(step)}: {name} has {len(new)} arrays, the model {len(leaves)}")
        fixed = [jax.random.wrap_key_data(n, impl=jax.random.key_impl(o)) if _is_key(o) else n
                 for o, n in zip(leaves, new, strict=True)]
        nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, fixed))
        nnx.update(optimizer if name == "optimizer" else model, state)
    return step, meta["extra"]


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x

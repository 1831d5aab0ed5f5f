"""Orbax checkpoints of a fine-tuning run: adapters, RNG and optimizer state, step, data position, config.

One directory per run, one subdirectory per step. Besides the arrays a
checkpoint holds JSON metadata: the step, a free-form `extra` dict, the data
pipeline's position (`data_state`) and the run's config (e.g. `TrainConfig`),
which `restore` compares with the continuing run's before it changes
anything. Restoring all of it and replaying the same batches gives
bit-identical adapters and optimizer state to a run that was never
interrupted; `metadata` reads the metadata without a model.

The frozen base is normally not saved (it is rebuilt from its source
checkpoint); `include_base=True` saves every other variable too (packed codes
and scales, norms, embeddings), so a run can restart without the original
checkpoint. Orbax writes each step to a temporary directory and renames it
when complete, so an interrupted save leaves the previous checkpoint intact.
Each complete step then gets a manifest (every file's size and SHA-256):
`restore` checks it and, for the latest step, falls back to the previous one
when a file was damaged since (truncated, changed), with a warning naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

__all__ = ["CheckpointMetadata", "DamagedCheckpoint", "DamagedCheckpointWarning", "save", "restore", "latest_step",
           "metadata"]

_TRAINABLE = nnx.LoRAParam  # what is saved as "adapters" without an optimizer
MANIFEST = "qlora_jax_manifest.json"  # in each step's directory: every other file's size and SHA-256


def _split_keys(tree: Any) -> Any:
    """PRNG key arrays as their uint32 data (orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _parts(model: nnx.Module, optimizer: nnx.Optimizer | None, include_base: bool) -> dict[str, nnx.State]:
    """The states saved: the trained variables (`optimizer.wrt`, else the adapters), RNG, optimizer, base."""
    trained = _TRAINABLE if optimizer is None else optimizer.wrt
    parts = {"adapters": nnx.state(model, trained), "rng": nnx.state(model, nnx.RngState)}
    if optimizer is not None:
        parts["optimizer"] = nnx.state(optimizer)
    if include_base:
        parts["base"] = nnx.state(model, nnx.Not(nnx.Any(trained, nnx.RngState)))
    return {name: state for name, state in parts.items() if jax.tree.leaves(state)}


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """What a checkpoint holds besides its arrays; returned by `metadata` and `restore`.

    Attributes:
        step: The checkpoint's step.
        extra: The `extra` dict given to `save` (`{}` when none).
        data_state: The `data_state` given to `save` (None when none),
            after a JSON round trip (tuples come back as lists).
        config: The fields of the `config` given to `save`, as a dict
            (`TrainConfig(**config)` rebuilds a `TrainConfig`), or None.
        include_base: Whether the frozen base was saved.
        has_optimizer: Whether optimizer state was saved.

    Example:
        >>> import qlora_jax as qj
        >>> meta = qj.checkpoint.CheckpointMetadata(step=2, extra={}, data_state=None, include_base=False,
        ...                                         config={"total_steps": 10}, has_optimizer=True)
        >>> qj.train.TrainConfig(**meta.config).total_steps  # a saved TrainConfig, rebuilt
        10
    """

    step: int
    extra: dict[str, Any]
    data_state: Any
    config: dict[str, Any] | None
    include_base: bool
    has_optimizer: bool


def save(
    directory: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    data_state: Any = None,
    config: Any = None,
    include_base: bool = False,
    max_to_keep: int | None = 3,
) -> Path:
    """Saves adapters, RNG state, optimizer state and metadata as step `step`.

    Args:
        directory: The run's checkpoint directory (one subdirectory per step).
            Orbax writes the step to a temporary directory
            (`<step>.orbax-checkpoint-tmp`) and renames it when complete: a
            save that fails leaves the previous steps intact and removes its
            temporary directory; one left by a killed process is never read
            as a checkpoint and is removed by the next `save`. A complete
            step of the same number (e.g. one written before a run was
            resumed from an earlier step) is replaced; it is kept until the
            new one is complete.
        model: The model; the variables the optimizer trains (its `wrt`;
            without an optimizer the `nnx.LoRAParam` adapters) and the RNG
            state (dropout keys and counts) are saved, not the frozen base.
        optimizer: An `nnx.Optimizer` (moments, counts, step), or None.
        step: The step number of this checkpoint (updates applied so far).
        extra: JSON-serializable metadata of your own.
        data_state: JSON-serializable position of the data pipeline, e.g.
            `Batcher.state()` or `np.random.Generator.bit_generator.state`.
        config: The run's config, a dataclass such as `TrainConfig`; its
            fields are stored so that `restore` can refuse a different one.
        include_base: Also save every other variable (the quantized base).
        max_to_keep: Keep this many latest checkpoints (None: all).

    Returns:
        The step's directory.

    Raises:
        TypeError: `config` is not a dataclass instance, or the metadata is
            not JSON-serializable.
        ValueError: A failed write (Orbax's error, naming the file).

    Example:
        >>> import tempfile, jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> model = qj.nnx.QLoRALinear(qj.quantize(jnp.ones((64, 8)), "nf4"), lora=qj.LoraConfig(rank=2, alpha=4),
        ...                            rngs=nnx.Rngs(0))
        >>> config = qj.train.TrainConfig(total_steps=100)
        >>> optimizer = nnx.Optimizer(model, qj.train.make_optimizer(config), wrt=nnx.LoRAParam)
        >>> d = tempfile.mkdtemp()
        >>> qj.checkpoint.save(d, model, optimizer, step=5, data_state={"epoch": 0, "row": 40}, config=config).name
        '5'
        >>> meta = qj.checkpoint.restore(d, model, optimizer, config=config)
        >>> meta.step, meta.data_state, meta.config["total_steps"]
        (5, {'epoch': 0, 'row': 40}, 100)
    """
    fields = None if config is None else _config_fields(config)
    directory = Path(directory).absolute()
    items = {name: ocp.args.StandardSave(_split_keys(nnx.to_pure_dict(state)))
             for name, state in _parts(model, optimizer, include_base).items()}
    items["extra"] = ocp.args.JsonSave({
        "extra": extra or {}, "data_state": data_state,
        "config": fields,
        "include_base": include_base, "optimizer": optimizer is not None, "parts": sorted(items)})
    # cleanup_tmp_directories: Orbax removes the temporary directories of saves that were killed before they could
    # clean up (a process cannot clean up after SIGKILL); the except clause below removes this save's own.
    earlier = set(_temporaries(directory, step))
    final = directory / str(int(step))
    # A complete step of the same number is moved aside (a name Orbax does not read as a step) and removed once the
    # new one is complete; a failed save puts it back.
    replaced = final.with_name(f".replaced-{int(step)}-{uuid.uuid4().hex}") if final.is_dir() else None
    if replaced is not None:
        os.replace(final, replaced)
    try:
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
                cleanup_tmp_directories=True)) as manager:
            manager.save(int(step), args=ocp.args.Composite(**items), force=True)
            manager.wait_until_finished()
        _write_manifest(final)
    except BaseException:
        for path in _temporaries(directory, step):
            if path not in earlier:
                shutil.rmtree(path, ignore_errors=True)
        if replaced is not None:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(replaced, final)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def _files(step_dir: Path) -> dict[str, Path]:
    """The files of a step's directory but its manifest, by their path relative to it."""
    return {p.relative_to(step_dir).as_posix(): p for p in sorted(step_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(step_dir: Path) -> None:
    """Writes the step's manifest (size and SHA-256 of each file), atomically: all of it or none."""
    manifest = {name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for name, p in _files(step_dir).items()}
    tmp = step_dir / f".{MANIFEST}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, step_dir / MANIFEST)


def _check_manifest(step_dir: Path) -> None:
    """Raises `DamagedCheckpoint` naming the first file that differs from the step's manifest.

    A step without a manifest (written by an earlier version, or killed
    between Orbax's final rename and the manifest) is not checked.
    """
    path = step_dir / MANIFEST
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(f"{path}: unreadable manifest ({e})") from e
    files = _files(step_dir)
    for name, expected in manifest.items():
        file = step_dir / name
        if name not in files:
            raise DamagedCheckpoint(f"{file}: missing")
        size = files[name].stat().st_size
        if size != expected["bytes"]:
            raise DamagedCheckpoint(f"{file}: {size} bytes, {expected['bytes']} when saved")
        if _sha256(files[name]) != expected["sha256"]:
            raise DamagedCheckpoint(f"{file}: contents changed since it was saved (SHA-256 differs)")


class DamagedCheckpoint(ValueError):
    """A checkpoint file differs from what was saved (truncated, changed or missing); the message names it.

    Example:
        >>> import qlora_jax as qj
        >>> issubclass(qj.checkpoint.DamagedCheckpoint, ValueError)
        True
    """


class DamagedCheckpointWarning(UserWarning):
    """`restore` skipped a damaged latest checkpoint and restored an earlier one; the message names the file.

    Turn it into an error (`warnings.simplefilter("error", DamagedCheckpointWarning)`)
    to refuse falling back instead.

    Example:
        >>> import qlora_jax as qj
        >>> issubclass(qj.checkpoint.DamagedCheckpointWarning, UserWarning)
        True
    """


def _temporaries(directory: Path, step: int) -> list[Path]:
    """Orbax's temporary directories of `step` in `directory` (`<step>.orbax-checkpoint-tmp[-<time>]`)."""
    prefix = f"{int(step)}{ocp.utils.TMP_DIR_SUFFIX}"
    return [p for p in directory.glob(f"{prefix}*") if p.name == prefix or p.name.startswith(f"{prefix}-")] \
        if directory.is_dir() else []


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


def metadata(directory: str | os.PathLike, *, step: int | None = None) -> CheckpointMetadata:
    """Reads a checkpoint's step, `extra`, data state and config, without a model.

    Args:
        directory: The run's checkpoint directory.
        step: The step to read; default the latest complete one.

    Returns:
        A `CheckpointMetadata`.

    Raises:
        FileNotFoundError: No complete checkpoint in `directory`.
        DamagedCheckpoint: (a ValueError) a file of the step differs from
            its manifest (named).

    Example:
        >>> import tempfile, jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> model = qj.nnx.QLoRALinear(qj.quantize(jnp.ones((64, 8)), "nf4"), lora=qj.LoraConfig(rank=2, alpha=4),
        ...                            rngs=nnx.Rngs(0))
        >>> d = tempfile.mkdtemp()
        >>> _ = qj.checkpoint.save(d, model, step=7, extra={"note": "warm start"}, data_state=[3, 1])
        >>> meta = qj.checkpoint.metadata(d)
        >>> meta.step, meta.extra, meta.data_state, meta.config, meta.has_optimizer
        (7, {'note': 'warm start'}, [3, 1], None, False)
    """
    directory = Path(directory).absolute()
    step = _step(directory, step)
    _check_manifest(directory / str(step))
    with ocp.CheckpointManager(directory) as manager:
        return _metadata(step, _read_json(manager, step, directory / str(step)))


def restore(
    directory: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    step: int | None = None,
    config: Any = None,
) -> CheckpointMetadata:
    """Restores a checkpoint into `model` (and `optimizer`) in place and returns its metadata.

    Build the model and optimizer exactly as for the original run (same base
    weights, `apply_qlora` and optimizer), restore, then continue from batch
    `step` with the returned `data_state`. Arrays are placed with the
    shardings of the current model's variables, so a checkpoint saved on one
    mesh restores on another.

    Args:
        directory: The run's checkpoint directory.
        model: The model to fill.
        optimizer: The optimizer to fill, or None. The model's variables it
            trains (its `wrt`) are restored; without it, the adapters.
        step: The step to restore; default the latest intact one: a latest
            step whose files differ from its manifest (truncated or changed
            since it was saved) is skipped with a warning naming the file,
            and the step before it is restored.
        config: The continuing run's config (e.g. `TrainConfig`), compared
            field by field with the saved one before anything is restored
            (fields the saved config lacks, added later, are not compared);
            None: no check.

    Returns:
        The `CheckpointMetadata` of the restored step.

    Raises:
        FileNotFoundError: No complete checkpoint in `directory`, or (without
            `step`) none that is intact (the damaged files are named).
        DamagedCheckpoint: (a ValueError) the given `step` is damaged.
        ValueError: `config` differs from the saved config (the fields are
            named), the checkpoint lacks optimizer state that was asked for,
            or its arrays do not fit the model (names the variable).

    Example:
        >>> import tempfile, warnings, jax.numpy as jnp, qlora_jax as qj
        >>> from pathlib import Path
        >>> from flax import nnx
        >>> model = qj.nnx.QLoRALinear(qj.quantize(jnp.ones((64, 8)), "nf4"), lora=qj.LoraConfig(rank=2, alpha=4),
        ...                            rngs=nnx.Rngs(0))
        >>> d = Path(tempfile.mkdtemp())
        >>> for step in (1, 2):
        ...     _ = qj.checkpoint.save(d, model, step=step)
        >>> data = next(p for p in sorted((d / "2" / "adapters").rglob("*")) if p.is_file() and p.stat().st_size)
        >>> _ = data.write_bytes(data.read_bytes()[:-1])  # step 2 damaged after it was saved
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     qj.checkpoint.restore(d, model).step
        1
        >>> "damaged" in str(caught[0].message) and str(data) in str(caught[0].message)
        True
    """
    directory = Path(directory).absolute()
    if step is not None:
        return _restore(directory, int(step), model, optimizer, config)
    steps = _complete_steps(directory)
    if not steps:
        raise FileNotFoundError(f"{directory}: no complete checkpoint")
    damaged = []
    for candidate in steps:
        try:
            meta = _restore(directory, candidate, model, optimizer, config)
        except DamagedCheckpoint as e:  # raised before anything is restored
            damaged.append(f"step {candidate}: {e}")
            continue
        if damaged:
            warnings.warn(f"skipped damaged checkpoint {'; '.join(damaged)}; restored step {candidate}",
                          DamagedCheckpointWarning, stacklevel=2)
        return meta
    raise FileNotFoundError(f"{directory}: no intact checkpoint; {'; '.join(damaged)}")


def _complete_steps(directory: Path) -> list[int]:
    """The complete steps in `directory`, latest first."""
    if not directory.is_dir():
        return []
    with ocp.CheckpointManager(directory) as manager:
        return sorted(manager.all_steps(), reverse=True)


def _restore(directory: Path, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None,
             config: Any) -> CheckpointMetadata:
    """Restores `step` (see `restore`); checks its manifest and config before anything changes."""
    where = directory / str(step)
    if not where.is_dir():
        raise FileNotFoundError(f"{where}: no such checkpoint")
    _check_manifest(where)
    with ocp.CheckpointManager(directory) as manager:
        raw = _read_json(manager, step, where)
        meta = _metadata(step, raw)
        if config is not None:
            _check_config(where, meta.config, config)
        if optimizer is not None and not meta.has_optimizer:
            raise ValueError(f"{where}: saved without optimizer state")
        parts = _parts(model, optimizer, meta.include_base)
        if not set(parts) <= set(raw["parts"]):
            raise ValueError(f"{where}: holds {raw['parts']}, this model and optimizer have {sorted(parts)}")
        targets = {name: _split_keys(nnx.to_pure_dict(state)) for name, state in parts.items()}
        abstract = {name: jax.tree.map(_abstract, t) for name, t in targets.items()}
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(a) for name, a in abstract.items()}))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{where}: does not fit this model: {e}") from e
    for name, state in parts.items():
        leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
        new = jax.tree.leaves(restored[name])
        if len(new) != len(leaves):
            raise ValueError(f"{where}: {name} has {len(new)} arrays, the model {len(leaves)}")
        fixed = [jax.random.wrap_key_data(n, impl=jax.random.key_impl(o)) if _is_key(o) else n
                 for o, n in zip(leaves, new, strict=True)]
        nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, fixed))
        nnx.update(optimizer if name == "optimizer" else model, state)
    return meta


def _step(directory: Path, step: int | None) -> int:
    """`step`, or the latest complete one; FileNotFoundError when there is none."""
    step = latest_step(directory) if step is None else int(step)
    if step is None:
        raise FileNotFoundError(f"{directory}: no complete checkpoint")
    return step


def _read_json(manager: ocp.CheckpointManager, step: int, where: Path) -> dict[str, Any]:
    """The step's JSON item, as `save` wrote it; `DamagedCheckpoint` when it cannot be parsed."""
    try:
        return manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
    except json.JSONDecodeError as e:
        raise DamagedCheckpoint(f"{where}: unreadable metadata ({e})") from e


def _metadata(step: int, meta: dict[str, Any]) -> CheckpointMetadata:
    return CheckpointMetadata(step=step, extra=meta["extra"], data_state=meta.get("data_state"),
                              config=meta.get("config"), include_base=meta["include_base"],
                              has_optimizer=meta["optimizer"])


def _check_config(where: Path, saved: dict[str, Any] | None, config: Any) -> None:
    """Raises ValueError naming the fields where `config` differs from the `saved` fields."""
    fields = _config_fields(config)
    if saved is None:
        return
    # Fields added to the config after the checkpoint was written (e.g. TrainConfig.loss_chunk) are not compared.
    given = {k: v for k, v in fields.items() if k in saved}
    if saved != given:
        diff = {k: (saved.get(k), v) for k, v in given.items() if saved.get(k) != v}
        raise ValueError(f"{where}: saved with a different {type(config).__name__}; (saved, given): {diff}. "
                         "Pass config=None to restore anyway")


def _config_fields(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass instance (e.g. `TrainConfig`), as saved and compared."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config: expected a dataclass instance such as TrainConfig, got {type(config).__name__}")
    return dataclasses.asdict(config)


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x

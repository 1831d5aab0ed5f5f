"""Sharding rules for QLoRA models over a device mesh: FSDP, tensor parallelism, data parallelism.

Every variable gets a `PartitionSpec` from logical axis names, in the style
of Flax's logical axis rules: a kernel's role (`q_proj` reads the "embed"
axis and writes the "heads" axis, `down_proj` reads "mlp" and writes
"embed", ...) names its axes, and a strategy maps logical names to mesh axes:

* "fsdp": `{"embed": "fsdp"}`: every kernel is split along its model-width
  axis (the input axis of q/k/v/gate/up and of the head, the output axis of
  o/down, the width of the embedding table);
* "tp": `{"heads": "tensor", "mlp": "tensor", "vocab": "tensor"}`: Megatron
  column splits for q/k/v/gate/up (output axis), row splits for o/down
  (input axis), the vocabulary axis of the embedding and the head;
* "fsdp+tp": both; or a dict of your own rules.

A packed `QuantizedArray` is split on the axes of the logical kernel it
stores: its codes and block scales (`[*layers, out, in // 2]`,
`[*layers, out, in // block]`) take the same spec, and an input-axis split
must cut whole blocks, so a block never straddles devices; the second-level
scales of double quantization (1/16384 of the weights) stay replicated. A
kernel in flat layout (input size not a multiple of the block size, blocks
crossing rows as bitsandbytes stores them) is split along its flat axis of
whole blocks where the mesh axes divide its block count, else replicated.
LoRA A (`[in, r]`) follows its base layer's input axis, B (`[r, out]`) its
output axis; the optimizer state follows the adapters; stacked layer axes
and norms are replicated. Batches are split over the mesh's "data" and
"fsdp" axes (FSDP is data-parallel over the batch).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qlora_jax._src.formats.qarray import QuantizedArray

_logger = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "BATCH_AXES", "partition_specs", "shard_model", "shard_batch",
           "batch_sharding", "make_mesh"]

STRATEGIES: dict[str, dict[str, str]] = {
    "fsdp": {"embed": "fsdp"},
    "tp": {"heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
    "fsdp+tp": {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
}

# Mesh axes the batch dimension is split over (those the mesh has).
BATCH_AXES = ("data", "fsdp")


def make_mesh(axes: Mapping[str, int] | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` from axis sizes, e.g. `{"data": 2, "tensor": 4}` or the CLI form `"data=2,tensor=4"`.

    Args:
        axes: Axis names and sizes; their product must equal the number of devices.
        devices: The devices (default all, `jax.devices()`, across processes).

    Raises:
        ValueError: A malformed string or sizes that do not multiply to the device count.

    Example:
        >>> import jax
        >>> make_mesh(f"data={len(jax.devices())}").shape["data"] == len(jax.devices())
        True
    """
    if isinstance(axes, str):
        parsed = {}
        for part in filter(None, axes.split(",")):
            name, _, size = part.partition("=")
            if not name.strip() or not size.strip().isdigit() or int(size) < 1:
                raise ValueError(f"--mesh: expected name=size[,name=size...], got {axes!r}")
            parsed[name.strip()] = int(size)
        axes = parsed
    devices = list(jax.devices() if devices is None else devices)
    if not axes or int(np.prod(list(axes.values()))) != len(devices):
        raise ValueError(f"mesh {dict(axes)}: the axis sizes multiply to {int(np.prod(list(axes.values())))}, "
                         f"but there are {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(tuple(axes.values())), tuple(axes))


def _rules(mesh: Mesh, strategy: str | Mapping[str, str | None]) -> dict[str, str | None]:
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: {strategy!r} is not one of {sorted(STRATEGIES)} (or pass a dict of "
                             "logical axis -> mesh axis rules)")
        # A preset names the mesh axes it can use; those the mesh lacks are left unsharded (e.g. "fsdp" on a
        # mesh with only a "data" axis is plain data parallelism).
        return {k: a for k, a in STRATEGIES[strategy].items() if a in mesh.shape and mesh.shape[a] > 1}
    for logical, axis in strategy.items():
        if axis is not None and axis not in mesh.shape:
            raise ValueError(f"strategy: rule {logical!r} -> {axis!r} names a mesh axis the mesh does not have "
                             f"(mesh axes: {dict(mesh.shape)})")
    return {logical: axis for logical, axis in strategy.items() if axis is not None and mesh.shape[axis] > 1}


def _logical(path: tuple[str, ...], axes: Mapping[str, tuple[str | None, str | None]]) -> tuple | None:
    """(in, out) logical axes of the layer that holds `path`, from the innermost matching path element.

    A stored adapter `<layer>/frozen_adapters/<name>/lora_a` is the layer's own (its name is no layer's name), so
    it gets the rules of the active `<layer>/lora_a`.
    """
    if "frozen_adapters" in path[:-2]:
        i = path.index("frozen_adapters")
        path = path[:i] + path[i + 2:]
    for name in reversed(path[:-1]):
        for pattern, logical in axes.items():
            if re.fullmatch(pattern, name):
                return logical
    return None


def _fit(path: str, what: str, size: int, axis: str | None, mesh: Mesh, notes: list[str], unit: int = 1
         ) -> str | None:
    """`axis` if its size divides `size` (in whole `unit`s), else None: that dimension stays whole (noted)."""
    if axis is None or size % (mesh.shape[axis] * unit) == 0:
        return axis
    detail = f"{size // unit} blocks of {unit}" if unit > 1 else f"size {size}"
    notes.append(f"{path}: {what} ({detail}) not split over {axis!r} of size {mesh.shape[axis]}")
    return None


def _kernel_axes(path: str, n_in: int, n_out: int, lin: str | None, lout: str | None, mesh: Mesh,
                 notes: list[str], unit: int = 1) -> tuple[str | None, str | None]:
    """The mesh axes of a kernel's (input, output) dimensions: the rule's, where they divide them.

    An input axis that the mesh axis does not divide (for packed codes: their
    number of blocks) is split over that mesh axis on the output dimension
    instead, where the output has none and is divisible; otherwise that
    dimension stays whole. Every such change is noted.
    """
    fin = _fit(path, "input axis", n_in, lin, mesh, notes, unit)
    fout = _fit(path, "output axis", n_out, lout, mesh, notes)
    if lin is not None and fin is None and fout is None and lin != lout and n_out % mesh.shape[lin] == 0:
        notes[-1] += f"; split on its output axis ({n_out}) instead"
        fout = lin
    return fin, fout


def _leaf_specs(path: tuple[str, ...], value: Any, rules: dict[str, str | None],
                axes: Mapping[str, tuple[str | None, str | None]], mesh: Mesh, notes: list[str]) -> Any:
    name = "/".join(path)
    logical = _logical(path, axes)
    if logical is None or path[-1] not in ("kernel", "embedding", "lora_a", "lora_b", "lora_magnitude_vector",
                                           "bias"):
        return jax.tree.map(lambda x: PartitionSpec(), value)
    lin, lout = (rules.get(a) if a is not None else None for a in logical)
    if path[-1] == "embedding":  # [vocab, embed]: the table's (in, out) axes as named
        vocab, embed = _kernel_axes(name, value.shape[-2], value.shape[-1], lin, lout, mesh, notes)
        return PartitionSpec(*[None] * (value.ndim - 2), vocab, embed)
    if isinstance(value, QuantizedArray):
        if not value.row_layout:
            return _flat_specs(value, (lout, lin), mesh)
        if len(value.shape) != 2:
            if lin is None and lout is None:
                return jax.tree.map(lambda x: PartitionSpec(), value)
            notes.append(f"{name}: a {len(value.shape)}-D packed kernel {value.shape} is kept whole")
            return jax.tree.map(lambda x: PartitionSpec(), value)
        n_in, n_out = value.shape
        lin, lout = _kernel_axes(name, n_in, n_out, lin, lout, mesh, notes, unit=value.block_size)
        stack = [None] * len(value.stack_shape)
        spec = PartitionSpec(*stack, lout, lin)  # codes [*stack, out, in // 2], absmax [*stack, out, in // block]

        def leaf_spec(key_path: tuple, leaf: Any) -> PartitionSpec:
            return spec if key_path[-1].name in ("codes", "absmax") else PartitionSpec()  # nested: replicated

        return jax.tree_util.tree_map_with_path(leaf_spec, value)
    if path[-1] == "lora_a":  # [*stack, in, r]
        return PartitionSpec(*[None] * (value.ndim - 2), _fit(name, "input axis", value.shape[-2], lin, mesh, notes),
                             None)
    if path[-1] in ("lora_b", "lora_magnitude_vector", "bias"):  # [*stack, r, out]; magnitude, bias [*stack, out]
        return PartitionSpec(*[None] * (value.ndim - 1), _fit(name, "output axis", value.shape[-1], lout, mesh,
                                                              notes))
    # A float kernel [*stack, in, out].
    lin, lout = _kernel_axes(name, value.shape[-2], value.shape[-1], lin, lout, mesh, notes)
    return PartitionSpec(*[None] * (value.ndim - 2), lin, lout)


def _flat_specs(value: QuantizedArray, mesh_axes: tuple[str | None, ...], mesh: Mesh) -> Any:
    """Specs of a kernel in flat layout (input size not a multiple of the block size; blocks cross rows).

    Its codes `[*stack, ceil(size / 2)]` and scales `[*stack, n_blocks]` are split along their one flat axis over
    the mesh axes of its output and input axes together, else over the larger one of them that fits, so that each
    device holds whole blocks and their scales: the split must cut `n_blocks` evenly, and a kernel whose last
    block is partial (`size % block_size`) has codes that cannot be cut on block boundaries. Where no split fits,
    the kernel stays replicated (a flat kernel is never refused); its nested scales are always replicated.
    """
    axes = tuple(dict.fromkeys(a for a in mesh_axes if a is not None))
    candidates = ([axes] if len(axes) > 1 else []) + sorted(((a,) for a in axes), key=lambda c: -mesh.shape[c[0]])
    split = None
    if value.size % value.block_size == 0:
        split = next((c for c in candidates if value.n_blocks % int(np.prod([mesh.shape[a] for a in c])) == 0),
                     None)
    if split is None:
        return jax.tree.map(lambda x: PartitionSpec(), value)
    spec = PartitionSpec(*[None] * len(value.stack_shape), split if len(split) > 1 else split[0])

    def leaf_spec(key_path: tuple, leaf: Any) -> PartitionSpec:
        return spec if key_path[-1].name in ("codes", "absmax") else PartitionSpec()

    return jax.tree_util.tree_map_with_path(leaf_spec, value)


def partition_specs(
    model: nnx.Module,
    mesh: Mesh,
    strategy: str | Mapping[str, str | None] = "fsdp",
    *,
    axes: Mapping[str, tuple[str | None, str | None]] | None = None,
) -> nnx.State:
    """The `PartitionSpec` of every array of `model`'s state (an `nnx.State` of specs, same structure).

    Args:
        model: An NNX model (e.g. `qj.models.CausalLM` after `apply_qlora`).
        mesh: The device mesh.
        strategy: "fsdp", "tp", "fsdp+tp" (see `STRATEGIES`), or rules
            `{logical axis: mesh axis or None}`.
        axes: Logical `(input, output)` axes of kernels by layer name (a regex
            on a path element, e.g. `qj.models.LLAMA_AXES`); default the
            model's own `logical_axes` (the models of `qj.models` have them).

    A mesh axis whose size does not divide the dimension the strategy
    splits with it (for a packed input axis: the number of blocks, which a
    split must keep whole) never fails: a kernel's input axis is then split
    on its output dimension where that fits, else the dimension stays whole;
    one warning (logger `qlora_jax._src.sharding`) names each such variable.

    Raises:
        ValueError: An unknown strategy or mesh axis; no `axes` for a model
            without `logical_axes`.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> class Block(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.up_proj = nnx.Linear(128, 256, rngs=rngs)
        >>> block = qj.apply_qlora(Block(nnx.Rngs(0)), quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=4),
        ...                        rngs=nnx.Rngs(1))
        >>> mesh = qj.make_mesh({"fsdp": 1, "tensor": len(jax.devices())})
        >>> specs = qj.partition_specs(block, mesh, "tp", axes=qj.models.LLAMA_AXES)
        >>> specs["up_proj"]["lora_b"].get_value() == jax.sharding.PartitionSpec(None, "tensor")
        True
    """
    rules = _rules(mesh, strategy)
    axes = _model_axes(model, axes)
    state = nnx.state(model)
    notes: list[str] = []

    def spec(path: tuple, variable: Any) -> Any:
        names = tuple(str(p) for p in path)
        return variable.replace(_leaf_specs(names, variable.get_value(), rules, axes, mesh, notes))

    specs = _map_state(spec, state)
    if notes:
        _logger.warning("sharding: %d of the strategy's splits do not fit the mesh; those dimensions are split "
                        "otherwise or kept whole: %s", len(notes), "; ".join(notes))
    return specs


def _model_axes(model: nnx.Module, axes: Mapping[str, tuple[str | None, str | None]] | None
                ) -> Mapping[str, tuple[str | None, str | None]]:
    if axes is not None:
        return axes
    axes = getattr(type(model), "logical_axes", None)
    if axes is None:
        raise ValueError(f"axes: {type(model).__name__} has no `logical_axes`; pass the logical axes of its kernels by "
                         "layer name, e.g. axes=qj.models.LLAMA_AXES for q_proj/k_proj/.../down_proj names")
    return axes


def _map_state(fn: Any, state: nnx.State) -> nnx.State:
    flat = nnx.to_flat_state(state)
    return nnx.from_flat_state([(path, fn(path, v)) for path, v in flat])


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` placed with `sharding`, also when the mesh spans processes (each provides its addressable shards)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _shard_tree(tree: Any, specs: Any, mesh: Mesh) -> Any:
    is_spec = lambda s: isinstance(s, PartitionSpec)  # noqa: E731
    return jax.tree.map(lambda s, x: _put(x, NamedSharding(mesh, s)), specs, tree, is_leaf=is_spec)


def _optimizer_specs(optimizer: nnx.Optimizer, model_specs: nnx.State) -> nnx.State:
    """Specs for the optimizer state: a leaf whose path ends with an adapter's path takes its spec."""
    by_path = {tuple(str(p) for p in path): v.get_value() for path, v in nnx.to_flat_state(model_specs)}

    def spec(path: tuple, variable: Any) -> Any:
        names = tuple(str(p) for p in path)
        for i in range(len(names)):
            if names[i:] in by_path:
                return variable.replace(by_path[names[i:]])
        return variable.replace(jax.tree.map(lambda x: PartitionSpec(), variable.get_value()))

    return _map_state(spec, nnx.state(optimizer))


def shard_model(
    model: nnx.Module,
    mesh: Mesh,
    strategy: str | Mapping[str, str | None] = "fsdp",
    *,
    optimizer: nnx.Optimizer | None = None,
    axes: Mapping[str, tuple[str | None, str | None]] | None = None,
) -> nnx.Module:
    """Places every array of `model` (and `optimizer`) on `mesh` by `partition_specs`, in place.

    Jitted steps on the sharded model run under GSPMD: each device holds its
    shard of the packed codes, scales and adapters; shard batches with
    `shard_batch`. Sharding after `qj.train.Trainer(model, ...)` needs its
    optimizer: `shard_model(trainer.model, mesh, optimizer=trainer.optimizer)`.

    Args:
        model: The model.
        mesh: The device mesh (may span processes after `jax.distributed.initialize`).
        strategy: "fsdp", "tp", "fsdp+tp" or rules (see `partition_specs`).
        optimizer: An `nnx.Optimizer` over the model's adapters: its moments
            follow their adapters, its counts are replicated.
        axes: Logical axes of kernels by layer name (see `partition_specs`);
            default the model's own `logical_axes`.

    Returns:
        `model`.

    Example:
        >>> import jax, qlora_jax as qj
        >>> from flax import nnx
        >>> from qlora_jax.models import CausalLM, ModelConfig
        >>> cfg = ModelConfig(vocab_size=128, hidden_size=1024, intermediate_size=256, num_layers=1, num_heads=8,
        ...                   num_kv_heads=8)
        >>> model = qj.apply_qlora(CausalLM(cfg, rngs=nnx.Rngs(0)), quant=qj.QuantConfig(),
        ...                        lora=qj.LoraConfig(rank=4), rngs=nnx.Rngs(1))
        >>> model = qj.shard_model(model, qj.make_mesh({"fsdp": len(jax.devices())}))  # CausalLM.logical_axes
        >>> codes = model.layers.mlp.up_proj.kernel.get_value().codes  # [layers, out, in // 2]: split along in
        >>> codes.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
        True
    """
    specs = partition_specs(model, mesh, strategy, axes=axes)
    if optimizer is not None:
        nnx.update(optimizer, _shard_tree(nnx.state(optimizer), _optimizer_specs(optimizer, specs), mesh))
    nnx.update(model, _shard_tree(nnx.state(model), specs, mesh))
    return model


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """The sharding of a `[batch, seq, ...]` array: batch over the mesh's "data" and "fsdp" axes.

    Example:
        >>> import jax
        >>> batch_sharding(make_mesh({"data": len(jax.devices())})).spec == PartitionSpec("data", None)
        True
    """
    split = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(split or None, *[None] * (ndim - 1)))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a global batch (the same NumPy arrays on every process) with `batch_sharding`.

    Raises:
        ValueError: The batch size is not divisible by the data-parallel size (names the key).

    Example:
        >>> import jax, numpy as np
        >>> mesh = make_mesh({"data": len(jax.devices())})
        >>> ids = np.zeros((2 * len(jax.devices()), 4), np.int32)
        >>> shard_batch({"input_ids": ids}, mesh)["input_ids"].sharding.spec == PartitionSpec("data", None)
        True
    """
    out = {}
    for key, value in batch.items():
        sharding = batch_sharding(mesh, np.ndim(value))
        n = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
        if np.shape(value)[0] % n:
            raise ValueError(f"batch[{key!r}]: batch size {np.shape(value)[0]} is not divisible by the "
                             f"data-parallel size {n} (mesh axes {[a for a in BATCH_AXES if a in mesh.shape]})")
        out[key] = _put(value, sharding)
    return out

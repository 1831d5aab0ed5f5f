"""Several named adapters on one model: `set_adapter`, `active_adapter`, `adapter_names`, `delete_adapter`.

Every adapter layer (`QLoRALinear`, `QLoRALinearGeneral`, `QLoRAEinsum`)
holds its **active** adapter in `lora_a` / `lora_b` (and DoRA's
`lora_magnitude_vector`), `nnx.LoRAParam`, named by the layer's
`adapter_name` (PEFT's `"default"` unless switched). The other adapters
loaded by name (`load_peft_adapter(model, dir, adapter_name=...)`) wait in
the layer's `frozen_adapters[name]` as `FrozenAdapter` variables with the same
shapes (stack dimensions included), which are not `nnx.LoRAParam`: an
optimizer over `wrt=nnx.LoRAParam` trains the active adapter only, and the
forward pass computes with the active adapter only. `set_adapter` swaps
values between the trainable slot and the stored adapter in every layer, so
the state paths of the active adapter never change (checkpoints, sharding
rules and PEFT export read `lora_a` / `lora_b`).
"""

from __future__ import annotations

from flax import nnx

from qlora_jax._src.nn.adapter import AdapterMixin
from qlora_jax._src.nn.variables import FrozenAdapter

__all__ = ["active_adapter", "adapter_names", "delete_adapter", "set_adapter", "stash_adapter"]

_SLOTS = ("lora_a", "lora_b", "lora_magnitude_vector")


def _layers(model: nnx.Module) -> list[tuple[str, AdapterMixin]]:
    """(path, layer) of every adapter layer, each once; ValueError if there is none."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}")
    found = [("/".join(str(p) for p in path) or "<model>", m) for path, m in nnx.iter_modules(model)
             if isinstance(m, AdapterMixin)]
    if not found:
        raise ValueError("model: has no adapter layers (QLoRALinear, QLoRALinearGeneral, QLoRAEinsum)")
    return found


def _stored(layer: AdapterMixin) -> dict:
    return getattr(layer, "frozen_adapters", None) or {}


def active_adapter(model: nnx.Module) -> str:
    """The name of the active (trainable) adapter of the model's adapter layers.

    Raises:
        ValueError: No adapter layer, or layers whose active adapters differ (named).

    Example:
        >>> import qlora_jax as qj
        >>> qj.active_adapter(model)
        'default'
    """
    names = {layer.adapter_name: path for path, layer in _layers(model)}
    if len(names) > 1:
        raise ValueError(f"model: its layers have different active adapters: {names}")
    return next(iter(names))


def adapter_names(model: nnx.Module) -> list[str]:
    """The names of the adapters every adapter layer holds, the active one first, then the stored ones sorted.

    Example:
        >>> import qlora_jax as qj
        >>> qj.adapter_names(model)
        ['default']
    """
    active = active_adapter(model)
    names = None
    for _, layer in _layers(model):
        here = set(_stored(layer))
        names = here if names is None else names & here
    return [active, *sorted(names)]


def set_adapter(model: nnx.Module, adapter_name: str) -> str:
    """Makes `adapter_name` the active, trainable adapter of every adapter layer, in place.

    The active adapter's values move to `frozen_adapters[<its name>]`
    (`FrozenAdapter`) and the chosen adapter's values into `lora_a` /
    `lora_b` (`nnx.LoRAParam`): arrays are moved, not copied or recomputed, so
    switching back and forth is exact. An optimizer's state (e.g. Adam's
    moments) belongs to the adapter it was trained with: make a new
    `nnx.Optimizer` after switching.

    Args:
        model: An NNX model with adapter layers.
        adapter_name: A loaded adapter (see `adapter_names`).

    Returns:
        The name of the adapter that was active before.

    Raises:
        ValueError: No adapter layer, or a layer without `adapter_name`
            (named); nothing is changed then.

    Example:
        (`model`: a tiny Llama in NF4 with rank-4 adapters, zero B; `adapter_dir`: a PEFT adapter for it.)

        >>> import qlora_jax as qj
        >>> from qlora_jax.models import adapter_layers, load_peft_adapter
        >>> q_proj = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
        >>> _ = load_peft_adapter(model, adapter_dir, adapter_name="b")  # kept frozen; "default" stays active
        >>> qj.adapter_names(model), float(abs(q_proj.lora_b[...]).max())
        (['default', 'b'], 0.0)
        >>> qj.set_adapter(model, "b")  # the previous active adapter
        'default'
        >>> float(abs(q_proj.lora_b[...]).max()) > 0, sorted(q_proj.frozen_adapters)
        (True, ['default'])
        >>> qj.set_adapter(model, "other")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: adapter_name: 'other' is not loaded in ... (it has ['b', 'default']); load it with ...
    """
    layers = _layers(model)
    previous = active_adapter(model)
    for path, layer in layers:
        if adapter_name != layer.adapter_name and adapter_name not in _stored(layer):
            raise ValueError(f"adapter_name: {adapter_name!r} is not loaded in {path} (it has "
                             f"{[layer.adapter_name, *sorted(_stored(layer))]}); load it with "
                             "load_peft_adapter(model, directory, adapter_name=...)")
    for _, layer in layers:
        if layer.adapter_name == adapter_name:
            continue
        chosen = layer.frozen_adapters.pop(adapter_name)
        stash_adapter(layer, layer.adapter_name)
        for slot in _SLOTS:
            if slot in chosen:
                getattr(layer, slot).set_value(chosen[slot].get_value())
        layer.adapter_name = adapter_name
    return previous


def stash_adapter(layer: AdapterMixin, adapter_name: str) -> None:
    """Stores a copy of `layer`'s active adapter (references to its arrays) as `frozen_adapters[adapter_name]`.

    Example:
        >>> import jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> from qlora_jax.nnx import QLoRALinear
        >>> layer = QLoRALinear(jnp.ones((8, 4)), lora=qj.LoraConfig(rank=2), rngs=nnx.Rngs(0))
        >>> stash_adapter(layer, "copy")
        >>> sorted(layer.frozen_adapters["copy"])
        ['lora_a', 'lora_b']
    """
    entry = {slot: FrozenAdapter(getattr(layer, slot).get_value()) for slot in _SLOTS
             if getattr(layer, slot, None) is not None}
    if getattr(layer, "frozen_adapters", None) is None:
        layer.frozen_adapters = nnx.data({})
    layer.frozen_adapters[adapter_name] = entry


def delete_adapter(model: nnx.Module, adapter_name: str) -> nnx.Module:
    """Removes a stored (not active) adapter from every adapter layer, in place.

    Raises:
        ValueError: `adapter_name` is the active adapter (switch with
            `set_adapter` first) or not loaded.

    Example:
        >>> import qlora_jax as qj
        >>> qj.delete_adapter(model, "default")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: adapter_name: 'default' is the active adapter; set_adapter(model, <another>) first...
    """
    layers = _layers(model)
    if adapter_name == active_adapter(model):
        raise ValueError(f"adapter_name: {adapter_name!r} is the active adapter; set_adapter(model, <another>) "
                         "first")
    if adapter_name not in adapter_names(model):
        raise ValueError(f"adapter_name: {adapter_name!r} is not loaded (loaded: {adapter_names(model)})")
    for _, layer in layers:
        del layer.frozen_adapters[adapter_name]
    return model

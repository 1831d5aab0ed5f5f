"""PEFT adapters in and out: `save_peft_adapter`, `load_peft_adapter`.

The saved directory is exactly what `peft` writes for a LoRA model
(`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<HF module path>.lora_A.weight` `(r, in)` and `lora_B.weight`
`(out, r)`; with DoRA also `<HF module path>.lora_magnitude_vector` `(out,)`
and `"use_dora": true`), so `PeftModel.from_pretrained(base, dir)` loads it
over the same base model in PyTorch, and an adapter trained with PEFT loads here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax._src.models.atomic_dir import atomic_directory, write_text
from qlora_jax._src.models.safetensors_io import SafetensorsReader, save_safetensors
from qlora_jax._src.nn.adapter import AdapterMixin
from qlora_jax._src.nn.adapters import active_adapter, adapter_names, set_adapter, stash_adapter
from qlora_jax._src.nn.linear import QLoRALinear

__all__ = ["save_peft_adapter", "load_peft_adapter", "adapter_layers"]

_PREFIX = "base_model.model."
_ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors"})  # what save_peft_adapter writes


def adapter_layers(model: nnx.Module) -> dict[str, QLoRALinear]:
    """The model's adapter layers by Hugging Face module path, one entry per decoder layer.

    A stacked layer `layers/self_attn/q_proj` (adapters `[L, in, r]`) appears as
    `model.layers.{i}.self_attn.q_proj` for each `i`; `lm_head` as `lm_head`.

    Example:
        >>> from flax import nnx
        >>> from qlora_jax.models import CausalLM, ModelConfig
        >>> cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=1,
        ...                   num_kv_heads=1)
        >>> adapter_layers(CausalLM(cfg, rngs=nnx.Rngs(0)))
        {}
    """
    found: dict[str, QLoRALinear] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QLoRALinear):
            names = [str(p) for p in path]
            if names and names[0] == "layers":
                for i in range(node.stack_shape[0] if node.stack_shape else 1):
                    found[".".join(["model", "layers", str(i), *names[1:]])] = node
            elif names == ["lm_head"]:
                found["lm_head"] = node
            else:
                found[".".join(["model", *names])] = node
    return found


def save_peft_adapter(model: nnx.Module, directory: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None, adapter_name: str | None = None) -> Path:
    """Writes the model's LoRA adapters as a PEFT adapter directory.

    Args:
        model: A `CausalLM` with QLoRA/LoRA layers (from `from_pretrained(...,
            lora=...)` or `apply_qlora`).
        directory: Output directory (created). The files are written to a
            temporary sibling directory (`.{name}.tmp-<random>`), fsynced and
            renamed into place when complete, so a write that fails halfway
            leaves the previous adapter there byte for byte and no temporary
            directory behind. An existing directory is replaced only if it is
            empty or holds nothing but `adapter_config.json` and
            `adapter_model.safetensors`; other files in it are refused
            (ValueError), never deleted.
        base_model_name_or_path: Recorded in `adapter_config.json`.
        adapter_name: Which loaded adapter to write (see `adapter_names`);
            None: the active one. The directory holds that adapter alone, as
            PEFT's `save_pretrained(selected_adapters=[name])` writes a
            non-default adapter's files (load it in PEFT under any name).

    Returns:
        The directory.

    Raises:
        ValueError: A model without adapters, adapters whose settings PEFT
            cannot express in one config (mixed dropout, rsLoRA or DoRA), or a
            `directory` holding other files (named).
        OSError: A failed write, naming the file.

    Example:
        >>> import tempfile
        >>> from flax import nnx
        >>> import qlora_jax as qj
        >>> from qlora_jax.models import CausalLM, ModelConfig
        >>> cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=1,
        ...                   num_kv_heads=1)
        >>> model = qj.apply_qlora(CausalLM(cfg, rngs=nnx.Rngs(0)), quant=qj.QuantConfig(),
        ...                        lora=qj.LoraConfig(rank=2, alpha=4), rngs=nnx.Rngs(0))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = save_peft_adapter(model, f"{tmp}/adapter")
        ...     sorted(f.name for f in out.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    if adapter_name is not None and adapter_name != active_adapter(model):
        if adapter_name not in adapter_names(model):
            raise ValueError(f"adapter_name: {adapter_name!r} is not loaded (loaded: {adapter_names(model)})")
        previous = set_adapter(model, adapter_name)  # moves arrays only; switched back below
        try:
            return save_peft_adapter(model, directory, base_model_name_or_path=base_model_name_or_path)
        finally:
            set_adapter(model, previous)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA adapters (QLoRALinear layers) to save")
    nested = sorted(name for name, layer in layers.items() if len(layer.stack_shape) > 1)
    if nested:  # e.g. Mixtral's experts, stacked [layers, experts]: PEFT's LoRA has no module for one expert
        raise ValueError(f"model: adapters on stacked experts ({nested[0]}, stack {layers[nested[0]].stack_shape}) "
                         "have no PEFT form; target the attention projections (q_proj, k_proj, v_proj, o_proj)")
    tensors: dict[str, np.ndarray] = {}
    seen: dict[int, int] = {}
    for name, layer in layers.items():
        index = seen.get(id(layer), 0)
        seen[id(layer)] = index + 1
        a, b = np.asarray(layer.lora_a[...], np.float32), np.asarray(layer.lora_b[...], np.float32)
        if layer.stack_shape:
            a, b = a[index], b[index]
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)  # (r, in)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)  # (out, r)
        if layer.use_dora:  # PEFT's key: no ".weight" (its state dict drops the DoRA layer's parameter name)
            m = np.asarray(layer.lora_magnitude_vector[...], np.float32)
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(m[index] if layer.stack_shape
                                                                                     else m)  # (out,)
    unique = list({id(v): v for v in layers.values()}.values())
    for attr in ("dropout_rate", "rslora", "use_dora", "init"):
        values = {getattr(layer, attr) for layer in unique}
        if len(values) > 1:
            raise ValueError(f"model: adapters differ in {attr} ({sorted(values)}); a PEFT config has one value")
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: layer.alpha for name, layer in layers.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": unique[0].dropout_rate, "use_rslora": unique[0].rslora,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}), "bias": "none",
        "fan_in_fan_out": False, "use_dora": unique[0].use_dora, "inference_mode": True,
        # As PEFT records it: "pissa"/"olora"/"pissa_niter_N" (PEFT computes that init again from the original
        # base it loads the adapter over, and uses the residual), True for LoftQ (PEFT's LoftQ workflow: the adapter
        # applies over the residual base, save_residual_base) and for the plain inits.
        "init_lora_weights": _peft_init(unique[0]),
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
    }
    directory = Path(directory)
    with atomic_directory(directory, owns=_ADAPTER_FILES.__contains__) as tmp:
        save_safetensors(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
        write_text(tmp / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return directory


def _peft_init(layer: Any) -> bool | str:
    init = getattr(layer, "init", "default")
    return True if init in ("default", "loftq") else init


def load_peft_adapter(model: nnx.Module, directory: str | os.PathLike, *,
                      adapter_name: str | None = None) -> nnx.Module:
    """Loads a PEFT LoRA adapter into the model's adapter layers, in place.

    The model must already have adapter layers on the adapter's target modules
    with the same rank (create it with `from_pretrained(..., lora=LoraConfig(
    rank=r, alpha=..., targets=[...]))`). Everything is checked before any
    value is written, so a failure leaves the model unchanged.

    Args:
        model: A `CausalLM` with QLoRA/LoRA layers.
        directory: A directory with `adapter_config.json` and
            `adapter_model.safetensors` (or `adapter_model.bin` is refused).
        adapter_name: None or the active adapter's name (see
            `active_adapter`, "default" at first): load into the active,
            trainable adapter. Another name: load a further adapter, kept
            frozen in every adapter layer's `frozen_adapters[adapter_name]`
            (`FrozenAdapter`) until `set_adapter(model, adapter_name)` makes
            it the active one (PEFT's `load_adapter(dir, adapter_name)`). It
            needs the same rank, alpha, rsLoRA and DoRA settings as the
            layers; layers it does not target get a zero adapter (factors 0,
            DoRA magnitude the weight's norm), which changes nothing.

    Returns:
        The model.

    Raises:
        FileNotFoundError: Missing files.
        ValueError: Not a LoRA adapter, fan_in_fan_out / bias training, DoRA
            (`use_dora`) on one side only,
            target modules without an adapter layer here, or shapes and
            scalings that do not fit (each named), an `adapter_name` that
            is already loaded and not active (`delete_adapter` it first).

    Example:
        (`model`: a tiny Llama loaded in NF4 with rank-4 adapters, `from_pretrained(checkpoint,
        quant=QuantConfig(), lora=LoraConfig(rank=4, alpha=8))`; `adapter_dir`: a PEFT adapter
        saved for it; `tmp`: an empty directory.)

        >>> from qlora_jax.models import adapter_layers, load_peft_adapter
        >>> q_proj = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
        >>> q_proj.lora_b.shape, float(abs(q_proj.lora_b[...]).max())  # [layers, r, out], zero before training
        ((2, 4, 64), 0.0)
        >>> load_peft_adapter(model, adapter_dir) is model  # in place
        True
        >>> float(abs(q_proj.lora_b[...]).max()) > 0
        True
        >>> load_peft_adapter(model, tmp)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: .../adapter_config.json: missing (a PEFT adapter directory has adapter_config.json and ...
    """
    if adapter_name is not None and adapter_name != active_adapter(model):
        return _load_named(model, directory, adapter_name)
    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for f in (config_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (a PEFT adapter directory has adapter_config.json and "
                                    "adapter_model.safetensors)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    for key, ok in (("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise ValueError(f"{config_path}: {key}={config.get(key)!r} is not supported (expected {ok!r})")
    layers = adapter_layers(model)
    reader = SafetensorsReader(weights_path)
    modules = sorted({n[len(_PREFIX):].rsplit(".lora_", 1)[0] for n in reader if n.startswith(_PREFIX)})
    unknown = [m for m in reader if not m.startswith(_PREFIX) or ".lora_" not in m]
    if unknown:
        raise ValueError(f"{weights_path}: tensors that are not LoRA factors: {unknown[:5]}")
    missing = [m for m in modules if m not in layers]
    if missing:
        raise ValueError(f"{directory}: the adapter targets {missing[:5]}{'...' if len(missing) > 5 else ''}, which "
                         f"have no adapter layer in this model; layers with adapters: "
                         f"{sorted(layers)[:8]}{'...' if len(layers) > 8 else ''}")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    dora = bool(config.get("use_dora", False))
    updates: dict[int, tuple[QLoRALinear, np.ndarray, np.ndarray, np.ndarray | None]] = {}
    index: dict[int, int] = {}
    for name, layer in layers.items():
        i = index.get(id(layer), 0)
        index[id(layer)] = i + 1
        if name not in modules:
            continue
        r = rank_pattern.get(name, config.get("r"))
        alpha = alpha_pattern.get(name, config.get("lora_alpha"))
        a = reader.get(f"{_PREFIX}{name}.lora_A.weight")
        b = reader.get(f"{_PREFIX}{name}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{weights_path}: {name} needs both lora_A.weight and lora_B.weight")
        expected_a, expected_b = (layer.rank, layer.in_features), (layer.out_features, layer.rank)
        if a.shape != expected_a or b.shape != expected_b or r != layer.rank:
            raise ValueError(f"{weights_path}: {name}: lora_A {a.shape}, lora_B {b.shape} (r={r}) do not fit the "
                             f"layer's lora_A {expected_a}, lora_B {expected_b}")
        if float(alpha) != layer.alpha or bool(config.get("use_rslora", False)) != layer.rslora:
            raise ValueError(f"{config_path}: {name}: lora_alpha={alpha}, use_rslora={config.get('use_rslora')} "
                             f"differ from the layer's alpha={layer.alpha}, rslora={layer.rslora}")
        if dora != layer.use_dora:
            kind = "a DoRA" if layer.use_dora else "a plain"
            raise ValueError(f"{config_path}: use_dora={dora}, but {name} is {kind} LoRA layer here; create the "
                             f"model with LoraConfig(use_dora={dora})")
        m = reader.get(f"{_PREFIX}{name}.lora_magnitude_vector") if dora else None
        if dora and (m is None or m.shape != (layer.out_features,)):
            raise ValueError(f"{weights_path}: {name}: use_dora needs lora_magnitude_vector of shape "
                             f"({layer.out_features},), found {None if m is None else m.shape}")
        if id(layer) not in updates:
            updates[id(layer)] = (layer, np.array(layer.lora_a[...]), np.array(layer.lora_b[...]),
                                  np.array(layer.lora_magnitude_vector[...]) if dora else None)
        _, new_a, new_b, new_m = updates[id(layer)]
        at = i if layer.stack_shape else ...
        new_a[at], new_b[at] = a.T, b.T
        if dora:
            new_m[at] = m
    for layer, new_a, new_b, new_m in updates.values():
        layer.lora_a[...] = jnp.asarray(new_a, layer.lora_a[...].dtype)
        layer.lora_b[...] = jnp.asarray(new_b, layer.lora_b[...].dtype)
        if new_m is not None:
            layer.lora_magnitude_vector[...] = jnp.asarray(new_m, layer.lora_magnitude_vector[...].dtype)
    return model


def _load_named(model: nnx.Module, directory: str | os.PathLike, adapter_name: str) -> nnx.Module:
    """Loads a further adapter under `adapter_name` into `frozen_adapters`, leaving the active one as it was."""
    if not isinstance(adapter_name, str) or not adapter_name or not adapter_name.isidentifier():
        raise ValueError(f"adapter_name: {adapter_name!r} is not a name (letters, digits and _)")
    if adapter_name in adapter_names(model):
        raise ValueError(f"adapter_name: {adapter_name!r} is already loaded; delete_adapter(model, "
                         f"{adapter_name!r}) first")
    layers = list({id(m): m for _, m in nnx.iter_modules(model) if isinstance(m, AdapterMixin)}.values())
    saved = [(layer, layer.lora_a.get_value(), layer.lora_b.get_value(),
              layer.lora_magnitude_vector.get_value() if layer.use_dora else None) for layer in layers]
    try:
        for layer, a, b, m in saved:  # a zero adapter where the new one has no factors
            layer.lora_a.set_value(jnp.zeros_like(a))
            layer.lora_b.set_value(jnp.zeros_like(b))
            if m is not None:
                layer.lora_magnitude_vector.set_value(layer.dora_weight_norm().astype(m.dtype))
        load_peft_adapter(model, directory)
        for layer in layers:
            stash_adapter(layer, adapter_name)
    except BaseException:
        for layer, *_ in saved:
            layer.frozen_adapters.pop(adapter_name, None)
        raise
    finally:
        for layer, a, b, m in saved:
            layer.lora_a.set_value(a)
            layer.lora_b.set_value(b)
            if m is not None:
                layer.lora_magnitude_vector.set_value(m)
    return model

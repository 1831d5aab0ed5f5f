"""Exporting a PiSSA / OLoRA / LoftQ model for PEFT: its adapter is relative to a modified base.

Those inits move a low-rank part of each targeted weight into the adapter and
keep the residual as the base: `W = W_res + s·B0·A0` (PiSSA, OLoRA; LoftQ:
approximately, with `W_res` quantized). A trained adapter `B·A` therefore only
means something over `W_res`. Two ways to hand it to PEFT:

* **Over the original base** (`save_peft_adapter_over_original`, PEFT's
  `save_pretrained(..., path_initial_model_for_weight_conversion=...)`): since
  `W_res + s·B·A = W + s·(B·A − B0·A0)`, the adapter becomes a plain LoRA
  adapter of rank 2r with `lora_A = [A; A0]`, `lora_B = [B, −B0]` and
  `lora_alpha` doubled (× √2 with rsLoRA, so the scaling is unchanged). It
  applies over the original checkpoint (float, or quantized again by
  bitsandbytes, which then differs from our quantized residual by the
  quantization error, as PEFT warns).
* **Over the residual base** (`save_residual_base`): the base as the model
  stores it (for a quantized base, the dequantized residual `dequant(Q)`),
  written as a Hugging Face checkpoint; the adapter saved by
  `save_peft_adapter` applies to it unchanged. This is what PEFT's LoftQ needs
  (PEFT's own LoftQ flow saves the same two things: the residual model and the
  adapter); loading that checkpoint in 4 bit with bitsandbytes gives back the
  same 4-bit codes (with double quantization, the 8-bit absmax codes are
  computed again and may differ slightly).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax._src.models.atomic_dir import atomic_directory, write_text
from qlora_jax._src.models.export import save_merged
from qlora_jax._src.models.llama import CausalLM
from qlora_jax._src.models.peft_io import adapter_layers, save_peft_adapter
from qlora_jax._src.models.safetensors_io import SafetensorsReader, save_safetensors

__all__ = ["save_peft_adapter_over_original", "save_residual_base"]

_FILES = ("adapter_config.json", "adapter_model.safetensors")


def save_peft_adapter_over_original(
    model: nnx.Module,
    directory: str | os.PathLike,
    *,
    initial_adapter: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes a PiSSA/OLoRA-initialised model's adapter as a plain LoRA adapter over the ORIGINAL base weights.

    PEFT's conversion (`path_initial_model_for_weight_conversion`): with
    `A0, B0` the adapter at initialization (saved then with
    `save_peft_adapter(model, initial_adapter)`), the adapter written is
    `lora_A = [A; A0]` `(2r, in)`, `lora_B = [B, −B0]` `(out, 2r)`, `r` and
    `lora_alpha` doubled (`lora_alpha` × √2 with rsLoRA), so that over the
    original weight `W` it adds `s·(B·A − B0·A0)` and `W + s·(B·A − B0·A0)` is
    what this model computes (`W_res + s·B·A`). Exact for PiSSA and OLoRA on a
    float base; on a quantized base the original `W` replaces the quantized
    residual, which differs by the quantization error (and for LoftQ, whose
    `W_res + s·B0·A0` is only close to `W`, by LoftQ's remaining error): use
    `save_residual_base` there.

    Args:
        model: A `CausalLM` with adapters.
        directory: Output directory, written atomically (see `save_peft_adapter`).
        initial_adapter: The PEFT adapter directory saved right after
            initialization, before training (same layers, rank and alpha).
        base_model_name_or_path: Recorded in `adapter_config.json`.

    Returns:
        The directory.

    Raises:
        FileNotFoundError: `initial_adapter` lacks its files.
        ValueError: The initial adapter does not fit the model's adapters
            (another layer set, shapes, rank or alpha; named), or `directory`
            holds other files.

    Example:
        (`model`: a tiny Llama in NF4 with rank-4 adapters; `tmp`: an empty directory.)

        >>> import json
        >>> from qlora_jax.models import save_peft_adapter, save_peft_adapter_over_original
        >>> _ = save_peft_adapter(model, tmp / "initial")
        >>> out = save_peft_adapter_over_original(model, tmp / "lora", initial_adapter=tmp / "initial")
        >>> config = json.loads((out / "adapter_config.json").read_text())
        >>> config["r"], config["lora_alpha"], config["init_lora_weights"]
        (8, 16.0, True)
    """
    initial = Path(initial_adapter)
    for name in _FILES:
        if not (initial / name).is_file():
            raise FileNotFoundError(f"{initial / name}: missing (initial_adapter is the PEFT adapter directory "
                                    "saved with save_peft_adapter right after initialization)")
    init_config = json.loads((initial / "adapter_config.json").read_text())
    init_tensors = _read(initial / "adapter_model.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        current = save_peft_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=base_model_name_or_path)
        config = json.loads((current / "adapter_config.json").read_text())
        tensors = _read(current / "adapter_model.safetensors")
    if sorted(init_tensors) != sorted(tensors):
        extra = sorted(set(init_tensors) ^ set(tensors))
        raise ValueError(f"{initial}: its tensors differ from the model's adapters (e.g. {extra[0]!r}); the initial "
                         "adapter must be saved from this model right after initialization")
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        if init_config.get(key) != config.get(key):
            raise ValueError(f"{initial / 'adapter_config.json'}: {key}={init_config.get(key)!r} differs from the "
                             f"model's {config.get(key)!r}")
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        start = init_tensors[name]
        if start.shape != value.shape:
            raise ValueError(f"{initial}: {name} has shape {start.shape}, the model's adapter {value.shape}")
        if name.endswith(".lora_magnitude_vector"):  # DoRA: W + s·(B·A − B0·A0) is the same weight, same norm
            out[name] = value
        elif ".lora_A." in name:
            out[name] = np.ascontiguousarray(np.concatenate([value, start], axis=0))  # (2r, in)
        else:
            out[name] = np.ascontiguousarray(np.concatenate([value, -start], axis=1))  # (out, 2r)
    config["init_lora_weights"] = True
    config["r"] *= 2
    config["lora_alpha"] *= math.sqrt(2) if config.get("use_rslora") else 2
    config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()}
    directory = Path(directory)
    with atomic_directory(directory, owns=set(_FILES).__contains__) as tmp:
        save_safetensors(tmp / "adapter_model.safetensors", out, metadata={"format": "pt"})
        write_text(tmp / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return directory


def save_residual_base(
    model: CausalLM,
    directory: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    tokenizer_from: str | os.PathLike | None = None,
) -> Path:
    """Writes the model's base weights as stored (the residual of PiSSA/OLoRA/LoftQ, dequantized), no adapters.

    A Hugging Face checkpoint (`save_merged` of the model with every
    adapter's B set to zero, the model itself untouched): the base that an
    adapter saved with `save_peft_adapter` applies to. For LoftQ this is
    PEFT's own pair: `PeftModel.from_pretrained(base_loaded_from_directory,
    adapter)`; loaded in 4 bit (bitsandbytes NF4, block 64), the dequantized
    NF4 values quantize back to the same 4-bit codes.

    Args:
        model: A `CausalLM` (quantized or not).
        directory: Output directory, written atomically (see `save_merged`).
        dtype: Dtype of the saved tensors. Use float32 to keep the
            dequantized values exact.
        tokenizer_from: A checkpoint directory whose tokenizer files are copied.

    Returns:
        The directory.

    Raises:
        ValueError: DoRA layers (zeroing B does not leave the base there).

    Example:
        (`model`: a tiny Llama in NF4 with rank-4 adapters; `tmp`: an empty directory.)

        >>> from qlora_jax.models import save_residual_base
        >>> sorted(f.name for f in save_residual_base(model, tmp / "base").iterdir())
        ['config.json', 'model.safetensors']
    """
    layers = adapter_layers(model)
    dora = sorted(n for n, layer in layers.items() if getattr(layer, "lora_magnitude_vector", None) is not None)
    if dora:
        raise ValueError(f"model: {dora[0]} is a DoRA layer; its base is not what a zero B leaves")
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    zeroed = {p: (v.replace(jnp.zeros_like(v.get_value())) if p[-1] == "lora_b" else v) for p, v in flat.items()}
    base = nnx.merge(graphdef, nnx.from_flat_state(zeroed))  # shares every other array with `model`
    return save_merged(base, directory, dtype=dtype, tokenizer_from=tokenizer_from)


def _read(path: Path) -> dict[str, np.ndarray]:
    reader = SafetensorsReader(path)
    return {name: np.asarray(reader[name], np.float32) for name in reader}

"""`from_pretrained`: a Hugging Face Llama-family checkpoint as a `CausalLM`.

The model is first built abstractly (`nnx.eval_shape`: nothing allocated),
then filled from the checkpoint one tensor at a time. Linear weights are
transposed to Flax's `[in, out]`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax._src.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from qlora_jax._src.models.llama import CausalLM
from qlora_jax._src.models.safetensors_io import SafetensorsReader

__all__ = ["from_pretrained", "load_config", "load_tokenizer", "hf_name_to_path"]

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory (or hub id) via `transformers.AutoConfig`.

    Raises:
        FileNotFoundError: A local directory without `config.json`.
        ValueError: An unsupported `model_type` or setting (see `ModelConfig.from_hf`).

    Example:
        >>> from qlora_jax.models import load_config
        >>> load_config("/nonexistent")
        Traceback (most recent call last):
        ...
        FileNotFoundError: /nonexistent: no config.json (not a Hugging Face checkpoint directory)
    """
    import transformers

    local = Path(path)
    if local.exists() or str(path).startswith(("/", ".")):
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
        import json

        model_type = json.loads((local / "config.json").read_text()).get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{local / 'config.json'}: model_type {model_type!r} is not supported; "
                             f"supported: {SUPPORTED_MODEL_TYPES}")
    return ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(str(path)))


def load_tokenizer(path: str | os.PathLike) -> Any | None:
    """`transformers.AutoTokenizer` of the checkpoint, or None when it has none.

    Example:
        >>> from qlora_jax.models import load_tokenizer
        >>> load_tokenizer("/nonexistent") is None
        True
    """
    import transformers

    local = Path(path)
    if local.exists() or str(path).startswith(("/", ".")):
        names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
        if not any((local / n).is_file() for n in names):
            return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        return None


def hf_name_to_path(name: str, config: ModelConfig) -> tuple[tuple[str, ...], int | None, bool] | None:
    """Where a Hugging Face tensor goes: `(state path, layer index or None, transpose)`.

    None for tensors the model does not use (e.g. rotary buffers, or a saved
    `lm_head.weight` when embeddings are tied).

    Example:
        >>> from qlora_jax.models import ModelConfig, hf_name_to_path
        >>> cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=1,
        ...                   num_kv_heads=1)
        >>> hf_name_to_path("model.layers.1.self_attn.q_proj.weight", cfg)
        (('layers', 'self_attn', 'q_proj', 'kernel'), 1, True)
    """
    if name == "model.embed_tokens.weight":
        return ("embed_tokens", "embedding"), None, False
    if name == "model.norm.weight":
        return ("norm", "weight"), None, False
    if name == "lm_head.weight":
        return None if config.tie_word_embeddings else (("lm_head", "kernel"), None, True)
    match = _LAYER.fullmatch(name)
    if match is None:
        return None
    layer, module, kind = int(match.group(1)), tuple(match.group(2).split(".")), match.group(3)
    if module[-1].endswith("_proj"):
        return (("layers", *module, "kernel" if kind == "weight" else "bias"), layer, kind == "weight")
    return (("layers", *module, kind), layer, False)


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    remat: bool = False,
) -> CausalLM:
    """Loads a Llama-family checkpoint (`config.json` + safetensors) as a float `CausalLM`.

    Args:
        path: A checkpoint directory (single or sharded safetensors) or a hub id.
        dtype: Compute dtype.
        param_dtype: Dtype of the parameters.
        remat: Rematerialize each decoder layer in the backward pass.

    Returns:
        The model.

    Raises:
        FileNotFoundError: No `config.json` or no safetensors.
        ValueError: An unsupported config, a truncated file, a tensor with the
            wrong shape, or a tensor missing from the checkpoint (each named).

    Example:
        >>> from qlora_jax.models import from_pretrained
        >>> from_pretrained("/nonexistent")
        Traceback (most recent call last):
        ...
        FileNotFoundError: /nonexistent: no config.json (not a Hugging Face checkpoint directory)
    """
    config = load_config(path)
    directory = _local_dir(path)
    reader = SafetensorsReader(directory)
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                               rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    buffers = {p: np.zeros(v.shape, v.dtype) for p, v in flat.items() if hasattr(v, "shape")}
    filled: dict[tuple[str, ...], set] = {p: set() for p in buffers}
    for name in reader:
        target = hf_name_to_path(name, config)
        if target is None:
            continue
        key, layer, transpose = target
        if key not in buffers:
            raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has no place in a {config.model_type} "
                             f"model with this config (expected path {'/'.join(key)})")
        tensor = reader[name]
        value = tensor.T if transpose else tensor
        slot = buffers[key] if layer is None else buffers[key][layer]
        if value.shape != slot.shape:
            raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(tensor.shape)}, the model "
                             f"expects {tuple(slot.shape[::-1] if transpose else slot.shape)}")
        slot[...] = value.astype(slot.dtype)
        filled[key].add(layer)
    for key, layers in filled.items():
        expected = {None} if buffers[key].ndim == 0 or key[0] != "layers" else set(range(config.num_layers))
        if layers != expected:
            missing = sorted(expected - layers, key=lambda x: -1 if x is None else x)
            raise ValueError(f"{directory}: checkpoint is missing {_hf_name(key, missing[0])} "
                             f"({len(missing)} tensor(s) for {'/'.join(key)})")
    values = {p: jnp.asarray(b) for p, b in buffers.items()}
    state = nnx.from_flat_state({p: flat[p].replace(values[p]) for p in flat})
    return nnx.merge(graphdef, state)


def _hf_name(key: tuple[str, ...], layer: int | None) -> str:
    """The Hugging Face name of our state path `key` (for error messages)."""
    if key == ("embed_tokens", "embedding"):
        return "model.embed_tokens.weight"
    if key == ("norm", "weight"):
        return "model.norm.weight"
    if key == ("lm_head", "kernel"):
        return "lm_head.weight"
    kind = {"kernel": "weight"}.get(key[-1], key[-1])
    return f"model.layers.{layer}.{'.'.join(key[1:-1])}.{kind}"


def _local_dir(path: str | os.PathLike) -> Path:
    """A local directory for `path`, downloading a hub id's files (needs a network)."""
    local = Path(path)
    if local.exists():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))


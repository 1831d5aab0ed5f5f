"""`save_merged`: a fine-tuned model as a plain Hugging Face checkpoint.

Every quantized projection is merged by `merged_kernel` (the function
`merge_lora` uses): dequantized exactly (`codebook[code] * absmax` in
float32), its LoRA update `s · A @ B` added in float32 (for DoRA, the sum
scaled per output by `m / ‖W + s · A @ B‖`, PEFT's merge), and the result cast to
the requested dtype once — the base is never re-quantized. The
output is `config.json` plus safetensors (sharded with an index when larger
than `max_shard_bytes`), loadable by `transformers.AutoModelForCausalLM`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax._src.models.atomic_dir import atomic_directory, naming_file, write_text
from qlora_jax._src.models.llama import CausalLM
from qlora_jax._src.models.safetensors_io import save_safetensors
from qlora_jax._src.nn.linear import QuantLinear
from qlora_jax._src.surgery.merge import merged_kernel

__all__ = ["save_merged", "merged_tensors"]


def merged_tensors(model: CausalLM, dtype: jnp.dtype = jnp.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(hf_name, array)` for every tensor of the merged model, one at a time.

    Linear weights are `[out, in]` (PyTorch layout) with LoRA folded in.

    Example:
        >>> from flax import nnx
        >>> from qlora_jax.models import CausalLM, ModelConfig
        >>> cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=1,
        ...                   num_kv_heads=1, tie_word_embeddings=True)
        >>> sorted(name for name, _ in merged_tensors(CausalLM(cfg, rngs=nnx.Rngs(0))))[:2]
        ['model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight']
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"model: save_merged takes a qlora_jax.models.CausalLM, got {type(model).__name__}")
    if getattr(model.config, "num_experts", 0):  # experts stacked [layers, experts], the router not a Linear
        raise ValueError(f"model: save_merged does not write mixture-of-experts models yet ({model.config.model_type}"
                         f" with num_experts={model.config.num_experts})")
    dtype = np.dtype(dtype)
    yield "model.embed_tokens.weight", np.asarray(model.embed_tokens.embedding[...]).astype(dtype)
    yield "model.norm.weight", np.asarray(model.norm.weight[...]).astype(dtype)
    if model.lm_head is not None:
        for name, array in _linear_tensors(model.lm_head, None, dtype):
            yield f"lm_head.{name}", array
    layers = model.config.num_layers
    for path, node in sorted(nnx.iter_graph(model.layers), key=lambda item: tuple(map(str, item[0]))):
        names = ".".join(str(p) for p in path)
        if isinstance(node, (nnx.Linear, QuantLinear)):
            for i in range(layers):
                for name, array in _linear_tensors(node, i, dtype):
                    yield f"model.layers.{i}.{names}.{name}", array
        elif isinstance(node, nnx.Module) and hasattr(node, "weight") and isinstance(node.weight, nnx.Param):
            weight = np.asarray(node.weight[...])  # RMSNorm, stacked
            for i in range(layers):
                yield f"model.layers.{i}.{names}.weight", weight[i].astype(dtype)


def _linear_tensors(layer, index: int | None, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """`weight` `[out, in]` (merged) and `bias` of one layer (`index` into stacked variables)."""

    def pick(x):
        return x if index is None else x[index]

    if isinstance(layer, QuantLinear):
        w = merged_kernel(layer, dtype, index=index)  # [in, out]
    else:
        w = pick(layer.kernel[...]).astype(dtype)
    yield "weight", np.ascontiguousarray(np.asarray(w).T)
    if layer.bias is not None:
        yield "bias", np.asarray(pick(layer.bias[...])).astype(dtype)


def save_merged(
    model: CausalLM,
    directory: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer_from: str | os.PathLike | None = None,
) -> Path:
    """Writes the model with LoRA merged into dequantized weights as an HF checkpoint.

    Args:
        model: A `CausalLM` (quantized or not, with or without adapters).
        directory: Output directory. The files are written to a temporary
            sibling directory (`.{name}.tmp-<random>`), fsynced and renamed
            into place when complete, so a write that fails halfway leaves
            the previous output there byte for byte and no temporary
            directory behind. An existing directory is replaced only if it is
            empty or holds nothing but files this function writes
            (`config.json`, `model*.safetensors`, the index, tokenizer
            files); other files in it are refused (ValueError), never deleted.
        dtype: Dtype of the saved tensors (float32, bfloat16 or float16).
        max_shard_bytes: Shard size; larger checkpoints get
            `model.safetensors.index.json`.
        tokenizer_from: A checkpoint directory whose tokenizer files are copied.

    Returns:
        The directory.

    Raises:
        TypeError: `model` is not a `CausalLM`.
        ValueError: `directory` holds files this function does not write
            (named).
        OSError: A failed write, naming the file.

    Example:
        >>> import tempfile
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.models import CausalLM, ModelConfig, save_merged
        >>> cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=1,
        ...                   num_kv_heads=1, tie_word_embeddings=True)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = save_merged(CausalLM(cfg, rngs=nnx.Rngs(0)), f"{tmp}/merged", dtype=jnp.bfloat16)
        ...     sorted(f.name for f in out.iterdir())
        ['config.json', 'model.safetensors']
    """
    directory = Path(directory)
    with atomic_directory(directory, owns=_writes) as tmp:
        with naming_file(tmp / "config.json"):
            model.config.to_hf().save_pretrained(tmp)
        writer = _ShardWriter(tmp, max_shard_bytes)
        for name, array in merged_tensors(model, dtype):
            writer.add(name, array)
        writer.close()
        if tokenizer_from is not None:
            for f in Path(tokenizer_from).glob("*"):
                if f.is_file() and _is_tokenizer_file(f.name):
                    with naming_file(tmp / f.name):
                        shutil.copy(f, tmp / f.name)
    return directory


def _is_tokenizer_file(name: str) -> bool:
    """Files copied by `tokenizer_from=`."""
    return name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges")) or \
        name in ("generation_config.json", "chat_template.jinja")


def _writes(name: str) -> bool:
    """Whether `save_merged` writes a file of this name (an existing directory of only these is replaced)."""
    return name in ("config.json", "model.safetensors", "model.safetensors.index.json") or \
        re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None or _is_tokenizer_file(name)


class _ShardWriter:
    """Writes tensors into shards of at most `max_bytes` as they come, then names
    them `model-0000i-of-0000n.safetensors` with an index (or `model.safetensors`)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, array: np.ndarray) -> None:
        if self.pending and self.pending_bytes + array.nbytes > self.max_bytes:
            self._write()
        self.pending[name] = array
        self.pending_bytes += array.nbytes

    def _write(self) -> None:
        file = f"shard-{len(self.files):05d}.safetensors"
        save_safetensors(self.directory / file, self.pending, metadata={"format": "pt"})
        self.weight_map.update({name: file for name in self.pending})
        self.files.append(file)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._write()
        if len(self.files) == 1:
            os.replace(self.directory / self.files[0], self.directory / "model.safetensors")
            return
        n = len(self.files)
        final = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(self.files)}
        for old, new in final.items():
            os.replace(self.directory / old, self.directory / new)
        total = sum((self.directory / f).stat().st_size for f in final.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: final[f] for t, f in sorted(self.weight_map.items())}}
        write_text(self.directory / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")

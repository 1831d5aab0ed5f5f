"""`from_pretrained`: a Hugging Face checkpoint of a supported family as a `CausalLM`.

The families are `SUPPORTED_MODEL_TYPES` (Llama, Mistral, Qwen2, Qwen3, Gemma
1/2/3 text, Phi-3, OLMo-2, Granite). The model is first built abstractly
(`nnx.eval_shape`: nothing allocated), then filled from the checkpoint one
tensor at a time. Linear weights are transposed to Flax's `[in, out]`; module
names are the checkpoint's own, so fused projections (Phi-3's `qkv_proj`,
`gate_up_proj`) load, quantize and take adapters as the one kernel stored.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere

from qlora_jax._src.config import LoraConfig, QuantConfig
from qlora_jax._src.formats.blockwise import dequantize, quantize_streaming
from qlora_jax._src.formats.bnb import from_bnb
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from qlora_jax._src.models.llama import CausalLM
from qlora_jax._src.models.safetensors_io import DTYPES, SafetensorsReader
from qlora_jax._src.nn.weight_init import check_weight_init, weight_init
from qlora_jax._src.surgery.apply import apply_qlora
from qlora_jax._src.surgery.targets import find_heads, find_linears, match_targets

__all__ = ["from_pretrained", "load_config", "load_tokenizer", "hf_name_to_path", "checkpoint_dir"]

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
# Mixtral's experts and router as its checkpoints store them (`transformers` saves this layout).
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_ROUTER = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight")
# A hub id as the Hugging Face Hub spells one: `org/name`, word characters, `-` and `.` (see `_is_hub_id`).
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]{1,96}")
# What `from_pretrained` downloads of a hub id: config, weights, tokenizer.
_CHECKPOINT_FILES = ("*.json", "*.safetensors", "tokenizer*")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory (or hub id) via `transformers.AutoConfig`.

    Raises:
        FileNotFoundError: A local directory without `config.json`, or a path
            that names no directory and no hub id that resolves (see
            `checkpoint_dir`).
        ValueError: An unsupported `model_type` or setting (see `ModelConfig.from_hf`).

    Example:
        >>> from qlora_jax.models import load_config
        >>> load_config("/nonexistent")
        Traceback (most recent call last):
        ...
        FileNotFoundError: /nonexistent: no config.json (not a Hugging Face checkpoint directory)
    """
    import transformers

    local = checkpoint_dir(path, files=("config.json",))
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    model_type = json.loads((local / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{local / 'config.json'}: model_type {model_type!r} is not supported; "
                         f"supported: {SUPPORTED_MODEL_TYPES}")
    return ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(str(local)))


def load_tokenizer(path: str | os.PathLike) -> Any | None:
    """`transformers.AutoTokenizer` of the checkpoint, or None when it has none.

    Example:
        >>> from qlora_jax.models import load_tokenizer
        >>> load_tokenizer("/nonexistent") is None
        True
    """
    import transformers

    local = Path(path)
    if not _is_local(path) and not _is_hub_id(str(path)):
        return None
    if _is_local(path):
        names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
        if not any((local / n).is_file() for n in names):
            return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        return None


def hf_name_to_path(name: str, config: ModelConfig) -> tuple[tuple[str, ...], Any, bool] | None:
    """Where a Hugging Face tensor goes: `(state path, index, transpose)`.

    The index is the layer's (stacked variables), `(layer, expert)` for a Mixtral expert's weight, or None.

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
    match = _EXPERT.fullmatch(name)
    if match is not None:
        return ("layers", "mlp", "experts", match.group(3), "kernel"), (int(match.group(1)), int(match.group(2))), True
    match = _ROUTER.fullmatch(name)
    if match is not None:
        return ("layers", "mlp", "gate", "kernel"), int(match.group(1)), True
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
    quant: QuantConfig | None = None,
    lora: LoraConfig | None = None,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    remat: bool = False,
    rngs: nnx.Rngs | None = None,
    progress: bool = False,
) -> CausalLM:
    """Loads a checkpoint of a supported family (`config.json` + safetensors) as a `CausalLM`.

    The model is built abstractly and filled one tensor at a time. With
    `quant`, every decoder projection (`*_proj`, fused ones as one kernel;
    not `lm_head` or the embeddings) is transposed and quantized as it is read, so the
    full-precision model is never resident. A checkpoint saved by
    `transformers` + `bitsandbytes` in 4 bit is used as is: its packed codes
    and scales become the kernels without dequantizing (then `quant` must be
    None or describe the same format). With `lora`, `apply_qlora` adds the
    adapters (`quant=None`: plain LoRA over float kernels). An init that reads
    the weight (`LoraConfig.init` "pissa", "pissa_niter_N", "olora", "loftq")
    is computed per targeted projection as it is read (the whole tensor in
    float32, a bitsandbytes one dequantized), and the quantized residual
    becomes its kernel (docs/loading.md).

    Args:
        path: A checkpoint directory (single or sharded safetensors) or a hub id.
        quant: How to quantize the projections, or None.
        lora: Adapters to add, or None.
        dtype: Compute dtype.
        param_dtype: Dtype of the float parameters.
        remat: Rematerialize each decoder layer in the backward pass.
        rngs: Draws the adapters; default `nnx.Rngs(0)`.
        progress: Show a progress bar over the tensors.

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
    directory = checkpoint_dir(path)
    reader = SafetensorsReader(directory)
    return _load(config, directory, reader, quant=quant, lora=lora, dtype=dtype, param_dtype=param_dtype,
                 remat=remat, rngs=rngs, progress=progress)


def _load(config: ModelConfig, directory: Path, reader: SafetensorsReader, *, quant: QuantConfig | None,
          lora: LoraConfig | None, dtype: jnp.dtype, param_dtype: jnp.dtype, remat: bool, rngs: nnx.Rngs | None,
          progress: bool) -> CausalLM:
    """`from_pretrained`'s work once the checkpoint is found."""
    bnb = _bnb_config(directory)
    if bnb is not None:
        if quant is not None and (quant.fmt, quant.double_quant) != (bnb.fmt, bnb.double_quant):
            raise ValueError(f"quant: the checkpoint {directory} is bitsandbytes 4-bit ({bnb.fmt}, double_quant="
                             f"{bnb.double_quant}); pass quant=None or a matching QuantConfig")
        quant = dataclasses.replace(bnb, compute_dtype=quant.compute_dtype if quant else None)
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                               rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    slots = {p: v for p, v in flat.items() if hasattr(v, "shape")}
    quantized = {p for p in slots if quant is not None and p[0] == "layers" and p[-1] == "kernel"
                 and (p[-2].endswith("_proj") or p[-3] == "experts")}
    values: dict[tuple[str, ...], Any] = {}
    kernels: dict[tuple[str, ...], _StackedKernel] = {}
    # PiSSA / OLoRA / LoftQ on a quantized base: each targeted projection's factors and quantized residual are
    # computed from its float weight as it is read (one tensor at a time); the factors are collected here.
    initialized = _weight_init_targets(abstract, quantized, quant, lora)
    factors: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
    init_key = (rngs or nnx.Rngs(0))["params"]() if initialized else None
    filled: dict[tuple[str, ...], set] = {p: set() for p in slots}
    names = [n for n in reader if not _is_bnb_aux(n)]
    targets = {}
    for name in names:
        target = hf_name_to_path(name, config)
        if target is None:
            continue
        if target[0] not in slots:
            raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has no place in a {config.model_type} "
                             f"model with this config (expected path {'/'.join(target[0])})")
        targets[name] = target
    # Decoder projections are read and quantized by worker threads (file reads and XLA release the GIL, so one
    # tensor is read while another is quantized), at most `_IN_FLIGHT` at a time; results are placed in order.
    pending = _Ahead((lambda n=n, i=i: _read_quantized(
        reader, n, quant, bnb is not None, lora if targets[n][0] in initialized else None,
        None if init_key is None else jax.random.fold_in(init_key, i)))
        for i, n in enumerate(n for n in targets if targets[n][0] in quantized))
    with pending:
        for name in tqdm(names, desc=f"loading {directory.name}", unit="tensor", disable=not progress):
            if name not in targets:
                continue
            key, layer, transpose = targets[name]
            slot = slots[key]
            expected = tuple(slot.shape[_depth(layer):])
            if key in quantized:
                q = pending.next()
                if key in initialized:
                    q, a, b = q
                    lead = slot.shape[:_depth(layer)]
                    if key not in factors:
                        factors[key] = tuple(np.zeros((*lead, *f.shape), np.float32) for f in (a, b))
                    factors[key][0][layer], factors[key][1][layer] = a, b
                if q.shape != expected:
                    raise ValueError(f"{reader.file_of(name)}: tensor {name!r} holds a kernel of shape {q.shape} "
                                     f"[in, out], the model expects {expected}")
                if key not in kernels:
                    kernels[key] = _StackedKernel(q, slot.shape[:_depth(layer)])
                kernels[key].put(q, layer)
                del q
                filled[key].add(layer)
                continue
            if bnb is not None and reader.dtype_name(name) == "U8":
                raise ValueError(f"{reader.file_of(name)}: tensor {name!r} is 4-bit packed, but {'/'.join(key)} "
                                 "is not a decoder projection")
            tensor = reader[name]
            value = tensor.T if transpose else tensor
            if value.shape != expected:
                raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                                 f"model expects {expected[::-1] if transpose else expected}")
            if layer is None:
                values[key] = jnp.asarray(value.astype(slot.dtype, copy=False))
            else:
                if key not in values:
                    values[key] = np.zeros(slot.shape, slot.dtype)
                values[key][layer] = value
            del tensor, value  # one full-precision tensor at a time
            filled[key].add(layer)
    for key, layers in filled.items():
        if key[0] != "layers":
            expected_layers = {None}
        elif "experts" in key:
            expected_layers = {(i, e) for i in range(config.num_layers) for e in range(config.num_experts)}
        else:
            expected_layers = set(range(config.num_layers))
        if layers != expected_layers:
            missing = sorted(expected_layers - layers, key=lambda x: (-1,) if x is None else np.atleast_1d(x).tolist())
            raise ValueError(f"{directory}: checkpoint is missing {_hf_name(key, missing[0])} "
                             f"({len(missing)} tensor(s) for {'/'.join(key)})")
    for key in list(values):  # host buffers to device arrays one at a time, freeing each
        values[key] = jnp.asarray(values.pop(key)) if isinstance(values[key], np.ndarray) else values[key]
    state = nnx.from_flat_state({p: (flat[p].replace(values[p]) if p in values else flat[p]) for p in flat})
    model = nnx.merge(graphdef, state)
    if quant is None and lora is None:
        return model
    stacked = {"/".join(key[:-1]): kernels.pop(key).array() for key in list(kernels)}
    adapters = {"/".join(key[:-1]): factors.pop(key) for key in list(factors)}  # with their residuals in `stacked`
    model = apply_qlora(model, quant=quant, lora=lora, rngs=rngs or nnx.Rngs(0), kernels=stacked,
                        adapters=adapters or None)
    return model


def _weight_init_targets(abstract: CausalLM, quantized: set, quant: QuantConfig | None,
                         lora: LoraConfig | None) -> set[tuple[str, ...]]:
    """The kernel paths whose adapters `lora.init` computes from the weight while the checkpoint streams: the
    quantized projections among `lora.targets` (without `quant`, `apply_qlora` computes them from the loaded
    float kernels)."""
    if lora is None or not lora.weight_init:
        return set()
    check_weight_init(lora, quant)
    if not quantized:
        return set()
    sites, _ = find_linears(abstract)
    adapted = {s.name for s in match_targets(abstract, lora.targets, sites, find_heads(abstract, sites))}
    return {p for p in quantized if "/".join(p[:-1]) in adapted}


def _depth(index) -> int:
    """Stack axes an index addresses: 0 (None), 1 (a layer), 2 (a layer's expert)."""
    return 0 if index is None else len(index) if isinstance(index, tuple) else 1


class _StackedKernel:
    """The layers' kernels of one projection, stacked `[num_layers, ...]` (`[num_layers, num_experts, ...]`
    for experts), filled in place layer by layer.

    The stack is allocated once (zeros) and each layer is written into it by a jitted update that donates the
    stack, so no second copy of a projection's kernels ever exists (stacking a list of layers would hold both).
    """

    def __init__(self, first: QuantizedArray, lead: tuple[int, ...]):
        # The first layer's format and shapes, not its arrays (which would stay alive until the end).
        self.template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), first)
        self.leaves = {k: jnp.zeros((*lead, *v.shape), v.dtype) for k, v in _leaves(self.template).items()}

    def put(self, q: QuantizedArray, layer: int | tuple[int, int]) -> None:
        t = self.template
        if (q.fmt, q.block_size, q.double_quant, q.shape) != (t.fmt, t.block_size, t.double_quant, t.shape):
            raise ValueError(f"layer {layer}: quantized as {q} but the first layer read as {t}; stacked layers "
                             "must agree")
        self.leaves = _put_layer(self.leaves, _leaves(q), layer if isinstance(layer, tuple) else (layer,))

    def array(self) -> QuantizedArray:
        leaves = {k: self.leaves.get(k) for k in _LEAF_NAMES}
        self.leaves = {}
        return dataclasses.replace(self.template, **leaves)


_LEAF_NAMES = ("codes", "absmax", "nested_absmax", "nested_offset")


def _leaves(q: QuantizedArray) -> dict[str, Any]:
    return {k: getattr(q, k) for k in _LEAF_NAMES if getattr(q, k) is not None}


@functools.partial(jax.jit, donate_argnums=0)
def _put_layer(stack: dict[str, jax.Array], layer: dict[str, Any], index: tuple) -> dict[str, jax.Array]:
    return {k: stack[k].at[index].set(jnp.asarray(layer[k], stack[k].dtype)) for k in stack}


class _Ahead:
    """Runs zero-argument `tasks` on worker threads, at most `_IN_FLIGHT` ahead; `next()` returns their results
    in order (re-raising a task's exception). Leaving the `with` block cancels what has not started and waits
    for the rest."""

    def __init__(self, tasks):
        self._tasks = iter(tasks)
        self._futures: collections.deque = collections.deque()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="qlora_jax-load")

    def _fill(self) -> None:
        while len(self._futures) < _IN_FLIGHT:
            task = next(self._tasks, None)
            if task is None:
                return
            self._futures.append(self._pool.submit(task))

    def next(self) -> Any:
        self._fill()
        result = self._futures.popleft().result()
        self._fill()
        return result

    def __enter__(self) -> _Ahead:
        self._fill()
        return self

    def __exit__(self, *exc) -> None:
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)


# Worker threads reading and quantizing projections, and how many tensors may be in flight (each holds at most
# one chunk of full-precision rows at a time, plus its packed result).
_WORKERS = 2
_IN_FLIGHT = 3


def _read_quantized(reader: SafetensorsReader, name: str, quant: QuantConfig, from_bnb_state: bool,
                    lora: LoraConfig | None = None, key: jax.Array | None = None
                    ) -> QuantizedArray | tuple[QuantizedArray, np.ndarray, np.ndarray]:
    """One layer's kernel `[in, out]` as a `QuantizedArray`: quantized from the float
    weight, or taken bit for bit from bitsandbytes' packed state. With `lora` (a weight-reading init), the
    whole float weight (bitsandbytes': dequantized) is read and `(residual QuantizedArray, a [in, r], b [r, out])`
    returned."""
    if lora is not None:
        if from_bnb_state:
            kernel = dequantize(_read_quantized(reader, name, quant, True), jnp.float32)  # [in, out]
        else:
            kernel = jnp.asarray(reader[name]).T  # [in, out]
        try:
            a, b, q = weight_init(kernel, lora=lora, quant=quant, key=key)
        except ValueError as e:
            raise ValueError(f"{reader.file_of(name)}: tensor {name!r}: {e}") from None
        return q, np.asarray(a), np.asarray(b)
    if from_bnb_state:
        if reader.dtype_name(name) != "U8":
            raise ValueError(f"{reader.file_of(name)}: tensor {name!r} is {reader.dtype_name(name)}, not the packed "
                             "uint8 weight of a bitsandbytes 4-bit layer")
        state = {k[len(name) + 1:]: reader[k] for k in reader if k.startswith(name + ".")}
        state["weight"] = reader[name]
        try:
            return from_bnb(state)
        except ValueError as e:
            raise ValueError(f"{reader.file_of(name)}: tensor {name!r}: {e}") from None
    try:
        return quantize_streaming(_TensorRows(reader, name), quant.fmt, quant.block_size, quant.double_quant,
                                  as_kernel=True)
    except ValueError as e:  # e.g. NaN/Inf values
        raise ValueError(f"{reader.file_of(name)}: tensor {name!r}: {e}") from None


class _TensorRows:
    """A checkpoint tensor `[out, in]` whose rows are read from its file when sliced (`quantize_streaming`'s
    input). Quantizing the PyTorch weight along its input axis gives the bytes of the Flax kernel `[in, out]`
    (the same storage order), no transpose."""

    def __init__(self, reader: SafetensorsReader, name: str):
        self.reader, self.name = reader, name
        self.shape = reader.shape(name)
        self.dtype = DTYPES[reader.dtype_name(name)]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        return self.reader.rows(self.name, start, stop)


def _is_bnb_aux(name: str) -> bool:
    """Whether `name` is a bitsandbytes quant-state entry (`*.weight.absmax`, ...)."""
    return bool(re.search(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$", name))


def _bnb_config(directory: Path) -> QuantConfig | None:
    """The `QuantConfig` of a `transformers` + `bitsandbytes` 4-bit checkpoint, else None."""
    cfg = json.loads((directory / "config.json").read_text()).get("quantization_config")
    if not cfg or cfg.get("quant_method") != "bitsandbytes":
        if cfg:
            raise ValueError(f"{directory / 'config.json'}: quantization_config.quant_method "
                             f"{cfg.get('quant_method')!r} is not supported (only 'bitsandbytes' 4-bit)")
        return None
    if not (cfg.get("load_in_4bit") or cfg.get("_load_in_4bit")):
        raise ValueError(f"{directory / 'config.json'}: quantization_config: only bitsandbytes 4-bit checkpoints "
                         "load (load_in_4bit); 8-bit LLM.int8 is not supported")
    if cfg.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise ValueError(f"{directory / 'config.json'}: quantization_config.bnb_4bit_quant_storage "
                         f"{cfg.get('bnb_4bit_quant_storage')!r} is not supported (only uint8)")
    return QuantConfig(fmt=cfg.get("bnb_4bit_quant_type", "fp4"), block_size=64,
                       double_quant=bool(cfg.get("bnb_4bit_use_double_quant", False)))


def _hf_name(key: tuple[str, ...], layer: int | None) -> str:
    """The Hugging Face name of our state path `key` (for error messages)."""
    if key == ("embed_tokens", "embedding"):
        return "model.embed_tokens.weight"
    if key == ("norm", "weight"):
        return "model.norm.weight"
    if key == ("lm_head", "kernel"):
        return "lm_head.weight"
    kind = {"kernel": "weight"}.get(key[-1], key[-1])
    if isinstance(layer, tuple):  # a Mixtral expert
        return f"model.layers.{layer[0]}.block_sparse_moe.experts.{layer[1]}.{key[-2]}.weight"
    if key[1:] == ("mlp", "gate", "kernel"):
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"
    return f"model.layers.{layer}.{'.'.join(key[1:-1])}.{kind}"


def checkpoint_dir(path: str | os.PathLike, *, files: tuple[str, ...] = _CHECKPOINT_FILES) -> Path:
    """The local directory of a checkpoint: `path` itself, or a hub id's `files` downloaded.

    A `path` that exists, or that starts with `/` or `.`, is a local path. Any
    other is a hub id only when it is spelled as one (`org/name`); its files
    are fetched with `huggingface_hub.snapshot_download` (a network, or the
    files in the Hugging Face cache).

    Args:
        path: A checkpoint directory or a hub id.
        files: Glob patterns of the hub files to fetch.

    Returns:
        The directory (for a local path, `path` whether or not it exists).

    Raises:
        FileNotFoundError: `path` names no directory and is not a hub id, or
            the hub id cannot be resolved; one line naming what was tried.

    Example:
        >>> from qlora_jax._src.models.loading import checkpoint_dir
        >>> checkpoint_dir("/tmp").name
        'tmp'
        >>> checkpoint_dir("my_modle")
        Traceback (most recent call last):
        ...
        FileNotFoundError: my_modle: no directory ./my_modle, and not a Hugging Face hub id (org/name)
    """
    if _is_local(path):
        return Path(path)
    name = str(path)
    if not _is_hub_id(name):
        raise FileNotFoundError(f"{name}: no directory ./{name}, and not a Hugging Face hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=list(files)))
    except (OSError, ValueError) as e:  # no network, no such repository, a gated one, ...
        reason = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"{name}: no directory ./{name}, and the hub id could not be resolved "
                                f"({type(e).__name__}: {reason})") from None


def _is_local(path: str | os.PathLike) -> bool:
    """A path that exists, or that is spelled as a path (`/...`, `./...`, `../...`)."""
    return Path(path).exists() or str(path).startswith(("/", "."))


def _is_hub_id(name: str) -> bool:
    """`org/name` by the Hub's rules (`huggingface_hub.utils.validate_repo_id`).

    Example:
        >>> _is_hub_id("meta-llama/Llama-3.2-1B"), _is_hub_id("my_modle"), _is_hub_id("a/b--c")
        (True, False, False)
    """
    if not _HUB_ID.fullmatch(name):
        return False
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True

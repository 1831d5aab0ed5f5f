"""`convert_params`: QLoRA for the `nn.Dense` layers of any Linen model, by rewriting its variables.

QLoRA (Dettmers et al., 2023) freezes the base model as 4-bit codes and trains
LoRA adapters on top. As bitsandbytes' `load_in_4bit` (and `apply_qlora` for
NNX), every Dense layer except the output head is quantized; the
`LoraConfig.targets` get an adapter. The model's source is not touched:
`qlora_interceptor` computes the converted layers when the model runs.

Which params are Dense layers? By default they are recognised in the params
tree: a node holding exactly a 2-D float `kernel` and optionally a matching
1-D `bias`. `dense_layers(model, *inputs)` finds them exactly instead, by
tracing the model (abstractly, no FLOPs): it sees each `nn.Dense` /
`nn.DenseGeneral` by type, including N-D kernels and layers stacked by
`nn.scan` / `nn.vmap`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax._src.config import ALL_LINEAR, HEAD_NAMES, LoraConfig, QuantConfig
from qlora_jax._src.formats.blockwise import FLOAT_DTYPES, quantize
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.linen.interceptor import (
    SUPPORTED_MODULES,
    ProductParam,
    convert_products,
    dense_targets,
    unsupported_reason,
)
from qlora_jax._src.linen.layers import FROZEN
from qlora_jax._src.nn.lora import dora_norm, init_lora
from qlora_jax._src.nn.weight_init import check_weight_init, weight_init_kernel
from qlora_jax._src.surgery.report import QLoRAReport, ReplacedLayer

__all__ = ["DenseLayer", "dense_layers", "convert_params"]



@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """One Dense layer of a Linen model, as its params hold it.

    Example:
        >>> from qlora_jax.linen import DenseLayer
        >>> layer = DenseLayer("blocks/Dense_0", "Dense", (3, 128, 64), stack_shape=(3,))
        >>> layer.name, layer.in_size, layer.out_size
        ('Dense_0', 128, 64)
    """

    path: str  # '/'-joined module path, e.g. "block/attn/q_proj"
    kind: str  # "Dense" or "DenseGeneral"
    kernel_shape: tuple[int, ...]  # as stored in params: (*stack, *in, *features)
    n_in: int = 1  # kernel axes contracted with the input (after the stack dims)
    stack_shape: tuple[int, ...] = ()  # leading dims of layers stacked by nn.scan / nn.vmap
    unsupported: str | None = None  # why the layer cannot be converted, or None

    @property
    def name(self) -> str:
        """The last path component (what a list of target names matches)."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The kernel of one layer: `(*in, *features)`."""
        return self.kernel_shape[len(self.stack_shape):]

    @property
    def in_size(self) -> int:
        """Product of the input sizes."""
        return math.prod(self.layer_shape[: self.n_in])

    @property
    def out_size(self) -> int:
        """Product of the output sizes."""
        return math.prod(self.layer_shape[self.n_in:])


def dense_layers(model: nn.Module, *args: Any, **kwargs: Any) -> tuple[DenseLayer, ...]:
    """The `nn.Dense` / `nn.DenseGeneral` layers of a Linen model, found by tracing `model.init`.

    The model is initialised abstractly (`jax.eval_shape`: shapes only) on
    the given inputs with rng streams "params" and "dropout"; every call of a
    Dense layer is recorded with its path, kernel shape and stack dims (the
    leading dims that `nn.scan` / `nn.vmap` add to its params). Layers that
    `qlora_interceptor` cannot compute (custom `dot_general` or
    `promote_dtype`, `batch_dims`) carry the reason in `unsupported`.

    Args:
        model: A Linen module.
        *args: Example inputs of `model.init` (shapes and dtypes matter).
        **kwargs: Keyword arguments of `model.init` (e.g. `deterministic=True`).

    Returns:
        The layers in the order they are first called.

    Example:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from qlora_jax.linen import dense_layers
        >>> model = nn.Sequential([nn.Dense(8), nn.DenseGeneral((2, 4))])
        >>> [(d.path, d.kind, d.kernel_shape) for d in dense_layers(model, jnp.ones((1, 16)))]
        [('layers_0', 'Dense', (16, 8)), ('layers_1', 'DenseGeneral', (8, 2, 4))]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a flax.linen Module, got {type(model).__name__}")
    found: dict[tuple[str, ...], tuple[str, tuple[int, ...], int, str | None]] = {}

    def record(next_fun: Any, a: tuple, kw: dict, context: nn.module.InterceptorContext) -> Any:
        out = next_fun(*a, **kw)
        m = context.module
        if context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.DenseGeneral)) and m.path not in found:
            kernel = nn.meta.unbox(m.get_variable("params", "kernel"))
            if kernel is not None:
                n_in = 1 if isinstance(m, nn.Dense) else len(np.atleast_1d(m.axis))
                found[m.path] = (type(m).__name__, tuple(kernel.shape), n_in, unsupported_reason(m))
        return out

    key = jax.random.key(0)
    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, *args, **kwargs))
    params = nn.meta.unbox(shapes.get("params", {}))
    layers = []
    for path, (kind, shape, n_in, reason) in found.items():
        stored = tuple(_lookup(params, path)["kernel"].shape)
        n_stack = len(stored) - len(shape)
        if n_stack < 0 or stored[n_stack:] != shape:
            reason = reason or f"its params kernel {stored} is stacked along other than its leading axes"
            n_stack = 0
        layers.append(DenseLayer("/".join(path), kind, stored, n_in, stored[:n_stack], reason))
    return tuple(layers)


def convert_params(
    params: Mapping[str, Any],
    *,
    quant: QuantConfig | None,
    lora: LoraConfig | None,
    rng: jax.Array | None = None,
    layers: Sequence[DenseLayer] | None = None,
    products: Sequence[ProductParam] = (),
) -> tuple[dict[str, Any], QLoRAReport]:
    """Quantizes the Dense kernels of a Linen params tree and adds LoRA adapters.

    Run the model on the result under `qlora_interceptor` (same configs).

    * With `quant` and `lora` (QLoRA): every Dense layer except the output head
      is quantized; its kernel moves to the `"frozen"` collection as a
      `QuantizedArray`. The `lora.targets` also get `lora_a [in, r]` (drawn as
      PEFT) and `lora_b [r, out]` (zero) in `"params"`, float32 (for an
      N-D kernel `[*in, *out]`: `[*in, r]` and `[r, *out]`).
    * `quant=None`: plain LoRA. The targets' float kernels move to `"frozen"`
      unchanged and get adapters; other layers are left as they are.
    * `lora=None`: quantization only.

    Targets (`LoraConfig.targets`): "all-linear" (every Dense layer except the
    head), a list of names matched against the last path component, or a
    regex that must match the whole '/'-joined path. The head is a Dense
    layer whose name is "lm_head", "head" or "output", or else the last Dense
    layer (in `layers` order: call order from `dense_layers`, else the params'
    key order) whose output size is an `nn.Embed`'s vocabulary size and differs
    from its input size; embeddings are never Dense layers. A head is left
    alone unless it is a target by name or regex. A fresh adapter
    has B = 0, so the model computes what the quantized (with `quant=None`:
    the original) model computes. The input tree is not modified.

    Args:
        params: The `"params"` collection of an initialised or pretrained model
            (dict or FrozenDict).
        quant: How to quantize, or None. Any kernel shape: where the input
            size is not a multiple of `quant.block_size`, blocks cross rows
            (bitsandbytes' layout).
        lora: Where adapters go and how they behave, or None.
        rng: PRNG key for the adapters; required when `lora` is given.
        layers: The Dense layers, from `dense_layers(model, ...)`; default:
            recognised in `params` (2-D kernels only; pass `layers` for
            `nn.DenseGeneral` with N-D kernels and for stacked layers).
        products: Parameters multiplied inside the model's own modules, from
            `product_params(model, ...)`: each is quantized (its kernel in
            `"frozen"` at the parameter's path) and, if targeted (by
            "all-linear", its name, its module's name or a regex on either
            path), gets `lora_a` / `lora_b` under `params/<path>/<param>/`.

    Returns:
        `(variables, report)`: `variables` is `{"params": ..., "frozen": ...}`
        (merge other collections, e.g. `batch_stats`, yourself), `report` a
        `QLoRAReport` (layers, bytes before and after, heads and unsupported
        layers left alone).

    Raises:
        ValueError: Both configs None; a target matching no Dense layer or a
            non-Dense module (the message lists the available Dense paths); an
            unsupported layer as a target; a kernel that is not float (naming
            the path); `layers` that do not match `params`.
        TypeError: Arguments of the wrong type.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.linen import convert_params
        >>> class MLP(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         h = nn.Dense(256, name="up")(x)
        ...         return nn.Dense(10, name="head")(nn.Dense(128, name="down")(nn.relu(h)))
        >>> params = MLP().init(jax.random.key(0), jnp.ones((1, 128)))["params"]
        >>> variables, report = convert_params(params, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=8),
        ...                                    rng=jax.random.key(1))
        >>> report.paths, report.skipped
        (('up', 'down'), (('head', "output head (named 'head')"),))
        >>> sorted(variables["params"]["up"]), variables["frozen"]["up"]["kernel"].shape
        (['bias', 'lora_a', 'lora_b'], (128, 256))
        >>> report.bytes_before, report.bytes_after  # float32 kernels -> NF4 (double quant) + adapters
        (262144, 58392)
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected the 'params' collection as a dict or FrozenDict, got "
                        f"{type(params).__name__}")
    if quant is not None and not isinstance(quant, QuantConfig):
        raise TypeError(f"quant: expected a QuantConfig or None, got {type(quant).__name__}")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise TypeError(f"lora: expected a LoraConfig or None, got {type(lora).__name__}")
    if quant is None and lora is None:
        raise ValueError("convert_params: quant and lora are both None; nothing to do")
    if lora is not None and not _is_key(rng):
        raise TypeError(f"rng: a PRNG key is needed to initialise the adapters, got {type(rng).__name__}")
    tree = _copy(params)
    if isinstance(tree.get("params"), Mapping):
        raise ValueError(f"params: got a variables dict (top-level key 'params', keys {sorted(tree)}); pass "
                         "variables['params'] of the unconverted model")
    layers = _dense_in_params(tree) if layers is None else _check_layers(tree, layers)
    heads = _find_heads(tree, layers)
    targets = dense_targets(lora.targets, products, [d.path for d in layers]) if lora is not None else None
    adapted = _match_targets(targets, tree, layers, heads) if targets is not None else []
    adapted_paths = {d.path for d in adapted}
    quantized = {d.path for d in layers if d.path not in heads and d.unsupported is None} | adapted_paths \
        if quant is not None else set()
    plan = [d for d in layers if d.path in adapted_paths or d.path in quantized]
    for d in plan:  # every check before the first change
        _check_layer(tree, d, quant if d.path in quantized else None)
    if lora is not None:
        check_weight_init(lora, quant)

    frozen: dict[str, Any] = {}
    rows = []
    for i, d in enumerate(plan):
        node = _lookup(tree, d.path.split("/"))
        kernel = node.pop("kernel")
        init = None  # PiSSA / OLoRA / LoftQ: factors and the residual base from the float kernel
        if d.path in adapted_paths and lora.weight_init:
            init = weight_init_kernel(jnp.asarray(kernel), contract_axes=tuple(range(d.n_in)),
                                      kernel_ndim=len(d.layer_shape), lora=lora,
                                      quant=quant if d.path in quantized else None, key=jax.random.fold_in(rng, i))
            stored = init[2]
        else:
            stored = _quantize(jnp.asarray(kernel), d, quant) if d.path in quantized else kernel
        _lookup(frozen, d.path.split("/"), create=True)["kernel"] = stored
        after = stored.nbytes if isinstance(stored, QuantizedArray) else int(stored.nbytes)
        lora_params = 0
        if d.path in adapted_paths:
            a, b = init[:2] if init is not None else init_lora(
                jax.random.fold_in(rng, i), d.in_size, d.out_size, lora.rank, init=lora.init, stack_shape=d.stack_shape)
            in_shape, out_shape = d.layer_shape[: d.n_in], d.layer_shape[d.n_in:]
            node["lora_a"] = a.reshape(*d.stack_shape, *in_shape, lora.rank)  # [*stack, *in, r]
            node["lora_b"] = b.reshape(*d.stack_shape, lora.rank, *out_shape)  # [*stack, r, *out]
            lora_params = int(a.size + b.size)
            after += int(a.nbytes + b.nbytes)
            if lora.use_dora:  # DoRA's magnitude: the weight's norm per output (dequantized kernel), as PEFT
                node["lora_magnitude_vector"] = m = dora_norm(
                    stored, node["lora_a"], node["lora_b"], lora.scale, tuple(range(d.n_in)),
                    stack_shape=d.stack_shape).astype(node["lora_a"].dtype)  # [*stack, *out]
                lora_params += int(m.size)
                after += int(m.nbytes)
        rows.append(ReplacedLayer(
            path=d.path, layer=("QLoRA" if d.path in adapted_paths else "Quant") + d.kind,
            kernel_shape=d.kernel_shape, quantized=d.path in quantized, base_params=int(math.prod(d.kernel_shape)),
            lora_params=lora_params, bytes_before=int(kernel.nbytes), bytes_after=int(after)))
    skipped = [(path, reason) for path, reason in heads.items() if path not in adapted_paths]
    skipped += [(d.path, d.unsupported) for d in layers if d.unsupported is not None]
    product_rows, product_skipped, _ = convert_products(tree, frozen, products, quant=quant, lora=lora, rng=rng)
    rows += product_rows  # params multiplied inside other modules (product_params)
    skipped += product_skipped
    return {"params": tree, FROZEN: frozen}, QLoRAReport(layers=tuple(rows), skipped=tuple(skipped))


# -- finding the layers -----------------------------------------------------------------------


def _copy(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the nested mappings (leaves shared), as plain dicts."""
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _lookup(tree: dict[str, Any], path: Sequence[str], create: bool = False) -> Any:
    node = tree
    for key in path:
        if create:
            node = node.setdefault(key, {})
        else:
            node = node[key]
    return node


def _leaf_nodes(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, Mapping[str, Any]]:
    """`{path: node}` for every node that directly holds arrays (a module's own params), in tree order."""
    out = {}
    if prefix and any(not isinstance(v, Mapping) for v in tree.values()):
        out["/".join(prefix)] = tree
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_leaf_nodes(v, (*prefix, str(k))))
    return out


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _dense_in_params(tree: Mapping[str, Any]) -> list[DenseLayer]:
    """Nodes holding exactly a 2-D float `kernel` and optionally a bias `[out]`: `nn.Dense` layers."""
    layers = []
    for path, node in _leaf_nodes(tree).items():
        kernel = node.get("kernel")
        if not _is_array(kernel) or kernel.ndim != 2 or set(node) - {"kernel", "bias"}:
            continue
        if np.dtype(kernel.dtype) not in FLOAT_DTYPES:
            continue
        bias = node.get("bias")
        if bias is not None and not (_is_array(bias) and tuple(bias.shape) == (kernel.shape[1],)):
            continue
        layers.append(DenseLayer(path, "Dense", tuple(int(d) for d in kernel.shape)))
    return layers


def _check_layers(tree: Mapping[str, Any], layers: Sequence[DenseLayer]) -> list[DenseLayer]:
    layers = list(layers)
    for d in layers:
        if not isinstance(d, DenseLayer):
            raise TypeError(f"layers: expected DenseLayer entries (from dense_layers), got {type(d).__name__}")
        try:
            kernel = _lookup(tree, d.path.split("/"))["kernel"]
        except (KeyError, TypeError):
            raise ValueError(f"layers: {d.path} has no kernel in params; were the layers found on another "
                             "model?") from None
        if not _is_array(kernel) or tuple(kernel.shape) != d.kernel_shape:
            raise ValueError(f"layers: {d.path}/kernel has shape {tuple(getattr(kernel, 'shape', ()))} in params, "
                             f"but dense_layers found {d.kernel_shape}")
    return layers


def _find_heads(tree: Mapping[str, Any], layers: list[DenseLayer]) -> dict[str, str]:
    """Output heads among `layers`, as `{path: reason}` (see `convert_params`)."""
    heads = {d.path: f"output head (named {d.name!r})" for d in layers if d.name in HEAD_NAMES}
    if heads:
        return heads
    vocab = {int(node["embedding"].shape[0]) for node in _leaf_nodes(tree).values()
             if set(node) == {"embedding"} and _is_array(node["embedding"]) and node["embedding"].ndim == 2}
    candidates = [d for d in layers if not d.stack_shape and d.out_size in vocab and d.out_size != d.in_size]
    if not candidates:
        return {}
    last = candidates[-1]
    return {last.path: f"output head (out={last.out_size} is an embedding's vocabulary size)"}


def _match_targets(targets: str | tuple[str, ...], tree: Mapping[str, Any], layers: list[DenseLayer],
                   heads: dict[str, str]) -> list[DenseLayer]:
    """The layers selected by `LoraConfig.targets`; errors list the available Dense paths."""
    available = "available Dense paths: " + (", ".join(d.path for d in layers) or "(none)")
    if targets == ALL_LINEAR:
        chosen = [d for d in layers if d.path not in heads and d.unsupported is None]
        if not chosen:
            raise ValueError(f"LoraConfig.targets: 'all-linear' matches no Dense layer (output heads excluded); "
                             f"{available}")
        return chosen
    by_path = {d.path: d for d in layers}
    nodes = _leaf_nodes(tree)
    candidates = list(dict.fromkeys([*by_path, *nodes]))  # Dense layers, then every module holding params
    if isinstance(targets, str):
        pattern = re.compile(targets)
        matched = [p for p in candidates if pattern.fullmatch(p)]
        if not matched:
            raise ValueError(f"LoraConfig.targets: regex {targets!r} matches no layer path (re.fullmatch on "
                             f"'/'-joined paths); {available}")
    else:
        matched = []
        for target in targets:
            hits = [p for p in candidates if p.rsplit("/", 1)[-1] == target]
            if not hits:
                raise ValueError(f"LoraConfig.targets: no layer is named {target!r} (names match the last path "
                                 f"component); {available}")
            matched += hits
    chosen = []
    for path in dict.fromkeys(matched):
        if path not in by_path:
            raise ValueError(f"LoraConfig.targets: {path} is not a Dense layer (its params: "
                             f"{', '.join(sorted(map(str, nodes[path])))}); convert_params supports "
                             f"{', '.join('nn.' + t.__name__ for t in SUPPORTED_MODULES)}; {available}")
        if by_path[path].unsupported is not None:
            raise ValueError(f"LoraConfig.targets: {path} cannot be converted: {by_path[path].unsupported}")
        chosen.append(by_path[path])
    return chosen


# -- converting ------------------------------------------------------------------------------


def _check_layer(tree: Mapping[str, Any], d: DenseLayer, quant: QuantConfig | None) -> None:
    node = _lookup(tree, d.path.split("/"))
    kernel = node["kernel"]
    if isinstance(kernel, nn.meta.AxisMetadata):
        raise TypeError(f"{d.path}: the kernel is boxed ({type(kernel).__name__}); unbox the params first "
                        "(nn.meta.unbox)")
    if not _is_array(kernel) or np.dtype(kernel.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{d.path}: kernel {type(kernel).__name__} {getattr(kernel, 'dtype', '')} cannot be "
                         "converted; expected a float32, bfloat16 or float16 array")
    if any(k in node for k in ("lora_a", "lora_b", "lora_magnitude_vector")):
        raise ValueError(f"{d.path}: already has adapters; convert_params takes the params of an unconverted model")


def _quantize(kernel: jax.Array, d: DenseLayer, quant: QuantConfig) -> QuantizedArray:
    """One `QuantizedArray` per layer, stacked along `d.stack_shape` (slicing gives each layer's own)."""
    axes = tuple(range(d.n_in))
    if not d.stack_shape:
        return quantize(kernel, quant.fmt, quant.block_size, quant.double_quant, contract_axes=axes)
    flat = kernel.reshape(-1, *d.layer_shape)  # [layers, *in, *out]
    qs = [quantize(flat[i], quant.fmt, quant.block_size, quant.double_quant, contract_axes=axes)
          for i in range(flat.shape[0])]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves).reshape(*d.stack_shape, *leaves[0].shape), *qs)


def _is_key(rng: Any) -> bool:
    if not _is_array(rng):
        return False
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return True
    return np.dtype(rng.dtype) == np.uint32 and tuple(rng.shape) == (2,)

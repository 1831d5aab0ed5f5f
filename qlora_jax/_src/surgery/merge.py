"""`merge_lora` and `unmerge_lora`: fold the adapters into float kernels, and undo it exactly.

PEFT merges into a 4-bit layer by dequantizing, adding `s·B@A` and quantizing
again, which changes the model's outputs (users report quality loss:
peft#1043, transformers#31293); the safe export merges into a 16/32-bit copy
of the base weights. So merging here always gives float kernels,
`W = dequantize(codes) + s · A ⊗ B` (DoRA: scaled per output by
`m / ‖W‖`), in plain Flax layers (`nnx.Linear`, `nnx.LinearGeneral`,
`nnx.Einsum`). Re-quantizing happens only when asked
(`requantize=QuantConfig(...)`), and `merge_report` gives the error it adds
per layer.

`merge_lora` changes the model in place and returns it, as a Flax
transformation does. What undoing it needs (the packed codes and adapters,
which a merged model no longer holds) is the model as it was: the caller
keeps `original = nnx.clone(model)` before merging (it shares the arrays, so
it costs no memory until `merge_lora` replaces layers), and
`unmerge_lora(model, original)` puts those layers back bit for bit instead of
re-quantizing a float weight.

`merged_kernel` is the one implementation of the merged kernel, used by
`merge_lora`, `unmerge_lora`, `merge_report` and `save_merged`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from qlora_jax._src.config import QuantConfig
from qlora_jax._src.formats.blockwise import FLOAT_DTYPES, dequantize
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.nn import (
    FROZEN_LAYERS,
    QLORA_LAYERS,
    QuantEinsum,
    QuantLinear,
    QuantLinearGeneral,
)
from qlora_jax._src.nn.adapters import active_adapter, set_adapter
from qlora_jax._src.surgery.apply import quantize_kernel
from qlora_jax._src.surgery.intercept import QuantProduct, is_product_layer
from qlora_jax._src.surgery.targets import child, node_aliases, path_str, replace_node

__all__ = ["MergedLayer", "MergeReport", "merge_lora", "merge_report", "merged_kernel", "unmerge_lora"]

# What each frozen layer becomes when merged into a float kernel.
_PLAIN = {QuantLinear: nnx.Linear, QuantLinearGeneral: nnx.LinearGeneral, QuantEinsum: nnx.Einsum}


@dataclasses.dataclass(frozen=True)
class MergedLayer:
    """One layer that `merge_lora` replaced, and what it was.

    Example:
        >>> from flax import nnx
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig, apply_qlora, merge_lora, merge_report
        >>> model = apply_qlora(nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0))), quant=QuantConfig(),
        ...                     lora=LoraConfig(rank=2, targets=["0"]), rngs=nnx.Rngs(1))
        >>> original = nnx.clone(model)
        >>> row = merge_report(merge_lora(model), original).layers[0]
        >>> row.path, row.layer, row.merged, row.kernel_shape, row.folded, row.dtype, row.requant_error
        ('layers/0', 'QLoRALinear', 'Linear', (64, 8), True, dtype('float32'), None)
    """

    path: str  # '/'-joined nnx path
    layer: str  # the type that was merged: "QLoRALinear", "QuantLinear", "QLoRAEinsum", ...
    merged: str  # the type installed: "Linear", "LinearGeneral", "Einsum", or with requantize "QuantLinear", ...
    kernel_shape: tuple[int, ...]  # (*stack, *kernel_shape of one layer)
    folded: bool  # whether an adapter s·A⊗B was folded in (False: a quantized-only layer, dequantized)
    dtype: np.dtype  # dtype of the merged float kernel (before any requantization)
    requant_error: float | None  # with requantize: ||dequantize(requantized) - merged||_F / ||merged||_F


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """What `merge_lora` did to a model, layer by layer (made by `merge_report`).

    Attributes:
        layers: One `MergedLayer` per replaced layer, in path order.

    Example:
        >>> from flax import nnx
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig, apply_qlora, merge_lora, merge_report
        >>> model = apply_qlora(nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0))), quant=QuantConfig(),
        ...                     lora=LoraConfig(rank=2, targets=["0"]), rngs=nnx.Rngs(1))
        >>> original = nnx.clone(model)
        >>> report = merge_report(merge_lora(model, requantize=QuantConfig(fmt="int8")), original)
        >>> report.paths, report.layers[0].merged, 0 < report.max_requant_error < 0.02
        (('layers/0',), 'QuantLinear', True)
    """

    layers: tuple[MergedLayer, ...]

    @property
    def paths(self) -> tuple[str, ...]:
        """Paths of the replaced layers."""
        return tuple(r.path for r in self.layers)

    @property
    def max_requant_error(self) -> float | None:
        """The largest per-layer relative RMS error of requantization, or None without requantize."""
        errors = [r.requant_error for r in self.layers if r.requant_error is not None]
        return max(errors) if errors else None

    def __str__(self) -> str:
        head = f"{'path':<40} {'layer':<18} {'merged into':<14} {'kernel':<20} {'folded':<6} {'dtype':<8} " \
               f"{'requant rel. RMS error':>22}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            err = "-" if r.requant_error is None else f"{r.requant_error:.3e}"
            lines.append(f"{r.path:<40} {r.layer:<18} {r.merged:<14} {str(r.kernel_shape):<20} "
                         f"{'yes' if r.folded else 'no':<6} {r.dtype.name:<8} {err:>22}")
        return "\n".join(lines)


def merge_lora(
    model: nnx.Module,
    *,
    requantize: QuantConfig | None = None,
    dtype: jnp.dtype | None = None,
    adapter_name: str | None = None,
) -> nnx.Module:
    """Folds every adapter into its base kernel **in place**; the result is a plain Flax model.

    Each `QLoRALinear` / `QLoRALinearGeneral` / `QLoRAEinsum` becomes an
    `nnx.Linear` / `nnx.LinearGeneral` / `nnx.Einsum` whose float kernel is
    `merged_kernel(layer)`, `W = dequantize(codes) + s · A ⊗ B` (computed in
    float32, then cast to the kernel dtype), with the same bias, compute dtype
    and precision. Layers quantized without an adapter (`QuantLinear`, ...)
    are dequantized the same way, so no `QuantizedWeight`, `FrozenWeight` or
    `nnx.LoRAParam` is left. The merged model computes what the QLoRA model
    computes in eval mode (no dropout), up to float rounding.

    Never re-quantizes silently: only with `requantize=QuantConfig(...)` are
    the merged kernels of the adapter layers quantized again (into
    `QuantLinear`, ... without adapters; layers that had no adapter keep their
    codes); `merge_report` gives the relative RMS error this adds per layer.

    To undo the merge, keep `original = nnx.clone(model)` before merging (it
    shares the arrays, so it costs no memory until layers are replaced) and
    call `unmerge_lora(model, original)`.

    Args:
        model: An NNX model with layers made by `apply_qlora` (or by hand);
            modified in place.
        requantize: Re-quantize the merged kernels with this config, or None
            for float kernels.
        dtype: Dtype of the merged float kernels; default each layer's
            original kernel dtype (`QuantizedArray.dtype`, or the frozen float
            kernel's dtype).
        adapter_name: Which loaded adapter to fold in (see `adapter_names`;
            PEFT's `merge_and_unload(adapter_names=[name])`); None: the active
            one. The others are dropped with the adapter layers.

    Returns:
        The same model object.

    Raises:
        ValueError: Nothing to merge (no layer over a frozen kernel; with
            `requantize`, no layer with an adapter), a `dtype` that is not a
            float dtype. Nothing is changed then.
        TypeError: Arguments of the wrong type.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig, apply_qlora, merge_lora
        >>> model = nnx.Sequential(nnx.Linear(128, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 10, rngs=nnx.Rngs(1)))
        >>> model = apply_qlora(model, quant=QuantConfig(), lora=LoraConfig(rank=4, targets=["0"]), rngs=nnx.Rngs(2))
        >>> model.layers[0].lora_b[...] = jnp.full((4, 64), 0.01)
        >>> x = jnp.ones((2, 128))
        >>> y = model(x)
        >>> model = merge_lora(model)
        >>> [type(layer).__name__ for layer in model.layers]  # layers/1 was quantized only: dequantized
        ['Linear', 'Linear']
        >>> bool(jnp.allclose(model(x), y, rtol=1e-5, atol=1e-5))
        True
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}")
    if requantize is not None and not isinstance(requantize, QuantConfig):
        raise TypeError(f"requantize: expected a QuantConfig or None, got {type(requantize).__name__}")
    if dtype is not None:
        try:
            checked = np.dtype(dtype)
        except TypeError:
            checked = None
        if checked not in FLOAT_DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not float32, bfloat16, float16 or None")
        dtype = checked
    found = [(tuple(p), m) for p, m in nnx.iter_modules(model) if p and isinstance(m, FROZEN_LAYERS)]
    targets = [(p, m) for p, m in found if isinstance(m, QLORA_LAYERS)] if requantize is not None else found
    if not targets:
        kinds = "layer with a LoRA adapter (QLoRALinear, QLoRALinearGeneral, QLoRAEinsum)" if requantize is not None \
            else "layer over a frozen kernel (QLoRALinear, QuantLinear, ... made by apply_qlora)"
        raise ValueError(f"merge_lora: the model has no {kinds}; nothing to merge"
                         + (f" (found only {', '.join(path_str(p) for p, _ in found)})" if found else ""))
    if adapter_name is not None and adapter_name != active_adapter(model):
        previous = set_adapter(model, adapter_name)  # moves arrays only; switched back if the merge fails
        try:
            return merge_lora(model, requantize=requantize, dtype=dtype)
        except BaseException:
            set_adapter(model, previous)
            raise
    new_layers = []
    for _, layer in targets:  # build everything before the first change
        w = merged_kernel(layer, dtype)  # [*stack, *kernel_shape]
        if requantize is None:
            new_layers.append(_plain_layer(layer, w))
        else:
            q = quantize_kernel(w, requantize, contract_axes=layer.contract_axes, kernel_ndim=len(layer.kernel_shape))
            new_layers.append(_quant_layer(layer, q, requantize))
    aliases = node_aliases(model)
    for (path, _), new in zip(targets, new_layers, strict=True):
        replace_node(model, path, new, aliases)
    return model


def unmerge_lora(model: nnx.Module, original: nnx.Module) -> nnx.Module:
    """Undoes `merge_lora` **in place**: puts the original layers back, packed codes bit for bit.

    `original` is the model as it was before merging, kept as
    `original = nnx.clone(model)`: the clone shares the arrays with the model
    (JAX arrays are immutable), so it costs no memory until `merge_lora`
    replaces layers, and then holds exactly what a merged model lacks, the
    packed codes and the adapters. Every frozen layer of `original` whose
    place in `model` holds what `merge_lora` installs for it (a plain Flax
    layer, or with `requantize` a `QuantLinear`, ... without adapter) is put
    back as a copy (nothing is re-quantized); layers `merge_lora` leaves alone
    are left alone.

    Each merged layer is checked first: its kernel must still be exactly what
    `merge_lora` installed (recomputed from `original` with `merged_kernel`,
    and re-quantized with the format, block size and double quantization of
    the installed kernel), since unmerging a kernel changed since (e.g.
    trained) would silently drop the change. The bias, a trainable
    `nnx.Param` in both forms, is taken from the merged layer.

    Args:
        model: The model `merge_lora` returned (or one with the same structure
            and merged layers).
        original: The model before merging, e.g. `nnx.clone(model)` taken
            before `merge_lora(model)`. Not modified.

    Returns:
        The same model object, with the original layers back.

    Raises:
        ValueError: A layer of `original` missing from `model` or of a type
            that is neither the original nor the merged one, a kernel that
            differs from the merged one (naming the layer path), or no merged
            layer at all. Nothing is changed then.
        TypeError: `model` or `original` is not an `nnx.Module`.

    Example:
        >>> from flax import nnx
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig, apply_qlora, merge_lora, unmerge_lora
        >>> model = apply_qlora(nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0))), quant=QuantConfig(),
        ...                     lora=LoraConfig(rank=2, targets=["0"]), rngs=nnx.Rngs(1))
        >>> codes = model.layers[0].kernel.get_value().codes
        >>> original = nnx.clone(model)  # shares the arrays: what unmerge_lora puts back
        >>> model = merge_lora(model)
        >>> model = unmerge_lora(model, original)
        >>> type(model.layers[0]).__name__, bool((model.layers[0].kernel.get_value().codes == codes).all())
        ('QLoRALinear', True)
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}")
    if not isinstance(original, nnx.Module):
        raise TypeError(f"original: expected the model before merging (an nnx.Module, e.g. nnx.clone(model)), "
                        f"got {type(original).__name__}")
    restored = []
    for path, layer, node in _merged_layers(model, original):
        _check_unchanged(path, layer, node)
        layer = nnx.clone(layer)
        node_bias = None if isinstance(node, nnx.Variable) else node.bias  # a product's parameter has no bias
        if (node_bias is None) != (layer.bias is None):
            raise ValueError(f"{path_str(path)}: the merged layer {'has no' if node_bias is None else 'has a'} bias, "
                             "the original the opposite")
        if node_bias is not None:
            bias = node_bias[...]
            if tuple(bias.shape) != tuple(layer.bias.shape):
                raise ValueError(f"{path_str(path)}: bias shape {tuple(bias.shape)} differs from the original "
                                 f"{tuple(layer.bias.shape)}")
            layer.bias[...] = bias
        restored.append((path, layer))
    aliases = node_aliases(model)
    for path, layer in restored:
        replace_node(model, path, layer, aliases)
    return model


def merge_report(model: nnx.Module, original: nnx.Module) -> MergeReport:
    """What `merge_lora` did to `model`: one row per replaced layer, with the requantization error.

    Compares the merged `model` with `original`, the model before merging
    (`nnx.clone(model)`, as for `unmerge_lora`). For a re-quantized layer the
    row's `requant_error` is `‖dequantize(requantized) − W‖_F / ‖W‖_F`
    (float32), with `W = merged_kernel(original layer)` in the dtype the
    requantized kernel records; a float merge has None. Reads both models,
    changes neither.

    Args:
        model: The model `merge_lora` returned.
        original: The model before merging.

    Returns:
        A `MergeReport` (`str(report)` is a table).

    Raises:
        ValueError: As `unmerge_lora`, for a layer that is neither the
            original nor the merged one, or no merged layer.
        TypeError: `model` or `original` is not an `nnx.Module`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig, apply_qlora, merge_lora, merge_report
        >>> model = nnx.Sequential(nnx.Linear(128, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 10, rngs=nnx.Rngs(1)))
        >>> model = apply_qlora(model, quant=QuantConfig(), lora=LoraConfig(rank=4, targets=["0"]), rngs=nnx.Rngs(2))
        >>> original = nnx.clone(model)
        >>> report = merge_report(merge_lora(model), original)
        >>> [(r.path, r.layer, r.merged, r.folded) for r in report.layers]  # layers/1 was quantized only
        [('layers/0', 'QLoRALinear', 'Linear', True), ('layers/1', 'QuantLinear', 'Linear', False)]
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}")
    if not isinstance(original, nnx.Module):
        raise TypeError(f"original: expected the model before merging (an nnx.Module), got {type(original).__name__}")
    rows = []
    for path, layer, node in _merged_layers(model, original):
        kernel = node.get_value() if isinstance(node, nnx.Variable) else node.kernel.get_value()
        dtype, error = np.dtype(kernel.dtype), None
        if isinstance(kernel, QuantizedArray):
            error = float(_relative_rms_error(kernel, merged_kernel(layer, dtype)))
        rows.append(MergedLayer(path=path_str(path), layer=type(layer).__name__, merged=type(node).__name__,
                                kernel_shape=(*layer.stack_shape, *layer.kernel_shape),
                                folded=isinstance(layer, QLORA_LAYERS), dtype=dtype, requant_error=error))
    return MergeReport(layers=tuple(rows))


def merged_kernel(layer: nnx.Module, dtype: jnp.dtype | None = None, *, index: int | None = None) -> jax.Array:
    """The merged float kernel of a frozen layer: `dequantize(base) + s · A ⊗ B`, `[*stack, *kernel_shape]`.

    For a DoRA layer (with a `lora_magnitude_vector` m), PEFT's DoRA merge:
    `m / ‖W + s·A ⊗ B‖ ⊙ (W + s·A ⊗ B)`, the norm per output over the input
    axes, formed in float32 before the cast.

    The one implementation of PEFT's merge `W + s·(B@A)` (in Flax layout
    `W + s · A @ B`), used by `merge_lora` and `save_merged`: the base is
    dequantized to float32 (`codebook[code] · absmax`), `A ⊗ B` (A
    `[*in, r]`, B `[r, *out]`) is a float32 product at `Precision.HIGHEST`
    transposed from `(*in, *out)` to kernel order, the sum `W + s · A ⊗ B` is
    formed in float32 and cast to `dtype` once. A layer without an adapter
    gives its dequantized kernel. A stacked layer is merged one entry at a
    time by one jitted function, so its kernels are bit-identical whether
    taken whole or entry by entry (`index`), and deterministic, which
    `unmerge_lora` relies on to recognise an unchanged merged kernel.

    Args:
        layer: A `QuantLinear`, `QuantLinearGeneral`, `QuantEinsum` or one of
            their QLoRA subclasses (quantized or frozen float kernel).
        dtype: Dtype of the result; default the layer's kernel dtype
            (`QuantizedArray.dtype`, or the frozen float kernel's).
        index: For a layer stacked along one axis, the entry to merge
            (`[*kernel_shape]`); None merges every entry.

    Returns:
        `[*stack, *kernel_shape]` (or `[*kernel_shape]` with `index`) in `dtype`.

    Raises:
        ValueError: An `index` out of range or for a layer not stacked along exactly one axis.

    Example:
        >>> import jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> from qlora_jax._src.nn import QLoRALinear
        >>> layer = QLoRALinear(qj.quantize(jnp.ones((64, 4)), "nf4"), lora=qj.LoraConfig(rank=2, alpha=4),
        ...                     rngs=nnx.Rngs(0))
        >>> layer.lora_a[...], layer.lora_b[...] = jnp.ones((64, 2)), jnp.ones((2, 4))
        >>> float(merged_kernel(layer)[0, 0])  # 1 + 2 * (1 * 1 + 1 * 1)
        5.0
    """
    kernel = layer.kernel.get_value()
    dtype = np.dtype(kernel.dtype if dtype is None else dtype)
    m = None
    if isinstance(layer, QLORA_LAYERS):
        a, b, scale = layer.lora_a[...], layer.lora_b[...], float(layer.scale)
        if layer.lora_magnitude_vector is not None:
            m = layer.lora_magnitude_vector[...]
    else:
        a = b = None
        scale = 0.0
    stack = tuple(layer.stack_shape)
    merge = functools.partial(_merged_entry, kernel, a, b, m, scale=scale, contract_axes=tuple(layer.contract_axes),
                              n_stack=len(stack), dtype=dtype)
    if index is not None:
        if len(stack) != 1 or not -stack[0] <= int(index) < stack[0]:
            raise ValueError(f"index: {index} does not pick an entry of a layer stacked as {stack}")
        return merge(jnp.asarray([int(index) % stack[0]], jnp.int32))
    if not stack:
        return merge(jnp.zeros((0,), jnp.int32))
    entries = [merge(jnp.asarray(i, jnp.int32)) for i in np.ndindex(*stack)]  # [*kernel_shape] each
    return jnp.stack(entries).reshape(*stack, *entries[0].shape)


@functools.partial(jax.jit, static_argnames=("scale", "contract_axes", "n_stack", "dtype"))
def _merged_entry(kernel, a, b, m, index, *, scale: float, contract_axes: tuple[int, ...], n_stack: int,
                  dtype: np.dtype) -> jax.Array:
    """One entry `index` (`[n_stack]` int32) of a stacked layer's merged kernel, `[*kernel_shape]`."""
    def pick(x):
        return x[tuple(index[i] for i in range(n_stack))]

    kernel = jax.tree.map(pick, kernel)
    w = dequantize(kernel, jnp.float32) if isinstance(kernel, QuantizedArray) else kernel.astype(jnp.float32)
    if a is None:
        return w.astype(dtype)
    a, b = pick(a).astype(jnp.float32), pick(b).astype(jnp.float32)  # [*in, r], [r, *out]
    in_shape, rank, out_shape = a.shape[:-1], a.shape[-1], b.shape[1:]
    delta = jnp.matmul(a.reshape(math.prod(in_shape), rank), b.reshape(rank, math.prod(out_shape)),
                       precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)  # [in, out]
    delta = delta.reshape(*in_shape, *out_shape)
    other = [i for i in range(w.ndim) if i not in contract_axes]
    order = np.argsort([*contract_axes, *other])  # (*in, *out) -> kernel order
    delta = jnp.transpose(delta, tuple(int(i) for i in order))
    w = w + delta * np.float32(scale)
    if m is not None:  # DoRA (PEFT's merge): m / ‖W + s·ΔW‖ per output, the norm over the input axes
        norm = jnp.sqrt(jnp.sum(w * w, axis=contract_axes, keepdims=True))  # [*kernel_shape], 1 on the input axes
        w = w * (jnp.expand_dims(pick(m).astype(jnp.float32), contract_axes) / norm)
    return w.astype(dtype)


@jax.jit
def _relative_rms_error(q: QuantizedArray, w: jax.Array) -> jax.Array:
    w = w.astype(jnp.float32)
    err = dequantize(q, jnp.float32) - w
    return jnp.sqrt(jnp.sum(err * err) / jnp.sum(w * w))


def _merged_layers(model: nnx.Module, original: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module, nnx.Module]]:
    """`(path, original layer, merged layer)` for every frozen layer of `original` that `model` holds merged."""
    merged = []
    for path, layer in nnx.iter_modules(original):
        if not path or not isinstance(layer, FROZEN_LAYERS):
            continue
        path = tuple(path)
        try:
            node = model
            for key in path:
                node = child(node, key)
        except (AttributeError, KeyError, IndexError, TypeError):
            raise ValueError(f"{path_str(path)}: not found in the model; unmerge_lora and merge_report take the "
                             "model merge_lora returned and the model before merging") from None
        base = next(t for t in _PLAIN if isinstance(layer, t))  # QuantLinear, QuantLinearGeneral or QuantEinsum
        plain = _PLAIN[base]
        if is_product_layer(layer):  # a parameter multiplied inside a module: merged back into an nnx.Param
            base, plain = QuantProduct, nnx.Param
        if type(node) is type(layer):
            continue  # left alone (with requantize, a layer without adapter)
        requantized = isinstance(layer, QLORA_LAYERS) and type(node) is base
        if type(node) is not plain and not requantized:
            installed = plain.__name__ + (f" or {base.__name__}" if isinstance(layer, QLORA_LAYERS) else "")
            raise ValueError(f"{path_str(path)}: expected the {installed} that merge_lora installs for a "
                             f"{type(layer).__name__}, or that {type(layer).__name__}, found a {type(node).__name__}")
        merged.append((path, layer, node))
    if not merged:
        raise ValueError("no layer of the original model is merged in the model; expected the model merge_lora "
                         "returned and the model before merging (nnx.clone(model) taken before merge_lora)")
    return merged


def _plain_layer(layer: nnx.Module, w: jax.Array) -> nnx.Module | nnx.Param:
    """The Flax layer computing what `layer` computes (eval mode) with the merged kernel `w`; for a parameter
    multiplied inside a module (`QuantProduct`, `QLoRAProduct`), the `nnx.Param` its module multiplies again."""
    if is_product_layer(layer):
        return nnx.Param(w)
    bias = layer.bias[...] if layer.bias is not None else None
    common = dict(use_bias=bias is not None, dtype=layer.dtype, param_dtype=w.dtype, precision=layer.precision)
    if isinstance(layer, QuantLinear):
        def make():
            return nnx.Linear(layer.in_features, layer.out_features, **common, rngs=nnx.Rngs(0))
    elif isinstance(layer, QuantLinearGeneral):
        def make():
            return nnx.LinearGeneral(layer.in_features, layer.out_features, axis=layer.axis, **common,
                                     rngs=nnx.Rngs(0))
    else:
        del common["use_bias"]

        def make():
            return nnx.Einsum(layer.einsum_str, layer.kernel_shape, layer.bias_shape, **common, rngs=nnx.Rngs(0))
    new = nnx.eval_shape(make)  # the module structure without initializing a kernel
    new.kernel = nnx.Param(w)
    if bias is not None:
        new.bias = nnx.Param(bias)
    return new


def _quant_layer(layer: nnx.Module, q: QuantizedArray, cfg: QuantConfig) -> nnx.Module:
    """A frozen layer without adapter over the re-quantized kernel `q`."""
    bias = layer.bias[...] if layer.bias is not None else None
    dtype = cfg.compute_dtype if cfg.compute_dtype is not None else layer.dtype
    if isinstance(layer, QuantLinear):
        return QuantLinear(q, bias, dtype=dtype, precision=layer.precision)
    if isinstance(layer, QuantLinearGeneral):
        return QuantLinearGeneral(q, bias, axis=layer.axis, dtype=dtype, precision=layer.precision)
    if is_product_layer(layer):
        new = QuantProduct(layer.einsum_str, q, dtype=dtype, precision=layer.precision)
        new.param_path, new.owner_type = layer.param_path, layer.owner_type
        return new
    return QuantEinsum(layer.einsum_str, q, bias, dtype=dtype, precision=layer.precision)


def _check_unchanged(path: tuple[Any, ...], layer: nnx.Module, node: nnx.Module) -> None:
    """Raises unless `node`'s kernel is exactly the one `merge_lora` installs for the original `layer`."""
    current = node.get_value() if isinstance(node, nnx.Variable) else node.kernel.get_value()
    expected = merged_kernel(layer, current.dtype)
    if isinstance(current, QuantizedArray):  # requantized: with the installed kernel's own format
        requantize = QuantConfig(fmt=current.fmt, block_size=current.block_size, double_quant=current.double_quant)
        expected = quantize_kernel(expected, requantize, contract_axes=layer.contract_axes,
                                   kernel_ndim=len(layer.kernel_shape))
        same = current.contract_axes == expected.contract_axes \
            and jax.tree.structure(current) == jax.tree.structure(expected) \
            and all(a.shape == b.shape and bool(jnp.array_equal(a, b))
                    for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(expected), strict=True))
        detail = "its packed codes or scales differ"
    else:
        same = tuple(current.shape) == tuple(expected.shape) and bool(jnp.array_equal(current, expected))
        detail = f"shape {tuple(current.shape)} vs {tuple(expected.shape)}"
        if tuple(current.shape) == tuple(expected.shape):
            diff = jnp.max(jnp.abs(current.astype(jnp.float32) - expected.astype(jnp.float32)))
            detail = f"max |difference| {float(diff):.3g}"
    if not same:
        raise ValueError(f"{path_str(path)}: its kernel is not the one merge_lora installed ({detail}); it was "
                         "changed after merging (e.g. trained), and unmerge_lora would silently drop that change")

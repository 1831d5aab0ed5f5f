"""`merge_lora` and `unmerge_lora`: fold the adapters into float kernels, and undo it exactly.

PEFT merges into a 4-bit layer by dequantizing, adding `s·B@A` and quantizing
again, which changes the model's outputs (users report quality loss:
peft#1043, transformers#31293); the safe export merges into a 16/32-bit copy
of the base weights. So merging here always gives float kernels,
`W = dequantize(codes) + s · A ⊗ B`, in plain Flax layers (`nnx.Linear`,
`nnx.LinearGeneral`, `nnx.Einsum`). Re-quantizing happens only when asked
(`requantize=QuantConfig(...)`), and the error it adds is measured and
reported per layer. The original packed codes and adapters stay in the
report, so `unmerge_lora` restores them bit for bit instead of re-quantizing
a float weight.
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
from qlora_jax._src.surgery.apply import quantize_kernel
from qlora_jax._src.surgery.targets import child, node_aliases, path_str, replace_node

__all__ = ["MergedLayer", "MergeReport", "merge_lora", "unmerge_lora"]

# What each frozen layer becomes when merged into a float kernel.
_PLAIN = {QuantLinear: "Linear", QuantLinearGeneral: "LinearGeneral", QuantEinsum: "Einsum"}


@dataclasses.dataclass(frozen=True)
class MergedLayer:
    """One layer that `merge_lora` replaced, and what it was.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig, apply_qlora, merge_lora
        >>> model = apply_qlora(nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0))), quant=QuantConfig(),
        ...                     lora=LoraConfig(rank=2, targets=["0"]), rngs=nnx.Rngs(1))
        >>> model, report = merge_lora(model)
        >>> row = report.layers[0]
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
    original: nnx.Module = dataclasses.field(repr=False, compare=False)  # the layer before merging
    key: tuple[Any, ...] = dataclasses.field(repr=False, compare=False)  # the nnx path


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """What `merge_lora` did; also what `unmerge_lora` needs to undo it.

    Holds the original layers (packed codes, adapters), so keeping the report
    keeps them in memory; drop it once the merge need not be undone.

    Attributes:
        layers: One `MergedLayer` per replaced layer, in path order.
        requantize: The `QuantConfig` the merged kernels were re-quantized
            with, or None (float kernels).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig, apply_qlora, merge_lora
        >>> model = apply_qlora(nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0))), quant=QuantConfig(),
        ...                     lora=LoraConfig(rank=2, targets=["0"]), rngs=nnx.Rngs(1))
        >>> _, report = merge_lora(model, requantize=QuantConfig(fmt="int8"))
        >>> report.paths, report.layers[0].merged, 0 < report.max_requant_error < 0.02
        (('layers/0',), 'QuantLinear', True)
    """

    layers: tuple[MergedLayer, ...]
    requantize: QuantConfig | None

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
) -> tuple[nnx.Module, MergeReport]:
    """Folds every adapter into its base kernel **in place**; the result is a plain Flax model.

    Each `QLoRALinear` / `QLoRALinearGeneral` / `QLoRAEinsum` becomes an
    `nnx.Linear` / `nnx.LinearGeneral` / `nnx.Einsum` whose float kernel is
    `W = dequantize(codes) + s · A ⊗ B` (computed in float32, then cast to
    the kernel dtype), with the same bias, compute dtype and precision.
    Layers quantized without an adapter (`QuantLinear`, ...) are dequantized
    the same way, so no `QuantizedWeight`, `FrozenWeight` or `nnx.LoRAParam`
    is left. The merged model computes what the QLoRA model computes in eval
    mode (no dropout), up to float rounding.

    Never re-quantizes silently: only with `requantize=QuantConfig(...)` are
    the merged kernels of the adapter layers quantized again (into
    `QuantLinear`, ... without adapters; layers that had no adapter keep their
    codes), and each row of the report gives the relative RMS error this
    adds, `‖dequantize(requantized) − W‖_F / ‖W‖_F` (float32).

    Args:
        model: An NNX model with layers made by `apply_qlora` (or by hand);
            modified in place.
        requantize: Re-quantize the merged kernels with this config, or None
            for float kernels.
        dtype: Dtype of the merged float kernels; default each layer's
            original kernel dtype (`QuantizedArray.dtype`, or the frozen float
            kernel's dtype).

    Returns:
        `(model, report)`: the same model object, and a `MergeReport` that
        `unmerge_lora` takes to restore the original layers exactly.

    Raises:
        ValueError: Nothing to merge (no layer over a frozen kernel; with
            `requantize`, no layer with an adapter), a `dtype` that is not a
            float dtype, or (with `requantize`) a layer whose input size is
            not a multiple of `requantize.block_size` (naming its path).
        TypeError: Arguments of the wrong type.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig, apply_qlora, merge_lora
        >>> model = nnx.Sequential(nnx.Linear(128, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 10, rngs=nnx.Rngs(1)))
        >>> model = apply_qlora(model, quant=QuantConfig(), lora=LoraConfig(rank=4, targets=["0"]),
        ...                     rngs=nnx.Rngs(2))
        >>> model.layers[0].lora_b[...] = jnp.full((4, 64), 0.01)
        >>> x = jnp.ones((2, 128))
        >>> y = model(x)
        >>> model, report = merge_lora(model)
        >>> [(r.path, r.layer, r.merged, r.folded) for r in report.layers]  # layers/1 was quantized only
        [('layers/0', 'QLoRALinear', 'Linear', True), ('layers/1', 'QuantLinear', 'Linear', False)]
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
    if requantize is not None:
        for path, layer in targets:
            in_size = math.prod(layer.kernel_shape[a] for a in layer.contract_axes)
            if in_size % requantize.block_size:
                raise ValueError(f"{path_str(path)}: kernel shape {(*layer.stack_shape, *layer.kernel_shape)} has "
                                 f"input size {in_size}, which is not a multiple of requantize.block_size="
                                 f"{requantize.block_size}; use a smaller block_size")
    rows, new_layers = [], []
    for path, layer in targets:  # build everything before the first change
        out_dtype = dtype if dtype is not None else _kernel_dtype(layer)
        w = merged_kernel(layer, out_dtype)  # [*stack, *kernel_shape]
        error = None
        if requantize is None:
            new = _plain_layer(layer, w)
        else:
            q = quantize_kernel(w, requantize, contract_axes=layer.contract_axes, kernel_ndim=len(layer.kernel_shape))
            error = float(_relative_rms_error(q, w))
            new = _quant_layer(layer, q, requantize)
        new_layers.append(new)
        rows.append(MergedLayer(path=path_str(path), layer=type(layer).__name__, merged=type(new).__name__,
                                kernel_shape=(*layer.stack_shape, *layer.kernel_shape),
                                folded=isinstance(layer, QLORA_LAYERS), dtype=np.dtype(out_dtype),
                                requant_error=error, original=layer, key=path))
    aliases = node_aliases(model)
    for (path, _), new in zip(targets, new_layers, strict=True):
        replace_node(model, path, new, aliases)
    return model, MergeReport(layers=tuple(rows), requantize=requantize)


def unmerge_lora(model: nnx.Module, report: MergeReport) -> nnx.Module:
    """Undoes `merge_lora` **in place**: puts the original layers back, packed codes bit for bit.

    The restored layers are copies of those in `report` (the packed codes and
    adapters as they were when merged; nothing is re-quantized). Each merged
    layer is checked first: its kernel must still be exactly what
    `merge_lora` installed (recomputed from the report), since unmerging a
    kernel changed since (e.g. trained) would silently drop the change. The
    bias, a trainable `nnx.Param` in both forms, is taken from the merged layer.

    Args:
        model: The model `merge_lora` returned (or one with the same structure
            and merged layers).
        report: The `MergeReport` of that merge.

    Returns:
        The same model object, with the original layers back.

    Raises:
        ValueError: A merged layer missing or of another type, or a kernel that
            differs from the merged one (naming the layer path). Nothing is
            changed then.
        TypeError: `report` is not a `MergeReport`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig, apply_qlora, merge_lora, unmerge_lora
        >>> model = apply_qlora(nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0))), quant=QuantConfig(),
        ...                     lora=LoraConfig(rank=2, targets=["0"]), rngs=nnx.Rngs(1))
        >>> codes = model.layers[0].kernel.get_value().codes
        >>> model, report = merge_lora(model)
        >>> model = unmerge_lora(model, report)
        >>> type(model.layers[0]).__name__, bool((model.layers[0].kernel.get_value().codes == codes).all())
        ('QLoRALinear', True)
    """
    if not isinstance(report, MergeReport):
        raise TypeError(f"report: expected the MergeReport returned by merge_lora, got {type(report).__name__}")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}")
    restored = []
    for row in report.layers:
        try:
            node = model
            for key in row.key:
                node = child(node, key)
        except (AttributeError, KeyError, IndexError, TypeError):
            raise ValueError(f"{row.path}: not found in the model; unmerge_lora needs the model merge_lora "
                             "returned") from None
        if type(node).__name__ != row.merged or not hasattr(node, "kernel"):
            raise ValueError(f"{row.path}: expected the {row.merged} that merge_lora installed, found a "
                             f"{type(node).__name__}")
        _check_unchanged(row, node, report.requantize)
        layer = nnx.clone(row.original)
        if (node.bias is None) != (layer.bias is None):
            raise ValueError(f"{row.path}: the merged layer {'has no' if node.bias is None else 'has a'} bias, the "
                             "original the opposite")
        if node.bias is not None:
            bias = node.bias[...]
            if tuple(bias.shape) != tuple(layer.bias.shape):
                raise ValueError(f"{row.path}: bias shape {tuple(bias.shape)} differs from the original "
                                 f"{tuple(layer.bias.shape)}")
            layer.bias[...] = bias
        restored.append((row.key, layer))
    aliases = node_aliases(model)
    for path, layer in restored:
        replace_node(model, path, layer, aliases)
    return model


def merged_kernel(layer: nnx.Module, dtype: np.dtype | None = None) -> jax.Array:
    """`dequantize(base) + s · A ⊗ B` of a frozen layer, `[*stack, *kernel_shape]`, computed in float32.

    `A ⊗ B` (A `[*stack, *in, r]`, B `[*stack, r, *out]`) is transposed from
    `(*in, *out)` to kernel order; layers without an adapter give the
    dequantized kernel. Deterministic (one jitted function), which
    `unmerge_lora` relies on to recognise an unchanged merged kernel.

    Example:
        >>> import jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> from qlora_jax._src.nn import QLoRALinear
        >>> layer = QLoRALinear(qj.quantize(jnp.ones((64, 4)), "nf4"), rank=2, alpha=4, rngs=nnx.Rngs(0))
        >>> layer.lora_a[...], layer.lora_b[...] = jnp.ones((64, 2)), jnp.ones((2, 4))
        >>> float(merged_kernel(layer)[0, 0])  # 1 + 2 * (1 * 1 + 1 * 1)
        5.0
    """
    kernel = layer.kernel.get_value()
    if dtype is None:
        dtype = _kernel_dtype(layer)
    if isinstance(layer, QLORA_LAYERS):
        a, b, scale = layer.lora_a[...], layer.lora_b[...], float(layer.scale)
    else:
        a = b = None
        scale = 0.0
    return _merged(kernel, a, b, scale=scale, contract_axes=tuple(layer.contract_axes), dtype=np.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("scale", "contract_axes", "dtype"))
def _merged(kernel, a, b, *, scale: float, contract_axes: tuple[int, ...], dtype: np.dtype) -> jax.Array:
    w = dequantize(kernel, jnp.float32) if isinstance(kernel, QuantizedArray) else kernel.astype(jnp.float32)
    if a is None:
        return w.astype(dtype)
    n_stack = a.ndim - len(contract_axes) - 1  # a: [*stack, *in, r], b: [*stack, r, *out]
    n_k = w.ndim - n_stack  # rank of one layer's kernel
    stack, rank = a.shape[:n_stack], a.shape[-1]
    in_shape, out_shape = a.shape[n_stack:-1], b.shape[n_stack + 1:]
    a2 = a.astype(jnp.float32).reshape(*stack, math.prod(in_shape), rank)
    b2 = b.astype(jnp.float32).reshape(*stack, rank, math.prod(out_shape))
    delta = jnp.matmul(a2, b2, precision=lax.Precision.HIGHEST).reshape(*stack, *in_shape, *out_shape)
    other = [i for i in range(n_k) if i not in contract_axes]
    order = np.argsort([*contract_axes, *other])  # (*in, *out) -> kernel order
    delta = jnp.transpose(delta, (*range(n_stack), *(n_stack + int(i) for i in order)))
    return (w + delta * np.float32(scale)).astype(dtype)


@jax.jit
def _relative_rms_error(q: QuantizedArray, w: jax.Array) -> jax.Array:
    w = w.astype(jnp.float32)
    err = dequantize(q, jnp.float32) - w
    return jnp.sqrt(jnp.sum(err * err) / jnp.sum(w * w))


def _kernel_dtype(layer: nnx.Module) -> np.dtype:
    kernel = layer.kernel.get_value()
    return np.dtype(kernel.dtype)


def _plain_layer(layer: nnx.Module, w: jax.Array) -> nnx.Module:
    """The Flax layer computing what `layer` computes (eval mode) with the merged kernel `w`."""
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
    return QuantEinsum(layer.einsum_str, q, bias, dtype=dtype, precision=layer.precision)


def _check_unchanged(row: MergedLayer, node: nnx.Module, requantize: QuantConfig | None) -> None:
    """Raises unless `node`'s kernel is exactly the one `merge_lora` installed for `row`."""
    expected = merged_kernel(row.original, row.dtype)
    current = node.kernel.get_value()
    if requantize is not None:
        expected = quantize_kernel(expected, requantize, contract_axes=row.original.contract_axes,
                                   kernel_ndim=len(row.original.kernel_shape))
        same = isinstance(current, QuantizedArray) and jax.tree.structure(current) == jax.tree.structure(expected) \
            and all(a.shape == b.shape and bool(jnp.array_equal(a, b))
                    for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(expected), strict=True))
        detail = "its packed codes or scales differ"
    else:
        same = tuple(current.shape) == tuple(expected.shape) and current.dtype == expected.dtype \
            and bool(jnp.array_equal(current, expected))
        detail = f"shape {tuple(current.shape)} {current.dtype} vs {tuple(expected.shape)} {expected.dtype}"
        if tuple(current.shape) == tuple(expected.shape):
            diff = jnp.max(jnp.abs(current.astype(jnp.float32) - expected.astype(jnp.float32)))
            detail = f"max |difference| {float(diff):.3g}"
    if not same:
        raise ValueError(f"{row.path}: its kernel is not the one merge_lora installed ({detail}); it was changed "
                         "after merging (e.g. trained), and unmerge_lora would silently drop that change")

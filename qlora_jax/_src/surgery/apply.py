"""`apply_qlora`: turn the `nnx.Linear` layers of any NNX model into QLoRA layers, in place.

QLoRA (Dettmers et al., 2023) freezes the base model as 4-bit codes and trains
LoRA adapters on top. As bitsandbytes' `load_in_4bit`, every Linear except
the output head is quantized; the `LoraConfig.targets` get an adapter. All
checks run before the model is touched, so a failing call leaves it as it was.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax._src.formats.blockwise import quantize
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.nn.linear import QLoRALinear, QuantLinear
from qlora_jax._src.surgery.config import LoraConfig, QuantConfig
from qlora_jax._src.surgery.report import QLoRAReport, ReplacedLayer
from qlora_jax._src.surgery.targets import (
    LinearSite,
    child,
    find_heads,
    find_linears,
    match_targets,
    path_str,
    set_child,
    unsupported_reason,
)

__all__ = ["apply_qlora", "quantize_kernel"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


def apply_qlora(
    model: nnx.Module,
    *,
    quant: QuantConfig | None,
    lora: LoraConfig | None,
    rngs: nnx.Rngs | None = None,
) -> tuple[nnx.Module, QLoRAReport]:
    """Replaces the `nnx.Linear` layers of `model` **in place** and reports what changed.

    * With `quant` and `lora` (QLoRA): every Linear except the output head is
      quantized; the `lora.targets` become `QLoRALinear` (packed kernel +
      adapter), the others `QuantLinear`.
    * `quant=None`: plain LoRA, the float baseline; the targets become
      `QLoRALinear` over their float kernel (frozen, a `FrozenWeight`), the
      other layers are left as they are.
    * `lora=None`: quantization only; every Linear except the head becomes
      `QuantLinear`.

    The output head, excluded from "all-linear" and from quantization, is a
    Linear whose last path component is "lm_head", "head" or "output", or
    else the last Linear whose output size is an `nnx.Embed`'s vocabulary
    size. Embeddings and other layer types are never replaced. Layers stacked
    by `nnx.vmap` (kernel `[L, in, out]`, applied with `nnx.scan`) get a
    `QuantizedArray` with stack dims `(L,)` and adapters `[L, in, r]`,
    `[L, r, out]`; `nnx.remat` around the layers works unchanged.

    A fresh adapter has B = 0, so the model computes exactly what it did
    before (with `quant`, exactly what the quantized model computes).

    Args:
        model: Any NNX module; modified in place.
        quant: How to quantize the base kernels, or None for float LoRA. A
            quantized layer's input size must be a multiple of
            `quant.block_size`.
        lora: Where adapters go and how they behave, or None for quantization only.
        rngs: Draws the adapters (stream "params") and seeds dropout ("dropout");
            each falls back to "default". Required when `lora` is given.

    Returns:
        `(model, report)`: the same `model` object, and a `QLoRAReport` of the
        replaced layers (paths, kernel shapes, parameter counts, bytes before
        and after) and of the linear layers left alone.

    Raises:
        ValueError: Both configs None; a target that matches no layer, or a
            layer type that is not supported (the message lists the available
            Linear paths); an input size that is not a multiple of the block
            size, or a non-float kernel (naming the layer path and shape).
        TypeError: Arguments of the wrong type.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig, apply_qlora
        >>> class MLP(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.up = nnx.Linear(128, 256, rngs=rngs)
        ...         self.down = nnx.Linear(256, 128, rngs=rngs)
        ...         self.head = nnx.Linear(128, 10, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.head(self.down(jnp.tanh(self.up(x))))
        >>> model, report = apply_qlora(MLP(nnx.Rngs(0)), quant=QuantConfig(), lora=LoraConfig(rank=8),
        ...                             rngs=nnx.Rngs(1))
        >>> report.paths, type(model.up).__name__, type(model.head).__name__
        (('down', 'up'), 'QLoRALinear', 'Linear')
        >>> report.bytes_before, report.bytes_after  # float32 kernels -> NF4 (double quant) + float32 adapters
        (262144, 58392)
        >>> model(jnp.ones((2, 128))).shape
        (2, 10)
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}")
    if quant is not None and not isinstance(quant, QuantConfig):
        raise TypeError(f"quant: expected a QuantConfig or None, got {type(quant).__name__}")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise TypeError(f"lora: expected a LoraConfig or None, got {type(lora).__name__}")
    if quant is None and lora is None:
        raise ValueError("apply_qlora: quant and lora are both None; nothing to do")
    if lora is not None and not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs: an nnx.Rngs is needed to initialise the adapters, got {type(rngs).__name__}")

    sites, others = find_linears(model)
    heads = find_heads(model, sites)
    adapted = {s.name for s in match_targets(model, lora.targets, sites, heads)} if lora is not None else set()
    quantized = {s.name for s in sites if s.name not in heads} | adapted if quant is not None else set()
    plan = [s for s in sites if s.name in adapted or s.name in quantized]
    aliases = _aliases(model)
    for site in plan:  # every check before the first change
        _check_site(site, quant if site.name in quantized else None, aliases)

    new_layers, rows = [], []
    for site in plan:
        layer = _build_layer(site, quant if site.name in quantized else None,
                             lora if site.name in adapted else None, rngs)
        new_layers.append(layer)
        rows.append(_report_row(site, layer))
    for site, layer in zip(plan, new_layers, strict=True):
        for path in aliases.get(site.path, [site.path]):  # a shared layer stays shared
            parent = model
            for key in path[:-1]:
                parent = child(parent, key)
            set_child(parent, path[-1], layer)
    skipped = [(name, reason) for name, reason in heads.items() if name not in adapted]
    skipped += others
    return model, QLoRAReport(layers=tuple(rows), skipped=tuple(skipped))


def quantize_kernel(kernel: jax.Array, quant: QuantConfig) -> QuantizedArray:
    """Quantizes a Linear kernel `[*stack, in, out]` as one `QuantizedArray` per layer, stacked.

    Each `[in, out]` slice is quantized on its own (its own absmax blocks and,
    with double quantization, its own nested scales and offset), and the
    leaves are stacked, so that slicing the stack dims (as `nnx.scan` does)
    gives exactly the `QuantizedArray` of that layer.

    Args:
        kernel: Float kernel `[*stack, in, out]`.
        quant: The `QuantConfig`.

    Returns:
        A `QuantizedArray` of shape `(in, out)`, contract_axes `(0,)` and
        `stack_shape == kernel.shape[:-2]`.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.nnx import QuantConfig, quantize_kernel
        >>> q = quantize_kernel(jnp.ones((3, 128, 64)), QuantConfig())
        >>> q.shape, q.stack_shape
        ((128, 64), (3,))
    """
    stack = tuple(kernel.shape[:-2])
    if not stack:
        return quantize(kernel, quant.fmt, quant.block_size, quant.double_quant)
    flat = kernel.reshape(-1, *kernel.shape[-2:])  # [layers, in, out]
    qs = [quantize(flat[i], quant.fmt, quant.block_size, quant.double_quant) for i in range(flat.shape[0])]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves).reshape(*stack, *leaves[0].shape), *qs)
    return stacked


def _aliases(model: nnx.Module) -> dict[tuple, list[tuple]]:
    """`{path: all paths of that node}` for nodes and variables referenced more than once."""
    aliases = {}
    for group in nnx.find_duplicates(model):
        for path in group:
            aliases[tuple(path)] = [tuple(p) for p in group]
    return aliases


def _check_site(site: LinearSite, quant: QuantConfig | None, aliases: dict[tuple, list[tuple]]) -> None:
    reason = unsupported_reason(site)
    if reason is not None:
        raise ValueError(f"{site.name}: this nnx.Linear cannot be replaced because {reason}; leave it out of "
                         "LoraConfig.targets")
    layer_paths = aliases.get(site.path, [site.path])
    for name in ("kernel", "bias"):
        # A variable shared with another module (tied weights) would silently stop being shared.
        others = [p for p in aliases.get((*site.path, name), []) if p[:-1] not in layer_paths]
        if others:
            raise ValueError(f"{site.name}: its {name} is shared with {path_str(others[0])} (tied weights); "
                             "apply_qlora cannot replace a layer whose variables other modules use. Leave it out "
                             "of LoraConfig.targets (output heads are left out by default)")
    if quant is None:
        return
    kernel = site.module.kernel[...]
    if np.dtype(kernel.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"{site.name}: kernel dtype {kernel.dtype} cannot be quantized; expected float32, "
                         "bfloat16 or float16")
    n_in = site.module.in_features
    if n_in % quant.block_size:
        raise ValueError(f"{site.name}: kernel shape {site.kernel_shape} has input size {n_in}, which is not a "
                         f"multiple of QuantConfig.block_size={quant.block_size}; quantized layers need "
                         "in % block_size == 0 (blocks run along the input axis, one row of blocks per output). "
                         "Use a smaller block_size or leave the layer out of LoraConfig.targets")


def _build_layer(site: LinearSite, quant: QuantConfig | None, lora: LoraConfig | None,
                 rngs: nnx.Rngs | None) -> QuantLinear:
    m = site.module
    kernel = m.kernel[...]
    bias = m.bias[...] if m.bias is not None else None
    weight = quantize_kernel(kernel, quant) if quant is not None else kernel
    dtype = quant.compute_dtype if quant is not None and quant.compute_dtype is not None else m.dtype
    if lora is None:
        return QuantLinear(weight, bias, dtype=dtype, precision=m.precision)
    return QLoRALinear(weight, bias, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, rslora=lora.rslora,
                       init=lora.init, dtype=dtype, precision=m.precision, rngs=rngs)


def _report_row(site: LinearSite, layer: QuantLinear) -> ReplacedLayer:
    kernel = site.module.kernel[...]
    stored = layer.kernel.get_value()
    after = stored.nbytes if isinstance(stored, QuantizedArray) else int(stored.nbytes)
    lora_params = 0
    if isinstance(layer, QLoRALinear):
        lora_params = int(layer.lora_a[...].size + layer.lora_b[...].size)
        after += int(layer.lora_a[...].nbytes + layer.lora_b[...].nbytes)
    return ReplacedLayer(path=site.name, layer=type(layer).__name__, kernel_shape=site.kernel_shape,
                         quantized=layer.quantized, base_params=int(math.prod(kernel.shape)),
                         lora_params=lora_params, bytes_before=int(kernel.nbytes), bytes_after=int(after))

"""`apply_qlora`: turn the linear layers of any NNX model into QLoRA layers, in place.

QLoRA (Dettmers et al., 2023) freezes the base model as 4-bit codes and trains
LoRA adapters on top. As bitsandbytes' `load_in_4bit`, every linear layer
(`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`) except the output head is
quantized; the `LoraConfig.targets` get an adapter. All checks run before the
model is touched, so a failing call leaves it as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax._src.config import ALL_LINEAR, LoraConfig, QuantConfig
from qlora_jax._src.formats.blockwise import FLOAT_DTYPES, quantize, quantize_streaming
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.nn import (
    QLoRAEinsum,
    QLoRALinear,
    QLoRALinearGeneral,
    QuantEinsum,
    QuantLinear,
    QuantLinearGeneral,
)
from qlora_jax._src.nn.weight_init import check_weight_init, set_adapter, weight_init_kernel
from qlora_jax._src.surgery.intercept import (
    build_products,
    check_products,
    find_products,
    install_products,
    left_out,
    product_heads,
    warn_left_out,
)
from qlora_jax._src.surgery.targets import (
    LinearSite,
    find_heads,
    find_linears,
    match_targets,
    node_aliases,
    path_str,
    replace_node,
)

__all__ = ["apply_qlora", "quantize_kernel"]



def apply_qlora(
    model: nnx.Module,
    *,
    quant: QuantConfig | None,
    lora: LoraConfig | None,
    rngs: nnx.Rngs | None = None,
    kernels: Mapping[str, QuantizedArray] | None = None,
    trace: Any = None,
    adapters: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
) -> nnx.Module:
    """Replaces the linear layers of `model` **in place** and returns it.

    Linear layers are `nnx.Linear` (→ `QuantLinear` / `QLoRALinear`),
    `nnx.LinearGeneral` without `batch_axis` (→ `QuantLinearGeneral` /
    `QLoRALinearGeneral`) and `nnx.Einsum` (→ `QuantEinsum` / `QLoRAEinsum`).

    * With `quant` and `lora` (QLoRA): every linear layer except the output
      head is quantized; the `lora.targets` become QLoRA layers (packed
      kernel + adapter), the others Quant layers.
    * `quant=None`: plain LoRA, the float baseline; the targets become QLoRA
      layers over their float kernel (frozen, a `FrozenWeight`), the other
      layers are left as they are.
    * `lora=None`: quantization only; every linear layer except the head
      becomes a Quant layer.

    The output head, excluded from "all-linear" and from quantization, is a
    layer whose last path component is "lm_head", "head" or "output", or
    else the last one whose output size is an `nnx.Embed`'s vocabulary
    size. Embeddings and other layer types are never replaced; neither is a
    linear layer whose computation cannot be reproduced (custom
    `dot_general` / `einsum_op` / `promote_dtype`, `preferred_element_type`,
    `batch_axis`): `qlora_report(model).skipped` lists it, and targeting it
    by name or regex is an error. An N-D kernel is quantized with its input axes
    as `contract_axes` (the axes summed against the input) and gets
    adapters A `[*in, r]`, B `[r, *out]`. Layers stacked by `nnx.vmap`
    (kernel `[L, in, out]`, applied with `nnx.scan`) get a `QuantizedArray`
    with stack dims `(L,)` and adapters `[L, in, r]`, `[L, r, out]`;
    `nnx.remat` around the layers works unchanged.

    A fresh adapter has B = 0, so the model computes exactly what it did
    before (with `quant`, exactly what the quantized model computes). The
    inits that read the weight (`LoraConfig.init` "pissa", "pissa_niter_N",
    "olora", "loftq") compute each targeted layer's factors from its float
    kernel, one stacked layer at a time, and store the residual (quantized
    with `quant`) as the base (`qlora_jax._src.nn.weight_init`); they need
    the float kernel, not a pre-quantized one from `kernels`.

    Args:
        model: Any NNX module; modified in place.
        quant: How to quantize the base kernels, or None for float LoRA. Any
            kernel shape: where a layer's input size (the product of its input
            axes) is not a multiple of `quant.block_size`, blocks run over the
            flattened weight and cross rows, as bitsandbytes stores them.
        lora: Where adapters go and how they behave, or None for quantization only.
        kernels: Already quantized kernels by layer path (e.g.
            `"layers/self_attn/q_proj"`), used instead of quantizing the
            layer's own kernel, which may then be abstract (`nnx.eval_shape`);
            for loaders that quantize while streaming a checkpoint or read
            bitsandbytes' packed weights. Each must have the layer's kernel
            shape, contract axes and stack dims.
        adapters: Initial adapter factors `(a [*stack, *in, r], b [*stack, r,
            *out])` by layer path, set instead of drawing them; for loaders
            that compute a weight-reading init (PiSSA, OLoRA, LoftQ) while
            streaming and pass the residual in `kernels`.
        rngs: Draws the adapters (stream "params") and seeds dropout ("dropout");
            each falls back to "default". Required when `lora` is given.
        trace: Finds the weights multiplied inside modules apply_qlora does
            not know (a bare `nnx.Param` given to `jnp.einsum`, `jnp.dot`,
            `jnp.matmul` or `lax.dot_general`): example arguments for
            `model(*trace)` (arrays or `jax.ShapeDtypeStruct`s) or a function
            `trace(model)` running the forward pass, traced once, abstractly,
            on a clone. Without it, such weights are found when
            `qj.register_linear` declares them or when their module holds one
            parameter and its einsum spec as a string attribute. Each becomes
            a `QuantProduct` / `QLoRAProduct` at the parameter's path
            (docs/own-model.md, "Weights multiplied inside your own modules").

    Returns:
        The same `model` object. `qlora_report(model)` tells what it holds
        now: the replaced layers (paths, kernel shapes, parameter counts,
        bytes before and after) and the linear layers left alone.

    Raises:
        ValueError: Both configs None; a target that matches no layer, a
            layer type that is not supported (the message lists the available
            layer paths) or a targeted layer that cannot be reproduced; a
            non-float kernel (naming the layer path and shape).
        TypeError: Arguments of the wrong type.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlora_jax.nnx import LoraConfig, QuantConfig, apply_qlora, qlora_report
        >>> class MLP(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.up = nnx.Linear(128, 256, rngs=rngs)
        ...         self.down = nnx.Linear(256, 128, rngs=rngs)
        ...         self.head = nnx.Linear(128, 10, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.head(self.down(jnp.tanh(self.up(x))))
        >>> model = apply_qlora(MLP(nnx.Rngs(0)), quant=QuantConfig(), lora=LoraConfig(rank=8), rngs=nnx.Rngs(1))
        >>> report = qlora_report(model)
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

    sites, _ = find_linears(model)
    heads = find_heads(model, sites)
    products, not_products = find_products(model, trace)  # parameters multiplied inside other modules
    heads.update(product_heads(model, products))
    adapted = {s.name for s in match_targets(model, lora.targets, sites, heads, products)} \
        if lora is not None else set()
    quantized = {s.name for s in [*sites, *products] if s.name not in heads and s.problem is None} | adapted \
        if quant is not None else set()
    product_plan = [s for s in products if s.name in adapted or s.name in quantized]
    plan = [s for s in sites if s.name in adapted or s.name in quantized]
    aliases = node_aliases(model)
    kernels = dict(kernels or {})
    for name, q in kernels.items():
        site = next((s for s in plan if s.name == name and s.name in quantized), None)
        if site is None:
            raise ValueError(f"kernels: {name!r} is not a layer that apply_qlora quantizes here; quantized layers: "
                             f"{sorted(quantized)}")
        stack = site.kernel_shape[: len(site.kernel_shape) - len(site.logical_shape)]
        if not isinstance(q, QuantizedArray) or (q.shape, q.contract_axes, q.stack_shape) != (
                tuple(site.logical_shape), tuple(site.contract_axes), tuple(stack)):
            raise ValueError(f"kernels[{name!r}]: {q!r} does not fit the layer's kernel {site.kernel_shape} "
                             f"(shape {tuple(site.logical_shape)}, contract_axes {tuple(site.contract_axes)}, "
                             f"stack {tuple(stack)})")
    for site in plan:  # every check before the first change
        _check_site(site, quant if site.name in quantized else None, aliases)
    check_products(product_plan, quant, lora, adapted, aliases)
    if lora is not None and lora.weight_init:
        check_weight_init(lora, quant)
        given = sorted(name for name in kernels if name in adapted and name not in (adapters or {}))
        if given:
            raise ValueError(f"kernels: LoraConfig.init={lora.init!r} reads the float weight, but {given[0]!r} "
                             "is given already quantized")

    unknown = sorted(set(adapters or {}) - adapted)
    if unknown:
        raise ValueError(f"adapters: {unknown[0]!r} is not a layer that gets an adapter here; adapted layers: "
                         f"{sorted(adapted)}")
    new_layers = [_build_layer(site, quant if site.name in quantized else None,
                               lora if site.name in adapted else None, rngs, kernels.get(site.name),
                               (adapters or {}).get(site.name))
                  for site in plan]
    product_layers = build_products(product_plan, quant, lora, quantized, adapted, rngs, quantize_kernel)
    for site, layer in zip(plan, new_layers, strict=True):
        replace_node(model, site.path, layer, aliases)  # a shared layer stays shared
    install_products(product_plan, product_layers)
    _, warn = left_out(products, not_products, heads, {s.name for s in product_plan})  # recorded for qlora_report
    if lora is not None and lora.targets == ALL_LINEAR:
        warn_left_out(warn)
    return model


def quantize_kernel(
    kernel: jax.Array,
    quant: QuantConfig,
    *,
    contract_axes: Sequence[int] = (0,),
    kernel_ndim: int = 2,
) -> QuantizedArray:
    """Quantizes a kernel `[*stack, *kernel_shape]` as one `QuantizedArray` per layer, stacked.

    Each layer's kernel (the trailing `kernel_ndim` axes) is quantized on its
    own (its own absmax blocks and, with double quantization, its own nested
    scales and offset), and the leaves are stacked, so that slicing the stack
    dims (as `nnx.scan` does) gives exactly the `QuantizedArray` of that layer.

    Args:
        kernel: Float kernel `[*stack, *kernel_shape]`.
        quant: The `QuantConfig`.
        contract_axes: Axes of one layer's kernel that are contracted with the
            input (the blocked axes): `(0,)` for `nnx.Linear`, `(0, ..., n_in - 1)`
            for `nnx.LinearGeneral`, the summed axes for `nnx.Einsum`.
        kernel_ndim: Rank of one layer's kernel; leading axes beyond it are stack dims.

    Returns:
        A `QuantizedArray` of shape `kernel.shape[-kernel_ndim:]`, the given
        contract_axes and `stack_shape == kernel.shape[:-kernel_ndim]`.

    Raises:
        ValueError: A kernel of rank below `kernel_ndim`.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.nnx import QuantConfig, quantize_kernel
        >>> q = quantize_kernel(jnp.ones((3, 128, 64)), QuantConfig())
        >>> q.shape, q.stack_shape
        ((128, 64), (3,))
        >>> q = quantize_kernel(jnp.ones((2, 4, 16, 64)), QuantConfig(), contract_axes=(0, 1), kernel_ndim=3)
        >>> q.shape, q.contract_axes, q.stack_shape
        ((4, 16, 64), (0, 1), (2,))
    """
    n_stack = kernel.ndim - int(kernel_ndim)
    if n_stack < 0:
        raise ValueError(f"kernel: shape {tuple(kernel.shape)} has fewer than kernel_ndim={kernel_ndim} axes")
    stack = tuple(kernel.shape[:n_stack])
    axes = tuple(int(a) for a in contract_axes)
    if not stack:
        return _quantize_layer(kernel, quant, axes)
    flat = kernel.reshape(-1, *kernel.shape[n_stack:])  # [layers, *kernel_shape]
    qs = [_quantize_layer(flat[i], quant, axes) for i in range(flat.shape[0])]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves).reshape(*stack, *leaves[0].shape), *qs)
    return stacked


def _quantize_layer(kernel: jax.Array, quant: QuantConfig, axes: tuple[int, ...]) -> QuantizedArray:
    """One layer's kernel quantized: a concrete `[in, out]` kernel (`nnx.Linear`) by `quantize_streaming`, a chunk
    of output columns at a time (as the checkpoint loader quantizes); N-D kernels and traced ones by `quantize`."""
    if kernel.ndim == 2 and tuple(a % 2 for a in axes) == (0,) and not isinstance(kernel, jax.core.Tracer):
        return quantize_streaming(_Columns(kernel), quant.fmt, quant.block_size, quant.double_quant, as_kernel=True)
    return quantize(kernel, quant.fmt, quant.block_size, quant.double_quant, contract_axes=axes)


class _Columns:
    """A kernel `[in, out]` seen as its storage rows `[out, in]`: slicing takes output columns, transposed."""

    def __init__(self, kernel: jax.Array):
        self.kernel = kernel
        self.shape = (kernel.shape[1], kernel.shape[0])
        self.dtype = kernel.dtype

    def __getitem__(self, rows: slice) -> jax.Array:
        return self.kernel[:, rows].T


def _check_site(site: LinearSite, quant: QuantConfig | None, aliases: dict[tuple, list[tuple]]) -> None:
    if site.problem is not None:
        raise ValueError(f"{site.name}: this nnx.{site.kind} cannot be replaced because {site.problem}; leave it "
                         "out of LoraConfig.targets")
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
    kernel = site.module.kernel.get_value()
    if np.dtype(kernel.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{site.name}: kernel dtype {kernel.dtype} cannot be quantized; expected float32, "
                         "bfloat16 or float16")


def _build_layer(site: LinearSite, quant: QuantConfig | None, lora: LoraConfig | None,
                 rngs: nnx.Rngs | None, quantized: QuantizedArray | None = None,
                 factors: tuple[jax.Array, jax.Array] | None = None) -> nnx.Module:
    m = site.module
    bias = m.bias[...] if m.bias is not None else None
    init = None
    if lora is not None and lora.weight_init and factors is None:  # PiSSA, OLoRA, LoftQ: from the float weight
        init = weight_init_kernel(m.kernel[...], contract_axes=site.contract_axes, kernel_ndim=len(site.logical_shape),
                                  lora=lora, quant=quant, key=rngs["params"]())
        factors = init[:2]
    began_as = None if lora is None else lora.init
    if lora is not None and factors is not None:
        lora = dataclasses.replace(lora, init="default")  # the layer draws placeholders, overwritten below
    if init is not None:
        weight = init[2]
    elif quant is None:
        weight = m.kernel[...]
    elif quantized is not None:
        weight = quantized
    else:
        weight = quantize_kernel(m.kernel[...], quant, contract_axes=site.contract_axes,
                                 kernel_ndim=len(site.logical_shape))
    dtype = quant.compute_dtype if quant is not None and quant.compute_dtype is not None else m.dtype
    common = dict(dtype=dtype, precision=m.precision)
    adapter = {} if lora is None else dict(lora=lora, rngs=rngs)
    if site.kind == "Linear":
        layer = (QuantLinear if lora is None else QLoRALinear)(weight, bias, **common, **adapter)
    elif site.kind == "LinearGeneral":
        layer = (QuantLinearGeneral if lora is None else QLoRALinearGeneral)(
            weight, bias, axis=m.axis, out_features=m.out_features, **common, **adapter)
    else:
        layer = (QuantEinsum if lora is None else QLoRAEinsum)(m.einsum_str, weight, bias, **common, **adapter)
    if factors is not None:
        set_adapter(layer, *factors)
        layer.init = began_as  # recorded as PEFT's init_lora_weights when the adapter is exported
    return layer

"""What a model's QLoRA layers hold: one row per replaced layer, with sizes before and after.

`qlora_report(model)` reads it from the model itself, at any time (right
after `apply_qlora`, after loading a checkpoint, during training): the layers
over a frozen kernel are the rows, and the linear-like layers still in float
are listed with the reason they were left alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from flax import nnx

from qlora_jax._src.formats.blockwise import FLOAT_DTYPES
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.nn import FROZEN_LAYERS, QLORA_LAYERS, FrozenWeight
from qlora_jax._src.surgery.intercept import LEFT_OUT, at_path, find_products, is_embedding_name
from qlora_jax._src.surgery.targets import LinearSite, find_heads, find_linears, path_str

__all__ = ["ReplacedLayer", "FloatParam", "QLoRAReport", "qlora_report"]

# A float parameter holding at least this share of the model's parameters is listed in `QLoRAReport.float_params`.
FLOAT_SHARE = 0.01


@dataclasses.dataclass(frozen=True)
class ReplacedLayer:
    """One layer over a frozen kernel (made by `apply_qlora` or by hand). Biases are not counted.

    Example:
        >>> from qlora_jax.nnx import ReplacedLayer
        >>> row = ReplacedLayer("fc", "QuantLinear", (128, 64), True, 8192, 0, 32768, 4226)
        >>> round(row.bytes_after / row.base_params, 4)  # bytes per parameter
        0.5159
    """

    path: str  # '/'-joined nnx path
    layer: str  # the new type: "QLoRALinear", "QuantLinear", "QLoRALinearGeneral", ..., "QuantEinsum"
    kernel_shape: tuple[int, ...]  # (*stack, in, out); (*stack, *in, *out) / (*stack, *kernel_shape) for N-D
    quantized: bool  # whether the kernel is now packed
    base_params: int  # elements of the kernel
    lora_params: int  # elements of lora_a and lora_b (and DoRA's lora_magnitude_vector)
    bytes_before: int  # bytes of the kernel in its original float dtype (`QuantizedArray.dtype`)
    bytes_after: int  # bytes of the kernel as stored now (packed or float) plus the adapter


@dataclasses.dataclass(frozen=True)
class FloatParam:
    """A float parameter left unquantized, and why.

    Example:
        >>> from qlora_jax.nnx import FloatParam
        >>> FloatParam("embed/embedding", (128, 64), "embedding", 8192).params
        8192
    """

    path: str  # '/'-joined nnx path of the variable
    shape: tuple[int, ...]
    reason: str  # embedding, output head, norm, not a product operand, excluded by targets, ...
    params: int  # its elements


@dataclasses.dataclass(frozen=True)
class QLoRAReport:
    """Replaced layers, and linear layers left as they were (with the reason).

    Attributes:
        layers: One `ReplacedLayer` per replaced layer, in path order.
        skipped: `(path, reason)` of linear-like layers not replaced: output
            heads, layers whose computation cannot be reproduced, unsupported
            types, and supported layers left in float because no LoRA target
            named them (plain LoRA, `quant=None`).
        float_params: Every float `nnx.Param` (adapters aside) left
            unquantized that holds at least 1% of the model's parameters, with
            its shape and why (embedding, output head, norm, not a product
            operand, excluded by targets, ...), largest first.
        model_params: The model's parameters before quantization (float
            parameters, adapters aside, plus the elements of frozen kernels).

    Example:
        >>> from qlora_jax.nnx import QLoRAReport, ReplacedLayer
        >>> row = ReplacedLayer("fc", "QLoRALinear", (128, 64), True, 8192, 768, 32768, 7296)
        >>> r = QLoRAReport(layers=(row,), skipped=())
        >>> r.base_params, r.lora_params, r.bytes_before, r.bytes_after
        (8192, 768, 32768, 7296)
    """

    layers: tuple[ReplacedLayer, ...]
    skipped: tuple[tuple[str, str], ...]
    float_params: tuple[FloatParam, ...] = ()
    model_params: int = 0

    @property
    def paths(self) -> tuple[str, ...]:
        """Paths of the replaced layers."""
        return tuple(r.path for r in self.layers)

    @property
    def base_params(self) -> int:
        """Kernel elements of the replaced layers."""
        return sum(r.base_params for r in self.layers)

    @property
    def lora_params(self) -> int:
        """Adapter elements (M)."""
        return sum(r.lora_params for r in self.layers)

    @property
    def bytes_before(self) -> int:
        """Bytes of the replaced float kernels."""
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        """Bytes of the stored kernels plus adapters."""
        return sum(r.bytes_after for r in self.layers)

    def __str__(self) -> str:
        head = f"{'path':<40} {'layer':<18} {'kernel':<20} {'base params':>12} {'lora params':>12} " \
               f"{'bytes before':>13} {'bytes after':>12}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(f"{r.path:<40} {r.layer:<18} {str(r.kernel_shape):<20} {r.base_params:>12,} "
                         f"{r.lora_params:>12,} {r.bytes_before:>13,} {r.bytes_after:>12,}")
        lines.append(f"{'total':<80} {self.base_params:>12,} {self.lora_params:>12,} {self.bytes_before:>13,} "
                     f"{self.bytes_after:>12,}")
        lines += [f"left as is: {path} ({reason})" for path, reason in self.skipped]
        if self.model_params:
            share = self.base_params / self.model_params
            lines.append(f"quantized or frozen: {self.base_params:,} of {self.model_params:,} parameters "
                         f"({share:.1%})")
        lines += [f"left in float: {p.path} {p.shape}, {p.params / max(self.model_params, 1):.1%} ({p.reason})"
                  for p in self.float_params]
        return "\n".join(lines)


def qlora_report(model: nnx.Module) -> QLoRAReport:
    """The QLoRA layers of `model` and the linear-like layers left as they were.

    Computed from the model alone: one `ReplacedLayer` per layer over a
    frozen kernel (`QuantLinear`, `QLoRALinear`, `QuantLinearGeneral`,
    `QLoRALinearGeneral`, `QuantEinsum`, `QLoRAEinsum`; a shared layer once),
    with its parameter counts and its bytes before (the kernel's original
    float dtype, which a `QuantizedArray` records) and after (packed kernel
    plus adapter). The output head is found as `apply_qlora` finds it.

    Args:
        model: Any NNX module, e.g. after `apply_qlora`.

    Every float `nnx.Param` left unquantized that holds at least 1% of the
    model's parameters is in `float_params`, with why: the reason
    `apply_qlora` recorded on it (a multiplied weight excluded by targets or
    an output head, not a product operand, a parameter of an unknown module
    that was not traced), or else embedding, norm, output head, not a LoRA
    target.

    Returns:
        A `QLoRAReport`; `str()` of it is a table.

    Raises:
        TypeError: `model` is not an `nnx.Module`.

    Example:
        >>> from flax import nnx
        >>> import qlora_jax as qj
        >>> class MLP(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.up, self.down = nnx.Linear(128, 256, rngs=rngs), nnx.Linear(256, 128, rngs=rngs)
        ...         self.head = nnx.Linear(128, 10, rngs=rngs)
        >>> model = qj.apply_qlora(MLP(nnx.Rngs(0)), quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=8),
        ...                        rngs=nnx.Rngs(1))
        >>> report = qj.qlora_report(model)
        >>> report.paths, report.skipped
        (('down', 'up'), (('head', "output head (named 'head')"),))
        >>> report.bytes_before, report.bytes_after  # float32 kernels -> NF4 (double quant) + float32 adapters
        (262144, 58392)
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}")
    sites, others = find_linears(model)
    replaced = [(tuple(path), m) for path, m in nnx.iter_modules(model) if path and isinstance(m, FROZEN_LAYERS)]
    # Heads among all linear layers, replaced or not: the same choice apply_qlora made on the original model.
    heads = find_heads(model, sites + [_site(path, m) for path, m in replaced])
    names = {path_str(path) for path, _ in replaced}
    skipped = [(name, reason) for name, reason in heads.items() if name not in names]
    for s in sites:
        if s.name in heads:
            continue
        if s.problem is not None:
            skipped.append((s.name, f"{s.kind} cannot be replaced: {s.problem}"))
        else:
            skipped.append((s.name, f"float {s.kind}, not a LoRA target"))
    skipped += others
    floats, total = _float_params(model, sites, dict(skipped))
    return QLoRAReport(layers=tuple(_row(path, m) for path, m in replaced), skipped=tuple(skipped),
                       float_params=floats, model_params=total)


def _float_params(model: nnx.Module, sites: list[LinearSite], skipped: dict[str, str]
                  ) -> tuple[tuple[FloatParam, ...], int]:
    """The float parameters holding ≥ FLOAT_SHARE of the model's parameters, with why; and that total."""
    total, params = 0, []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, FrozenWeight):
            value = node.get_value()
            total += math.prod((*getattr(value, "stack_shape", ()), *value.shape))
        elif isinstance(node, nnx.Param) and not isinstance(node, nnx.LoRAParam):
            value = node.get_value()
            if hasattr(value, "dtype") and np.dtype(value.dtype) in FLOAT_DTYPES:
                total += int(value.size)
                params.append((tuple(path), node, value))
    if not params:
        return (), total
    linear = {s.path: s for s in sites}
    products, others = find_products(model)
    static = {s.path: s for s in products}
    out = []
    for path, node, value in params:
        if value.size < FLOAT_SHARE * total:
            continue
        owner = at_path(model, path[:-1])
        name = path_str(path)
        reason = node.get_metadata(LEFT_OUT, None)
        if reason is None:
            if path[:-1] in linear:
                layer = path_str(path[:-1])
                reason = skipped.get(layer, "a float layer") if path[-1] == "kernel" else f"{path[-1]} of {layer}"
            elif isinstance(owner, nnx.Embed) or is_embedding_name(path):
                reason = "embedding"
            elif "norm" in type(owner).__name__.lower() or any("norm" in str(p).lower() for p in path[-2:]):
                reason = "norm"
            elif isinstance(owner, FROZEN_LAYERS):
                reason = f"{path[-1]} of {path_str(path[:-1])}"
            elif path in static:
                site = static[path]
                reason = f"multiplied as {site.spec!r}, not replaced" + (f" ({site.problem})" if site.problem else "")
            elif name in others:
                reason = others[name][1]
            else:
                reason = "a vector (bias or scale)" if value.ndim < 2 else \
                    f"a parameter of {type(owner).__name__}, left float"
        out.append(FloatParam(name, tuple(int(d) for d in value.shape), reason, int(value.size)))
    return tuple(sorted(out, key=lambda p: -p.params)), total


def _site(path: tuple[Any, ...], m: nnx.Module) -> LinearSite:
    """A replaced layer seen as the linear layer it was."""
    return LinearSite(path, m, tuple(m.stack_shape), tuple(m.kernel_shape), tuple(m.contract_axes))


def _row(path: tuple[Any, ...], m: nnx.Module) -> ReplacedLayer:
    stored = m.kernel.get_value()  # a QuantizedArray or a float kernel [*stack, *kernel_shape]
    kernel_shape = (*m.stack_shape, *m.kernel_shape)
    base_params = math.prod(kernel_shape)
    after = int(stored.nbytes)
    lora_params = 0
    if isinstance(m, QLORA_LAYERS):
        lora_params = int(m.lora_a[...].size + m.lora_b[...].size)
        after += int(m.lora_a[...].nbytes + m.lora_b[...].nbytes)
        if getattr(m, "lora_magnitude_vector", None) is not None:  # DoRA
            lora_params += int(m.lora_magnitude_vector[...].size)
            after += int(m.lora_magnitude_vector[...].nbytes)
    dtype = stored.dtype  # QuantizedArray.dtype: the dtype the kernel had before quantization
    return ReplacedLayer(path=path_str(path), layer=type(m).__name__, kernel_shape=kernel_shape,
                         quantized=isinstance(stored, QuantizedArray), base_params=base_params,
                         lora_params=lora_params, bytes_before=base_params * np.dtype(dtype).itemsize,
                         bytes_after=after)

"""`qlora_interceptor`: run the `nn.Dense` layers of an unmodified Linen model as QLoRA layers.

Linen modules are code, not data, so a model cannot be rewritten in place as
NNX models are. Instead `convert_params` rewrites the variables (the kernel of
each converted layer moves to the `"frozen"` collection, packed; adapters are
added to `"params"`), and this interceptor, registered with
`nn.intercept_methods`, computes every `nn.Dense` / `nn.DenseGeneral` whose
kernel it finds in `"frozen"` with `dense_forward` instead of the layer's own
code. Which layers are converted is therefore decided once, by the variables;
layers with a float kernel in `"params"` run unchanged.
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
from flax.linen import dtypes as linen_dtypes

from qlora_jax._src.config import ALL_LINEAR, HEAD_NAMES, LoraConfig, QuantConfig
from qlora_jax._src.formats.blockwise import FLOAT_DTYPES
from qlora_jax._src.formats.qarray import QuantizedArray
from qlora_jax._src.linen.layers import FROZEN, QLoRABase, compute_dtype, dense_forward
from qlora_jax._src.nn.lora import init_lora, lora_einsum
from qlora_jax._src.nn.spec import KernelSizes, einsum_kernel_axes, einsum_problem, split_einsum
from qlora_jax._src.ops.qmatmul import qeinsum
from qlora_jax._src.surgery.apply import quantize_kernel
from qlora_jax._src.surgery.intercept import (
    OperandBase,
    intercepting,
    product_spec,
    recording,
    registered_linears,
)
from qlora_jax._src.surgery.report import ReplacedLayer

__all__ = ["SUPPORTED_MODULES", "qlora_interceptor", "unsupported_reason", "ProductParam", "product_params",
           "LinenOperand", "convert_products", "dense_targets"]

# Linen module types that convert_params converts and qlora_interceptor computes (exact types).
SUPPORTED_MODULES: dict[type, str] = {
    nn.Dense: "kernel [in, out]; adapter lora_a [in, r], lora_b [r, out]",
    nn.DenseGeneral: "kernel [*in, *features] (no batch_dims); adapter on the flattened axes",
}


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a Linen `nn.Dense` / `nn.DenseGeneral` cannot be computed faithfully, or None.

    Example:
        >>> import flax.linen as nn
        >>> from qlora_jax.linen import unsupported_reason
        >>> unsupported_reason(nn.Dense(4)) is None, unsupported_reason(nn.DenseGeneral(4, batch_dims=(0,)))
        (True, 'it has batch_dims (0,)')
    """
    if type(module) not in SUPPORTED_MODULES:
        return f"{type(module).__name__} is not supported (supported: nn.Dense, nn.DenseGeneral)"
    if module.dot_general is not None or module.dot_general_cls is not None:
        return "it has a custom dot_general"
    if module.promote_dtype is not linen_dtypes.promote_dtype:
        return "it has a custom promote_dtype"
    if isinstance(module, nn.DenseGeneral) and tuple(np.atleast_1d(module.batch_dims)):
        return f"it has batch_dims {tuple(int(d) for d in np.atleast_1d(module.batch_dims))}"
    return None


def qlora_interceptor(
    *,
    quant: QuantConfig | None,
    lora: LoraConfig | None,
    deterministic: bool | None = None,
) -> nn.module.Interceptor:
    """A Linen method interceptor that computes converted `nn.Dense` layers as QLoRA layers.

    Use it around `model.apply` with the variables from `convert_params`
    (pass the same configs), **inside** the function you `jax.jit` (the
    interceptor acts when the model is traced)::

        with nn.intercept_methods(qlora_interceptor(quant=quant, lora=lora, deterministic=False)):
            y = model.apply(variables, x, rngs={"dropout": key})

    For each call of an `nn.Dense` / `nn.DenseGeneral` whose kernel is in the
    `"frozen"` collection, it returns `dense_forward`: the frozen kernel
    (packed: `qdot_general`; float: exactly the layer's own dot), the bias,
    and, if the layer has `lora_a` / `lora_b` params, `s · B(A(dropout(x)))`.
    The compute dtype is `quant.compute_dtype`, else the layer's `dtype`.
    Every other module call runs unchanged (so `model.init` under it gives
    ordinary float params).

    Args:
        quant: The `QuantConfig` given to `convert_params` (its `compute_dtype`
            is used), or None.
        lora: The `LoraConfig` given to `convert_params` (rank, alpha, rslora,
            dropout), or None when no layer has an adapter.
        deterministic: Turns the adapter dropout off (evaluation). Required when
            `lora.dropout > 0`; with False, the "dropout" rng stream of
            `apply` draws the masks.

    Returns:
        An interceptor for `nn.intercept_methods`.

    Raises:
        TypeError: Configs of the wrong type.
        ValueError: `deterministic` missing while `lora.dropout > 0`. When the
            model runs: a layer with a frozen kernel that is not a supported
            `nn.Dense` / `nn.DenseGeneral`, adapters of the wrong rank or
            without a `LoraConfig`, or a converted layer whose kernel cannot be
            found (inside `nn.scan` / `nn.vmap`, list `"frozen"` in
            `variable_axes`); each message names the layer path.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.linen import convert_params, qlora_interceptor
        >>> model = nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(128)])
        >>> x = jnp.ones((2, 128))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> quant, lora = qj.QuantConfig(), qj.LoraConfig(rank=8)
        >>> variables, report = convert_params(params, quant=quant, lora=lora, rng=jax.random.key(1))
        >>> report.paths
        ('layers_0', 'layers_2')
        >>> with nn.intercept_methods(qlora_interceptor(quant=quant, lora=lora)):
        ...     y = model.apply(variables, x)
        >>> y.shape
        (2, 128)
    """
    if quant is not None and not isinstance(quant, QuantConfig):
        raise TypeError(f"quant: expected a QuantConfig or None, got {type(quant).__name__}")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise TypeError(f"lora: expected a LoraConfig or None, got {type(lora).__name__}")
    if deterministic is not None and not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"deterministic: expected a bool or None, got {deterministic!r}")
    if lora is not None and lora.dropout > 0 and deterministic is None:
        raise ValueError(f"qlora_interceptor: LoraConfig.dropout={lora.dropout} needs deterministic=True "
                         "(evaluation, no dropout) or deterministic=False (training, draws from the 'dropout' rng)")

    def interceptor(next_fun: Any, args: tuple, kwargs: dict, context: nn.module.InterceptorContext) -> Any:
        module = context.module
        if type(module) not in SUPPORTED_MODULES and not isinstance(module, QLoRABase) and "param" not in vars(module):
            frozen = module.variables.get(FROZEN, {}) if module.scope is not None else {}
            names = [k for k, v in frozen.items() if not isinstance(v, Mapping)]  # its own (children are dicts)
            if names:  # multiplied params converted by convert_params(products=...)
                return _product_call(module, names, next_fun, args, kwargs, quant, lora, deterministic)
        if context.method_name != "__call__" or isinstance(module, QLoRABase):
            return next_fun(*args, **kwargs)
        if not module.has_variable(FROZEN, "kernel"):
            if (type(module) in SUPPORTED_MODULES and not module.is_mutable_collection("params")
                    and not module.has_variable("params", "kernel")):
                raise ValueError(f"{_path(module)}: this {type(module).__name__} has no kernel, neither in 'params' "
                                 f"nor in {FROZEN!r}; pass all of convert_params' variables to apply (inside nn.scan "
                                 f"or nn.vmap, the {FROZEN!r} collection must be listed in variable_axes)")
            return next_fun(*args, **kwargs)
        return _converted_call(module, args, kwargs, quant, lora, deterministic)

    return interceptor


def _path(module: nn.Module) -> str:
    return "/".join(module.path) or type(module).__name__


def _converted_call(module: nn.Module, args: tuple, kwargs: dict, quant: QuantConfig | None,
                    lora: LoraConfig | None, deterministic: bool | None) -> Any:
    path = _path(module)
    reason = unsupported_reason(module)
    if reason is not None:
        raise ValueError(f"{path}: its kernel is in the {FROZEN!r} collection, but qlora_interceptor cannot compute "
                         f"it: {reason}. Leave it out of convert_params (pass layers=dense_layers(model, ...))")
    if len(args) + len(kwargs) != 1:
        raise TypeError(f"{path}: {type(module).__name__} takes one input, got {len(args)} positional and "
                        f"keyword arguments {sorted(kwargs)}")
    inputs = args[0] if args else next(iter(kwargs.values()))
    kernel = nn.meta.unbox(module.get_variable(FROZEN, "kernel"))
    bias = nn.meta.unbox(module.get_variable("params", "bias")) if module.use_bias else None
    if module.use_bias and bias is None:
        raise ValueError(f"{path}: use_bias=True but 'params' has no bias for this layer")
    has_a, has_b = module.has_variable("params", "lora_a"), module.has_variable("params", "lora_b")
    if has_a != has_b:
        raise ValueError(f"{path}: 'params' has {'lora_a' if has_a else 'lora_b'} without "
                         f"{'lora_b' if has_a else 'lora_a'}")
    adapter, rng = None, None
    if has_a:
        if lora is None:
            raise ValueError(f"{path}: the layer has adapters (lora_a, lora_b) but qlora_interceptor got lora=None; "
                             "pass the LoraConfig given to convert_params")
        adapter = (nn.meta.unbox(module.get_variable("params", "lora_a")),
                   nn.meta.unbox(module.get_variable("params", "lora_b")))
        if adapter[0].shape[-1] != lora.rank:
            raise ValueError(f"{path}: lora_a has shape {tuple(adapter[0].shape)}, rank {adapter[0].shape[-1]}, but "
                             f"LoraConfig.rank={lora.rank}")
        if lora.dropout > 0 and not deterministic:
            rng = module.make_rng("dropout")
    magnitude = None  # DoRA's, from convert_params with LoraConfig(use_dora=True)
    if module.has_variable("params", "lora_magnitude_vector"):
        magnitude = nn.meta.unbox(module.get_variable("params", "lora_magnitude_vector"))
    axis = (-1,) if type(module) is nn.Dense else tuple(int(a) for a in np.atleast_1d(module.axis))
    return dense_forward(inputs, kernel, bias, adapter, axis=axis, dtype=compute_dtype(quant, module.dtype),
                         precision=module.precision, scale=lora.scale if lora is not None else 1.0,
                         dropout_rate=lora.dropout if lora is not None else 0.0, dropout_rng=rng,
                         magnitude=magnitude, name=path)


# -- weights multiplied inside other Linen modules (issue 26) ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProductParam(KernelSizes):
    """A `self.param` that a Linen module (not `nn.Dense`) multiplies with its input, found by `product_params`.

    Example:
        >>> from qlora_jax.linen import ProductParam
        >>> p = ProductParam("attn/q", "w", "BTD,DNH->BTNH", (64, 4, 16))
        >>> p.name, p.contract_axes, p.in_size, p.out_size
        ('attn/q/w', (0,), 64, 64)
    """

    path: str  # '/'-joined module path
    param: str  # the name given to self.param
    spec: str  # "x_axes,kernel_axes->out_axes", the weight second
    kernel_shape: tuple[int, ...]  # as stored in params: (*stack, *kernel)
    stack_shape: tuple[int, ...] = ()  # leading dims of modules stacked by nn.scan / nn.vmap
    problem: str | None = None  # why it cannot be converted, or None

    @property
    def name(self) -> str:
        """The parameter's '/'-joined path."""
        return f"{self.path}/{self.param}" if self.path else self.param

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """One layer's kernel."""
        return self.kernel_shape[len(self.stack_shape):]

    @property
    def contract_axes(self) -> tuple[int, ...]:
        """Axes of one kernel summed against the input."""
        return einsum_kernel_axes(self.spec)[0] if self.problem is None else ()



def product_params(model: nn.Module, *args: Any, **kwargs: Any) -> tuple[ProductParam, ...]:
    """The float `self.param`s of rank ≥ 2 that a Linen model's own modules multiply, found by tracing `model.init`.

    As `dense_layers` (abstractly, rng streams "params" and "dropout"), with
    `jnp.einsum`, `jnp.dot`, `jnp.matmul` and `lax.dot_general` intercepted:
    a parameter handed out by `self.param` of a module other than `nn.Dense` /
    `nn.DenseGeneral` and given as it is to one of them is recorded with the
    product's einsum spec (`qj.register_linear` declares a spec where the
    product is not one of these). Pass the result to `convert_params(...,
    products=...)`; `qlora_interceptor` then computes them.

    Args:
        model: A Linen module.
        *args: Example inputs of `model.init`.
        **kwargs: Keyword arguments of `model.init`.

    Returns:
        The parameters in the order they are first multiplied.

    Example:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from qlora_jax.linen import product_params
        >>> class Proj(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return jnp.einsum("BTD,DNH->BTNH", x, self.param("w", nn.initializers.normal(), (64, 4, 16)))
        >>> [(p.name, p.spec) for p in product_params(Proj(), jnp.ones((1, 2, 64)))]
        [('w', 'BTD,DNH->BTNH')]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a flax.linen Module, got {type(model).__name__}")
    handed: dict[int, tuple[tuple[tuple[str, ...], str], Any]] = {}
    specs: dict[tuple[tuple[str, ...], str], set[str]] = {}

    def record(operand: Any, spec: str) -> None:
        entry = handed.get(id(operand))
        if entry is not None and entry[1] is operand:
            specs.setdefault(entry[0], set()).add(spec)

    def interceptor(next_fun: Any, a: tuple, kw: dict, context: nn.module.InterceptorContext) -> Any:
        module = context.module
        if type(module) in SUPPORTED_MODULES or isinstance(module, QLoRABase) or "param" in vars(module):
            return next_fun(*a, **kw)
        registered = registered_linears(module)

        def param(name: str, *pa: Any, **pk: Any) -> Any:
            value = type(module).param(module, name, *pa, **pk)
            key = (tuple(module.path), name)
            if getattr(value, "ndim", 0) >= 2 and np.dtype(value.dtype) in FLOAT_DTYPES:
                handed[id(value)] = (key, value)  # kept alive, so the id stays unique
                if name in registered:
                    specs.setdefault(key, set()).add(registered[name].replace(" ", ""))
            return value

        object.__setattr__(module, "param", param)
        try:
            return next_fun(*a, **kw)
        finally:
            object.__delattr__(module, "param")

    key = jax.random.key(0)
    with nn.intercept_methods(interceptor), recording(record), intercepting():
        shapes = jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, *args, **kwargs))
    params = nn.meta.unbox(shapes.get("params", {}))
    out = []
    for (path, name), found in specs.items():
        spec = product_spec(found)
        node = params
        for k in path:
            node = node[k]
        stored = tuple(int(d) for d in node[name].shape)
        problem = spec[1:] if spec.startswith("!") else einsum_problem(spec)
        k = len(split_einsum(spec)[1]) if problem is None else 0
        if problem is None and k > len(stored):
            problem = f"its spec {spec!r} names {k} kernel axes, the parameter has shape {stored}"
        stack = stored[: len(stored) - k] if problem is None else ()
        out.append(ProductParam("/".join(path), name, spec, stored, stack, problem))
    return tuple(out)


class LinenOperand(OperandBase):
    """A converted Linen parameter as `self.param` hands it out under `qlora_interceptor` (see `OperandBase`)."""

    def __init__(self, name: str, owner: str, kernel: Any, adapter: tuple[Any, Any] | None, *, scale: float,
                 dropout: float, rng: jax.Array | None, dtype: Any):
        self.name, self.owner, self.kernel, self.adapter = name, owner, kernel, adapter
        self.kernel_shape = tuple(kernel.shape)
        self.scale, self.dropout, self.rng, self.dtype = scale, dropout, rng, dtype

    def product(self, spec: str, x: jax.Array) -> jax.Array:
        """`einsum(spec, x, kernel) + s · einsum(spec, dropout(x), A ⊗ B)`."""
        spec = spec.replace(" ", "")
        x = jnp.asarray(x)
        x = x if self.dtype is None else x.astype(self.dtype)
        if isinstance(self.kernel, QuantizedArray):
            if self.kernel.stack_shape:
                raise ValueError(f"{self.name}: its packed kernel still has stack dims {self.kernel.stack_shape}; "
                                 f"inside nn.scan / nn.vmap, list {FROZEN!r} in variable_axes")
            if einsum_kernel_axes(spec)[0] != tuple(sorted(self.kernel.contract_axes)):
                raise ValueError(f"{self.name}: multiplied as {spec!r}, but its kernel was quantized along axes "
                                 f"{self.kernel.contract_axes}")
            y = qeinsum(spec, x, self.kernel)
        else:
            y = jnp.einsum(spec, x, jax.lax.stop_gradient(jnp.asarray(self.kernel).astype(x.dtype)))
        if self.adapter is None:
            return y
        h = x.astype(y.dtype)
        if self.rng is not None:
            keep = 1.0 - self.dropout
            mask = jax.random.bernoulli(self.rng, keep, h.shape)
            h = jax.lax.select(mask, h / keep, jnp.zeros_like(h))
        return y + lora_einsum(spec, h, self.adapter[0], self.adapter[1], self.scale)


def _product_call(module: nn.Module, names: list[str], next_fun: Any, args: tuple, kwargs: dict,
                  quant: QuantConfig | None, lora: LoraConfig | None, deterministic: bool | None) -> Any:
    """Runs a method of a module whose multiplied params were converted: `self.param` of those hands out a
    `LinenOperand`, and the products are intercepted."""
    path = _path(module)

    def param(name: str, *pa: Any, **pk: Any) -> Any:
        if name not in names:
            return type(module).param(module, name, *pa, **pk)
        kernel = nn.meta.unbox(module.get_variable(FROZEN, name))
        stored = module.get_variable("params", name)
        adapter, rng = None, None
        if stored is not None:
            if lora is None:
                raise ValueError(f"{path}/{name}: the parameter has adapters but qlora_interceptor got lora=None; "
                                 "pass the LoraConfig given to convert_params")
            adapter = (nn.meta.unbox(stored["lora_a"]), nn.meta.unbox(stored["lora_b"]))
            if adapter[0].shape[-1] != lora.rank:
                raise ValueError(f"{path}/{name}: lora_a has shape {tuple(adapter[0].shape)}, but "
                                 f"LoraConfig.rank={lora.rank}")
            if lora.dropout > 0 and not deterministic:
                rng = module.make_rng("dropout")
        return LinenOperand(f"{path}/{name}", type(module).__name__, kernel, adapter,
                            scale=lora.scale if lora is not None else 1.0,
                            dropout=lora.dropout if lora is not None else 0.0, rng=rng,
                            dtype=compute_dtype(quant, getattr(module, "dtype", None)))

    object.__setattr__(module, "param", param)
    try:
        with intercepting():
            return next_fun(*args, **kwargs)
    finally:
        object.__delattr__(module, "param")


def convert_products(tree: dict[str, Any], frozen: dict[str, Any], products: Sequence[ProductParam], *,
                     quant: QuantConfig | None, lora: LoraConfig | None, rng: jax.Array | None
                     ) -> tuple[list[ReplacedLayer], list[tuple[str, str]], tuple[str, ...]]:
    """Converts the `products` of a params tree in place (used by `convert_params`).

    Returns `(rows, skipped, names)`: report rows, the parameters left as they
    are with why, and the target names these parameters matched (not to be
    looked up among the Dense layers).
    """
    heads = {p.name: f"output head (named {n!r})" for p in products
             for n in [p.param, p.path.rsplit("/", 1)[-1]] if n in HEAD_NAMES}
    adapted, used = set(), ()
    if lora is not None:
        if lora.targets == ALL_LINEAR:
            adapted = {p.name for p in products if p.name not in heads and p.problem is None}
        elif isinstance(lora.targets, str):
            pattern = re.compile(lora.targets)
            adapted = {p.name for p in products if pattern.fullmatch(p.name) or pattern.fullmatch(p.path)}
        else:
            used = tuple(t for t in lora.targets if any(t in (p.param, p.path.rsplit("/", 1)[-1]) for p in products))
            adapted = {p.name for p in products if p.param in used or p.path.rsplit("/", 1)[-1] in used}
        if lora.weight_init and adapted:
            raise ValueError(f"{sorted(adapted)[0]}: LoraConfig.init={lora.init!r} is not supported for parameters "
                             "multiplied inside other modules; use 'default' or 'gaussian'")
    quantized = {p.name for p in products if p.name not in heads and p.problem is None} | adapted \
        if quant is not None else set()
    for p in products:
        if p.name in adapted and p.problem is not None:
            raise ValueError(f"{p.name}: this parameter cannot be converted because {p.problem}; leave it out of "
                             "LoraConfig.targets")
    rows, skipped = [], []
    for i, p in enumerate(products):
        if p.name not in adapted and p.name not in quantized:
            skipped.append((p.name, heads.get(p.name) or p.problem or f"multiplied as {p.spec!r}, not a target"))
            continue
        node = tree
        for k in p.path.split("/") if p.path else ():
            node = node[k]
        kernel = jnp.asarray(node.pop(p.param))
        stored = quantize_kernel(kernel, quant, contract_axes=p.contract_axes, kernel_ndim=len(p.logical_shape)) \
            if p.name in quantized else kernel
        target = frozen
        for k in p.path.split("/") if p.path else ():
            target = target.setdefault(k, {})
        target[p.param] = stored
        after, lora_params = int(stored.nbytes), 0
        if p.name in adapted:
            a, b = init_lora(jax.random.fold_in(rng, 10_000 + i), p.in_size, p.out_size, lora.rank, init=lora.init,
                             stack_shape=p.stack_shape)
            in_shape = tuple(p.logical_shape[j] for j in p.contract_axes)
            out_shape = tuple(d for j, d in enumerate(p.logical_shape) if j not in p.contract_axes)
            node[p.param] = {"lora_a": a.reshape(*p.stack_shape, *in_shape, lora.rank),  # [*stack, *in, r]
                             "lora_b": b.reshape(*p.stack_shape, lora.rank, *out_shape)}  # [*stack, r, *out]
            lora_params, after = int(a.size + b.size), after + int(a.nbytes + b.nbytes)
        rows.append(ReplacedLayer(path=p.name, layer="QLoRAProduct" if p.name in adapted else "QuantProduct",
                                  kernel_shape=p.kernel_shape, quantized=p.name in quantized,
                                  base_params=int(math.prod(p.kernel_shape)), lora_params=lora_params,
                                  bytes_before=int(kernel.nbytes), bytes_after=after))
    return rows, skipped, used


def dense_targets(targets: str | tuple[str, ...], products: Sequence[ProductParam], dense_paths: Sequence[str]
                  ) -> str | tuple[str, ...] | None:
    """`LoraConfig.targets` as `convert_params` matches them among the Dense layers when `products` take some:
    names that only name multiplied params removed, None when nothing is left for the Dense layers."""
    if not products:
        return targets
    if targets == ALL_LINEAR:
        return targets if dense_paths else None
    if isinstance(targets, str):
        return targets if any(re.fullmatch(targets, p) for p in dense_paths) else None
    names = {n for p in products for n in (p.param, p.path.rsplit("/", 1)[-1])}
    dense_names = {p.rsplit("/", 1)[-1] for p in dense_paths}
    kept = tuple(t for t in targets if t not in names or t in dense_names)
    return kept or None

"""Weights multiplied inside modules qlora_jax does not know: found, quantized, adapted, and their products intercepted.

Much JAX model code holds a projection as a bare `nnx.Param` in a small module of
its own and multiplies it in that module's method, e.g. tunix's and Gemma's
`Einsum`: `jnp.einsum(self.einsum_str, x, self.w.value)`. Such a weight is a
*product site*: the `nnx.Param`, its owner module, and the einsum spec it is
multiplied with (`x` first, the weight second). Three ways find them:

* **registered**: `register_linear(module_type, param, einsum)` names the
  parameter and its spec (a string, or a function of the module);
* **einsum-string attribute**: a module holding exactly one float `nnx.Param` of
  rank ≥ 2 and a string attribute that is a two-operand einsum spec whose kernel
  has that rank (less leading stack dims) — the einsum-module pattern;
* **traced**: `apply_qlora(..., trace=...)` runs the forward pass once, abstractly
  (`jax.eval_shape`, on a clone), with `jnp.einsum`, `jnp.dot`, `jnp.matmul` and
  `lax.dot_general` intercepted, and records which parameter (found by the
  identity of the value its variable hands out, across `nnx.scan` / `nnx.remat`
  / `nnx.vmap`) is an operand, with which spec.

A site is replaced, at the path of the parameter, by a `QuantProduct` /
`QLoRAProduct` (a `QuantEinsum` / `QLoRAEinsum` with that spec), so that the
packed kernel lives at `<param path>/kernel` and the adapter at
`<param path>/lora_a`, `<param path>/lora_b`. The module's own code still reads
`self.w.value` (or `self.w[...]`, `self.w.get_value()`): that gives a
`ProductOperand`, which is not an array. The owner's class is swapped for a
subclass (made once per class) whose methods run with `jnp.einsum`, `jnp.dot`,
`jnp.matmul` and `lax.dot_general` intercepted — as qwix intercepts the
products of a forward pass — and an intercepted product with a `ProductOperand`
runs the layer (`qeinsum`, packed-only backward, plus the adapter); every other
call goes to JAX's own function (Flax's `promote_dtype`, patched too, hands the
operand through). `x @ w` needs no interception
(`ProductOperand.__rmatmul__`). The interception is installed while such a
method runs and removed when the outermost one returns; it is decided while the
code is traced, so it holds under `jit`, `nnx.scan`, `nnx.vmap` and `nnx.remat`.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen import dtypes as linen_dtypes
from flax.nnx.nn import dtypes as nnx_dtypes

from qlora_jax._src.config import HEAD_NAMES
from qlora_jax._src.formats.blockwise import FLOAT_DTYPES
from qlora_jax._src.nn import QLoRAEinsum, QuantEinsum
from qlora_jax._src.nn.spec import KernelSizes, einsum_kernel_axes, einsum_problem, split_einsum
from qlora_jax._src.surgery.targets import path_str

__all__ = ["register_linear", "registered_linears", "ProductSite", "OperandBase", "ProductOperand", "intercepting",
           "recording", "product_spec", "QuantProduct", "QLoRAProduct",
           "find_products", "product_heads", "product_layer", "intercept_owner", "mark_left_out"]

# Metadata key set on a float nnx.Param that apply_qlora inspected and left alone: why (read by qlora_report).
LEFT_OUT = "qlora_jax_left_out"

_REGISTRY: dict[tuple[type, str], str | Callable[[Any], str]] = {}


def register_linear(module_type: type, param: str, einsum: str | Callable[[Any], str]) -> None:
    """Declares that modules of `module_type` multiply their parameter `param` as `jnp.einsum(einsum, x, param)`.

    For weights that `apply_qlora` cannot find by itself (without `trace=`): a
    module that holds several weights, or one whose spec is written in its code
    rather than stored in an attribute. The module must multiply the parameter
    in one of its own methods, with `jnp.einsum` (either operand order),
    `jnp.dot`, `jnp.matmul`, `lax.dot_general` or `@`. Covers subclasses; a
    later registration of the same `(module_type, param)` replaces the earlier.
    Applies to NNX modules (`apply_qlora`) and Linen modules (`convert_params`
    with `layers=dense_layers(...)` and `qlora_interceptor`), where `param` is the
    name given to `self.param`.

    Args:
        module_type: An `nnx.Module` or `flax.linen.Module` subclass.
        param: Attribute name of the `nnx.Param` (NNX) or name of the `self.param` (Linen).
        einsum: The spec with the input first and the weight second, e.g.
            `"BTD,DNH->BTNH"`, or a function of the module instance returning it
            (e.g. `lambda m: m.einsum_str`). For `x @ w` on a weight `[in, out]`:
            `"...i,io->...o"`. Leading weight axes beyond the spec's kernel
            letters are stack dims (layers stacked by `nnx.vmap`).

    Raises:
        TypeError: `module_type` is not a class, `param` not a string, `einsum` neither a string nor callable.
        ValueError: A spec that is not a linear map of `x` over the weight (the message says why).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import qlora_jax as qj
        >>> class Proj(nnx.Module):  # a weight [embed, heads, head_dim], its spec in the code
        ...     def __init__(self, rngs):
        ...         self.w = nnx.Param(nnx.initializers.normal()(rngs.params(), (64, 4, 16)))
        ...     def __call__(self, x):
        ...         return jnp.einsum("BTD,DNH->BTNH", x, self.w[...])
        >>> qj.register_linear(Proj, "w", "BTD,DNH->BTNH")
        >>> class Model(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.q_proj = Proj(rngs)
        >>> model = qj.apply_qlora(Model(nnx.Rngs(0)), quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=4),
        ...                        rngs=nnx.Rngs(1))
        >>> qj.qlora_report(model).paths, model.q_proj(jnp.ones((2, 3, 64))).shape
        (('q_proj/w',), (2, 3, 4, 16))
    """
    if not isinstance(module_type, type):
        raise TypeError(f"module_type: expected a module class, got {module_type!r}")
    if not isinstance(param, str) or not param:
        raise TypeError(f"param: expected the parameter's name, got {param!r}")
    if isinstance(einsum, str):
        problem = einsum_problem(einsum)
        if problem is not None:
            raise ValueError(f"register_linear({module_type.__name__}, {param!r}): {problem}")
    elif not callable(einsum):
        raise TypeError(f"einsum: expected a spec string or a function of the module, got {einsum!r}")
    _REGISTRY[(module_type, param)] = einsum


def registered_linears(module: Any) -> dict[str, str]:
    """`{param name: spec}` registered for `module`'s type (or a base class of it)."""
    out = {}
    for cls in reversed(type(module).__mro__):
        for (registered, name), spec in _REGISTRY.items():
            if registered is cls:
                out[name] = spec(module) if callable(spec) else spec
    return out


@dataclasses.dataclass(frozen=True)
class ProductSite(KernelSizes):
    """A float `nnx.Param` that a module multiplies with its input, and how."""

    path: tuple[Any, ...]  # nnx path of the parameter, e.g. ("layers", 0, "attn", "q", "w")
    owner: nnx.Module  # the module holding it
    spec: str  # "x_axes,kernel_axes->out_axes", the weight second
    stack_shape: tuple[int, ...]  # leading parameter dims beyond the spec's kernel (nnx.vmap-stacked layers)
    logical_shape: tuple[int, ...]  # one layer's kernel
    source: str  # "registered", "einsum-string attribute" or "traced"
    problem: str | None = None  # why it cannot be replaced, or None

    @property
    def name(self) -> str:
        """The parameter's '/'-joined path."""
        return path_str(self.path)

    @property
    def owner_path(self) -> tuple[Any, ...]:
        """Path of the owner module."""
        return self.path[:-1]

    @property
    def param(self) -> str:
        """Attribute name of the parameter in its owner."""
        return str(self.path[-1])

    @property
    def kind(self) -> str:
        """`"<OwnerType>.<param>"`, for messages."""
        return f"{type(self.owner).__name__}.{self.param}"

    @property
    def variable(self) -> nnx.Variable:
        """The `nnx.Param`."""
        return vars(self.owner)[self.param]

    @property
    def contract_axes(self) -> tuple[int, ...]:
        """Axes of one layer's kernel summed against `x`."""
        return einsum_kernel_axes(self.spec)[0] if self.problem is None else ()

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """`(*stack, *logical_shape)`."""
        return (*self.stack_shape, *self.logical_shape)



def _is_library_module(module: Any) -> bool:
    """Flax's own layers and qlora_jax's: never product owners (their weights are handled, or embeddings/norms)."""
    return _is_library_module_type(type(module))


def candidate_params(model: nnx.Module) -> dict[tuple, tuple[nnx.Module, str, nnx.Variable]]:
    """`{path: (owner, name, variable)}` of float `nnx.Param`s of rank ≥ 2 held directly by user modules."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if not path or not isinstance(node, nnx.Param) or isinstance(node, nnx.LoRAParam):
            continue
        owner = at_path(model, path[:-1])
        if (not isinstance(owner, nnx.Module) or _is_library_module(owner)
                or vars(owner).get(str(path[-1])) is not node):
            continue
        value = node.get_value()
        if getattr(value, "ndim", 0) >= 2 and np.dtype(value.dtype) in FLOAT_DTYPES:
            out[tuple(path)] = (owner, str(path[-1]), node)
    return out


def find_products(model: nnx.Module, trace: Any = None) -> tuple[list[ProductSite], dict[str, tuple[Any, str]]]:
    """The product sites of `model`, and the candidate parameters that are not (with why).

    Args:
        model: An NNX module.
        trace: None (registered and einsum-string-attribute sites only), a tuple
            of example arguments for `model(*trace)` (arrays or
            `jax.ShapeDtypeStruct`s), or a function `trace(model)` running the
            forward pass. Run once, abstractly, on a clone of the model.

    Returns:
        `(sites, others)`: sites in path order; `others` maps the path of each
        other float parameter of rank ≥ 2 in a user module to `(variable,
        reason)`, the reason it is not a site.
    """
    candidates = candidate_params(model)
    aliases = {}
    for group in nnx.find_duplicates(model):
        for p in group:
            aliases[tuple(p)] = group
    traced = _trace(model, trace, candidates) if trace is not None else None
    sites, others = [], {}
    for path, (owner, name, variable) in candidates.items():
        shape = tuple(int(d) for d in variable.get_value().shape)
        found = _static_spec(owner, name, shape)
        source = None
        if found is not None:
            source, spec = found
        elif traced is not None and path in traced:
            source, spec = "traced", traced[path]
        if source is None:
            if is_embedding_name(path):
                reason = "embedding"
            elif traced is not None:
                reason = ("not a product operand (the traced forward pass gives it, as it is, to no jnp.einsum / "
                          "dot / matmul / lax.dot_general)")
            else:
                reason = (f"{UNKNOWN} {type(owner).__name__}: pass trace= to apply_qlora or declare it with "
                          "qj.register_linear")
            others[path_str(path)] = (variable, reason)
            continue
        problem = spec if spec.startswith("!") else einsum_problem(spec)
        if problem is not None:
            problem = problem.lstrip("!")
            sites.append(ProductSite(path, owner, spec, (), shape, source, problem))
            continue
        k = len(split_einsum(spec)[1])
        if k > len(shape):
            sites.append(ProductSite(path, owner, spec, (), shape, source,
                                     f"its spec {spec!r} names {k} kernel axes, the parameter has shape {shape}"))
            continue
        problem = None
        if len(aliases.get(path, ())) > 1:
            problem = "it is shared with " + ", ".join(path_str(p) for p in aliases[path] if tuple(p) != path)
        sites.append(ProductSite(path, owner, spec, shape[: len(shape) - k], shape[len(shape) - k:], source, problem))
    return sites, others


UNKNOWN = "unknown whether multiplied: a parameter of"


def is_embedding_name(path: tuple) -> bool:
    """Whether the parameter or its module is named as an embedding ("embed" in the last two path components)."""
    return any("embed" in str(p).lower() for p in path[-2:])


def _static_spec(owner: nnx.Module, name: str, shape: tuple[int, ...]) -> tuple[str, str] | None:
    registered = registered_linears(owner)
    if name in registered:
        return "registered", registered[name].replace(" ", "")
    params = [k for k, v in vars(owner).items() if isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam)]
    if params != [name]:
        return None
    for value in vars(owner).values():
        if isinstance(value, str) and "->" in value and einsum_problem(value) is None:
            if len(split_einsum(value)[1]) <= len(shape):
                return "einsum-string attribute", value.replace(" ", "")
    return None


def product_heads(model: nnx.Module, sites: list[ProductSite]) -> dict[str, str]:
    """Output heads among product sites: the parameter or its owner named as a head (`HEAD_NAMES`)."""
    heads = {}
    for s in sites:
        names = [str(p) for p in s.path[-2:]]
        hit = next((n for n in names if n in HEAD_NAMES), None)
        if hit is not None:
            heads[s.name] = f"output head (named {hit!r})"
    return heads


# -- tracing -------------------------------------------------------------------------------------------------------

_LOCAL = threading.local()


def _trace(model: nnx.Module, trace: Any, candidates: Mapping[tuple, Any]) -> dict[tuple, str]:
    """`{path: spec}` of the candidates the forward pass multiplies directly (spec "!<reason>" when it cannot be
    reproduced, e.g. two different specs)."""
    clone = nnx.clone(model)  # the trace never touches the model (RNG counts, batch statistics)
    handed_out: dict[int, tuple[tuple, Any]] = {}
    for path in candidates:
        variable = at_path(clone, path)

        def hook(var, value, path=path):
            handed_out[id(value)] = (path, value)  # the value is kept alive, so its id stays unique
            return value

        hooks = variable.get_metadata("on_get_value", ())
        hooks = hooks if isinstance(hooks, tuple) else (hooks,)
        variable.set_metadata(on_get_value=(*hooks, hook))
    specs: dict[tuple, set[str]] = {}

    def record(operand: Any, spec: str) -> None:
        entry = handed_out.get(id(operand))
        if entry is not None and entry[1] is operand:
            specs.setdefault(entry[0], set()).add(spec)

    with recording(record):
        graphdef, state = nnx.split(clone)
        args = () if callable(trace) else tuple(trace) if isinstance(trace, (tuple, list)) else (trace,)

        def forward(state, *args):
            module = nnx.merge(graphdef, state)  # variables inside the trace, as nnx transforms need them
            return trace(module) if callable(trace) else module(*args)

        with intercepting():
            jax.eval_shape(forward, state, *args)
    return {path: product_spec(found) for path, found in specs.items()}


def product_spec(found: set[str]) -> str:
    """The one spec a weight is multiplied with, from those a trace recorded ("!<reason>" when they disagree)."""
    if len(found) == 1:
        return next(iter(found))
    kernels = {einsum_kernel_axes(s)[0] if einsum_problem(s) is None else s for s in found}
    return min(found) if len(kernels) == 1 else f"!it is multiplied in different ways: {sorted(found)}"


def at_path(node: Any, path: tuple) -> Any:
    """The node at an nnx path."""
    for key in path:
        node = node[key] if isinstance(node, (list, tuple, dict, nnx.List, nnx.Dict)) else getattr(node, key)
    return node


# -- run time: the replaced parameter and the intercepted products ------------------------------------------------


class OperandBase:
    """A replaced weight as the owner's code reads it: what the intercepted products dispatch on (NNX or Linen).

    Subclasses set `name` (the parameter's path) and `kernel_shape` (one
    layer's kernel) and implement `product(spec, x)`.
    """

    name: str = "weight"
    kernel_shape: tuple[int, ...] = ()
    owner: str = "its module"

    @property
    def ndim(self) -> int:
        """Rank of one layer's kernel."""
        return len(self.kernel_shape)

    def product(self, spec: str, x: jax.Array) -> jax.Array:
        """`einsum(spec, x, weight)` (the weight second in `spec`)."""
        raise NotImplementedError

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        if len(self.kernel_shape) != 2:
            raise TypeError(f"{self.name}: x @ w needs a 2-D weight, this one has kernel shape {self.kernel_shape}")
        return self.product("...i,io->...o", x)

    def __repr__(self) -> str:
        # What JAX's "not a valid JAX type" error shows when the operand is used any other way.
        return (f"{type(self).__name__}({self.name}, kernel {self.kernel_shape}: a replaced weight, to be multiplied "
                "with the input by jnp.einsum, jnp.dot, jnp.matmul, lax.dot_general or @ inside a method of its "
                f"module {self.owner})")


class ProductOperand(OperandBase):
    """What `self.w.value` / `self.w[...]` gives for a replaced parameter: a handle on its layer, not an array.

    Multiplying it with `jnp.einsum`, `jnp.dot`, `jnp.matmul` or `lax.dot_general`
    inside a method of the owner module, or with `x @ w`, runs the layer
    (quantized product plus adapter). `shape`, `ndim` and `dtype` are those of
    the parameter it replaced (its original dtype). Any other use is an error
    (JAX's "not a valid JAX type", whose message shows this object's repr: the
    parameter's path and what to do).

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.nnx import QuantProduct
        >>> layer = QuantProduct("...i,io->...o", qj.quantize(jax.random.normal(jax.random.key(0), (64, 8)), "nf4"))
        >>> w = layer.value  # what the module's `self.w.value` gives now
        >>> w.shape, (jnp.ones((2, 64)) @ w).shape
        ((64, 8), (2, 8))
    """

    def __init__(self, layer: QuantEinsum):
        self.layer = layer
        self.name = layer.param_path
        self.owner = layer.owner_type
        self.kernel_shape = tuple(layer.kernel_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the parameter (with stack dims outside `nnx.scan`)."""
        kernel = self.layer.kernel.get_value()
        return (*getattr(kernel, "stack_shape", ()), *kernel.shape)

    @property
    def ndim(self) -> int:
        """Rank of the parameter."""
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        """The parameter's original dtype."""
        return np.dtype(self.layer.kernel.get_value().dtype)

    def product(self, spec: str, x: jax.Array) -> jax.Array:
        """`einsum(spec, x, weight)` by the layer (the weight second in `spec`)."""
        return self.layer(x, spec.replace(" ", ""))


class _OperandMixin:
    """The `Variable`-like reads the owner's code may use on the replaced parameter."""

    @property
    def value(self) -> ProductOperand:
        """The `ProductOperand` (what `param.value` gave before)."""
        return ProductOperand(self)

    def get_value(self) -> ProductOperand:
        """The `ProductOperand` (what `param.get_value()` gave before)."""
        return ProductOperand(self)

    def __getitem__(self, key: Any) -> ProductOperand:
        if key is not Ellipsis:
            raise TypeError(f"{self.param_path}: a replaced parameter can only be read whole (w[...]), got [{key!r}]")
        return ProductOperand(self)


class QuantProduct(_OperandMixin, QuantEinsum):
    """A parameter multiplied inside a module qlora_jax does not know, now a frozen (packed) kernel.

    A `QuantEinsum` with the parameter's spec, placed at the parameter's path;
    the module reads it as a `ProductOperand`. `param_path` and `owner_type`
    name it in errors.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.nnx import QuantProduct
        >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (64, 4, 16)), "nf4")  # [embed, heads, head_dim]
        >>> layer = QuantProduct("BTD,DNH->BTNH", q)
        >>> layer(jnp.ones((1, 2, 64))).shape, layer.value.shape
        ((1, 2, 4, 16), (64, 4, 16))
    """

    param_path = "weight"
    owner_type = "its module"


class QLoRAProduct(_OperandMixin, QLoRAEinsum):
    """A parameter multiplied inside a module qlora_jax does not know, now a packed kernel plus a LoRA adapter.

    A `QLoRAEinsum` with the parameter's spec, placed at the parameter's path
    (adapter at `<path>/lora_a`, `<path>/lora_b`); the module reads it as a
    `ProductOperand`.

    Example:
        >>> import jax, jax.numpy as jnp, qlora_jax as qj
        >>> from flax import nnx
        >>> from qlora_jax.nnx import QLoRAProduct
        >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (64, 4, 16)), "nf4")
        >>> layer = QLoRAProduct("BTD,DNH->BTNH", q, lora=qj.LoraConfig(rank=4), rngs=nnx.Rngs(0))
        >>> layer.lora_a.shape, layer.lora_b.shape
        ((64, 4), (4, 4, 16))
    """

    param_path = "weight"
    owner_type = "its module"


def is_product_layer(layer: Any) -> bool:
    """Whether `layer` stands for a parameter multiplied inside a module (`QuantProduct` or `QLoRAProduct`)."""
    return isinstance(layer, _OperandMixin)


def product_layer(site: ProductSite, weight: Any, *, dtype: Any, lora: Any, rngs: nnx.Rngs | None) -> QuantEinsum:
    """The layer replacing `site`'s parameter: `weight` is its `QuantizedArray` or float value."""
    if lora is None:
        layer = QuantProduct(site.spec, weight, dtype=dtype)
    else:
        layer = QLoRAProduct(site.spec, weight, dtype=dtype, lora=lora, rngs=rngs)
    layer.param_path = site.name
    layer.owner_type = type(site.owner).__name__
    return layer


def mark_left_out(variable: nnx.Variable, reason: str) -> None:
    """Records on a float parameter why `apply_qlora` left it (for `qlora_report`)."""
    variable.set_metadata(**{LEFT_OUT: reason})


_INTERCEPTED: dict[type, type] = {}


def intercept_owner(owner: nnx.Module) -> None:
    """Swaps `owner`'s class for a subclass whose methods run with the products intercepted (once per class)."""
    cls = type(owner)
    if getattr(cls, "_qlora_jax_intercepted", False):
        return
    if cls not in _INTERCEPTED:
        namespace = {"_qlora_jax_intercepted": True, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                     "__doc__": cls.__doc__}
        for klass in cls.__mro__:
            if klass in (nnx.Module, object) or _is_library_module_type(klass):
                break
            for name, fn in vars(klass).items():
                if name in namespace or not callable(fn) or isinstance(fn, (type, staticmethod, classmethod)):
                    continue
                if name.startswith("__") and name != "__call__":
                    continue
                namespace[name] = _intercepted_method(fn)
        _INTERCEPTED[cls] = type(cls.__name__, (cls,), namespace)
    object.__setattr__(owner, "__class__", _INTERCEPTED[cls])


def _is_library_module_type(cls: type) -> bool:
    # Flax's layers, qlora_jax's own layers and model families (whose float parameters, such as Mixtral's router,
    # are float by design).
    return cls.__module__.startswith(("flax.", "qlora_jax._src.nn.", "qlora_jax._src.models.")) or issubclass(
        cls, QuantEinsum)


def _intercepted_method(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def method(*args, **kwargs):
        with intercepting():
            return fn(*args, **kwargs)

    return method


# The functions patched while an intercepted method runs, as (module, attribute, key). Flax's `promote_dtype`
# (Linen's variadic one, NNX's taking a tuple), which Flax-style modules apply to their weights before the product,
# hands a replaced weight through unchanged.
_PATCHED = ((jnp, "einsum", "einsum"), (jnp, "dot", "dot"), (jnp, "matmul", "matmul"),
            (jax.lax, "dot_general", "dot_general"), (linen_dtypes, "promote_dtype", "linen_promote"),
            (nnx_dtypes, "promote_dtype", "nnx_promote"))
_ORIGINAL: dict[str, Callable] = {key: getattr(mod, name) for mod, name, key in _PATCHED}
_LOCK = threading.Lock()
_DEPTH = [0]


class intercepting:
    """Installs the patched product functions for the duration (nested uses count; restored by the outermost)."""

    def __enter__(self):
        with _LOCK:
            if _DEPTH[0] == 0:
                for mod, name, key in _PATCHED:
                    setattr(mod, name, _WRAPPERS[key])
            _DEPTH[0] += 1

    def __exit__(self, *exc):
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                for mod, name, key in _PATCHED:
                    setattr(mod, name, _ORIGINAL[key])
        return False


class recording:
    """Calls `record(operand, spec)` for every operand of an intercepted product while active (this thread)."""

    def __init__(self, record: Callable[[Any, str], None]):
        self.record = record

    def __enter__(self):
        _LOCAL.recorders = [*getattr(_LOCAL, "recorders", []), self.record]

    def __exit__(self, *exc):
        _LOCAL.recorders = _LOCAL.recorders[:-1]
        return False


def _record(operand: Any, spec: str) -> None:
    for record in getattr(_LOCAL, "recorders", ()):
        record(operand, spec)


def _einsum(subscripts, *operands, **kwargs):
    if not isinstance(subscripts, str) or len(operands) != 2:
        if any(isinstance(o, OperandBase) for o in operands):
            raise TypeError("jnp.einsum with a replaced parameter needs a spec string and exactly two operands")
        return _ORIGINAL["einsum"](subscripts, *operands, **kwargs)
    spec = subscripts.replace(" ", "")
    x, w = operands
    swapped = False
    if isinstance(x, OperandBase) and not isinstance(w, OperandBase):
        x, w, swapped = w, x, True
    if "->" in spec and "," in spec.split("->")[0]:
        lhs, out = spec.split("->")
        a, b = lhs.split(",", 1)
        kernel_spec = f"{b},{a}->{out}" if swapped else spec
    else:
        kernel_spec = None
    if isinstance(w, OperandBase):
        if isinstance(x, OperandBase) or kernel_spec is None:
            raise TypeError(f"{w.name}: jnp.einsum({subscripts!r}) multiplies the replaced parameter "
                            "in a way qlora_jax cannot compute (two replaced operands or an implicit output)")
        _check_kwargs(w, "jnp.einsum", kwargs, ("optimize",))
        return w.product(kernel_spec, x)
    for i, operand in enumerate(operands):
        if kernel_spec is not None:
            lhs, out = spec.split("->")
            a, b = lhs.split(",", 1)
            _record(operand, spec if i == 1 else f"{b},{a}->{out}")
    return _ORIGINAL["einsum"](subscripts, *operands, **kwargs)


def _check_kwargs(w: ProductOperand, fn: str, kwargs: dict, ignored: tuple[str, ...]) -> None:
    bad = {k: v for k, v in kwargs.items() if k not in ignored and v is not None}
    if bad:
        raise TypeError(f"{w.name}: {fn} of the replaced parameter with {sorted(bad)} is not supported "
                        "(the layer computes in its compute dtype with its own precision)")


def _matrix(fn_name: str):
    def product(a, b, **kwargs):
        if isinstance(b, OperandBase) and not isinstance(a, OperandBase):
            if len(b.kernel_shape) != 2:
                raise TypeError(f"{b.name}: jnp.{fn_name}(x, w) needs a 2-D weight")
            _check_kwargs(b, f"jnp.{fn_name}", kwargs, ())
            return b.product("...i,io->...o", a)
        if isinstance(a, OperandBase):
            raise TypeError(f"{a.name}: jnp.{fn_name}(w, x) with the replaced parameter first is not "
                            "supported; use jnp.einsum or qj.register_linear with an einsum spec")
        if getattr(b, "ndim", 0) == 2:
            _record(b, "...i,io->...o")
        return _ORIGINAL[fn_name](a, b, **kwargs)

    return product


def _dot_general(lhs, rhs, dimension_numbers, *args, **kwargs):
    if not isinstance(lhs, OperandBase) and not isinstance(rhs, OperandBase):
        spec = _dot_general_spec(getattr(lhs, "ndim", None), getattr(rhs, "ndim", None), dimension_numbers)
        if spec is not None:
            _record(rhs, spec[0])
            _record(lhs, spec[1])
        return _ORIGINAL["dot_general"](lhs, rhs, dimension_numbers, *args, **kwargs)
    w, x = (rhs, lhs) if isinstance(rhs, OperandBase) else (lhs, rhs)
    if isinstance(x, OperandBase):
        raise TypeError(f"{w.name}: lax.dot_general of two replaced parameters is not supported")
    spec = _dot_general_spec(lhs.ndim if w is rhs else w.ndim, rhs.ndim if w is lhs else w.ndim, dimension_numbers)
    if spec is None:
        raise TypeError(f"{w.name}: lax.dot_general{dimension_numbers} cannot be written as an einsum")
    if args or any(v is not None for v in kwargs.values()):
        _check_kwargs(w, "lax.dot_general", dict(kwargs, **{f"arg{i}": a for i, a in enumerate(args)}), ())
    return w.product(spec[0] if w is rhs else spec[1], x)


def _dot_general_spec(lhs_ndim, rhs_ndim, dims) -> tuple[str, str] | None:
    """`(spec with rhs as the weight, spec with lhs as the weight)` of a dot_general, both `x,w->out`."""
    if lhs_ndim is None or rhs_ndim is None:
        return None
    (lc, rc), (lb, rb) = dims
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    lhs, rhs = [None] * lhs_ndim, [None] * rhs_ndim
    for i, j in zip(lb, rb, strict=True):
        lhs[i] = rhs[j] = next(letters)
    for i, j in zip(lc, rc, strict=True):
        lhs[i] = rhs[j] = next(letters)
    lhs = [c or next(letters) for c in lhs]
    rhs = [c or next(letters) for c in rhs]
    out = [lhs[i] for i in lb] + [c for i, c in enumerate(lhs) if i not in lb and i not in lc] + \
          [c for i, c in enumerate(rhs) if i not in rb and i not in rc]
    ls, rs, os_ = "".join(lhs), "".join(rhs), "".join(out)
    return f"{ls},{rs}->{os_}", f"{rs},{ls}->{os_}"


def _promote(key: str):
    """Flax's `promote_dtype` with replaced weights passed through (the others promoted among themselves; the
    layer computes in its compute dtype, by default the input's)."""
    variadic = key == "linen_promote"

    def promote(*args, **kwargs):
        values = list(args if variadic else args[0])
        held = {i: v for i, v in enumerate(values) if isinstance(v, OperandBase)}
        if not held:
            return _ORIGINAL[key](*args, **kwargs)
        rest = [None if i in held else v for i, v in enumerate(values)]
        out = list(_ORIGINAL[key](*rest, **kwargs) if variadic else _ORIGINAL[key](tuple(rest), *args[1:], **kwargs))
        for i, v in held.items():
            out[i] = v
        return out if variadic else tuple(out)

    return promote


_WRAPPERS = {"einsum": _einsum, "dot": _matrix("dot"), "matmul": _matrix("matmul"), "dot_general": _dot_general,
             "linen_promote": _promote("linen_promote"), "nnx_promote": _promote("nnx_promote")}


def warn_left_out(left: Mapping[str, str]) -> None:
    """Warns (a `UserWarning`) that multiplied weights stay in float under "all-linear"."""
    if left:
        lines = "; ".join(f"{path} ({reason})" for path, reason in left.items())
        warnings.warn(f"apply_qlora(targets='all-linear'): these multiplied weights stay in float: {lines}",
                      UserWarning, stacklevel=3)


def check_products(plan: list[ProductSite], quant: Any, lora: Any, adapted: set[str],
                   aliases: Mapping[tuple, list]) -> None:
    """Errors for product sites that `apply_qlora` was asked to replace and cannot (before any change)."""
    for site in plan:
        if site.problem is not None:
            raise ValueError(f"{site.name}: this parameter ({site.kind}, multiplied as {site.spec!r}) cannot be "
                             f"replaced because {site.problem}; leave it out of LoraConfig.targets")
        if lora is not None and site.name in adapted and lora.weight_init:
            raise ValueError(f"{site.name}: LoraConfig.init={lora.init!r} is not supported for parameters "
                             f"multiplied inside {type(site.owner).__name__}; use 'default' or 'gaussian'")
        owner_paths = aliases.get(tuple(site.owner_path), [site.owner_path])
        if len(owner_paths) > 1:
            raise ValueError(f"{site.name}: its module is shared ({', '.join(path_str(p) for p in owner_paths)}); "
                             "apply_qlora cannot replace parameters of a shared module of a type it does not know")


def build_products(plan: list[ProductSite], quant: Any, lora: Any, quantized: set[str], adapted: set[str],
                   rngs: nnx.Rngs | None, quantize_kernel: Callable) -> list[QuantEinsum]:
    """The layers replacing the parameters of `plan` (quantized with `quantize_kernel` where in `quantized`)."""
    layers = []
    for site in plan:
        value = site.variable.get_value()
        q = quant if site.name in quantized else None
        weight = value if q is None else quantize_kernel(value, q, contract_axes=site.contract_axes,
                                                         kernel_ndim=len(site.logical_shape))
        dtype = q.compute_dtype if q is not None and q.compute_dtype is not None else None
        layers.append(product_layer(site, weight, dtype=dtype, lora=lora if site.name in adapted else None,
                                    rngs=rngs))
    return layers


def install_products(plan: list[ProductSite], layers: list[QuantEinsum]) -> None:
    """Puts each layer at its parameter's path and makes the owner's methods intercept the products."""
    for site, layer in zip(plan, layers, strict=True):
        setattr(site.owner, site.param, layer)
        intercept_owner(site.owner)


def left_out(products: list[ProductSite], others: Mapping[str, tuple[Any, str]], heads: Mapping[str, str],
             replaced: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Marks the product sites and other candidate parameters left in float with why (for `qlora_report`).

    Returns:
        `(left, warn)`: `{path: reason}` of all of them, and of those a user of
        "all-linear" must hear about (multiplied weights left out, other than
        heads, and parameters of unknown modules that were not traced).
    """
    left, warn = {}, {}
    for site in products:
        if site.name in replaced:
            continue
        if site.name in heads:
            reason = f"{heads[site.name]}, multiplied as {site.spec!r}"
        elif site.problem is not None:
            reason = warn[site.name] = f"multiplied as {site.spec!r} but cannot be replaced: {site.problem}"
        else:
            reason = warn[site.name] = f"multiplied as {site.spec!r}, excluded by targets"
        left[site.name] = reason
        mark_left_out(site.variable, reason)
    for name, (variable, reason) in others.items():
        left[name] = reason
        if reason.startswith(UNKNOWN):
            warn[name] = reason
        mark_left_out(variable, reason)
    return left, warn

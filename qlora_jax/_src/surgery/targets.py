"""Which layers of an NNX model `apply_qlora` touches: the coverage table,
output-head detection and target matching.

Supported: exactly `nnx.Linear` (kernel `[*stack, in, out]`),
`nnx.LinearGeneral` without `batch_axis` (kernel `[*stack, *in, *out]`) and
`nnx.Einsum` (kernel `[*stack, *kernel_shape]`, input axes = those summed
against `x`), the stack dims coming from `nnx.vmap`-created layers. A
supported type in a configuration that cannot be reproduced (a custom
`dot_general` / `einsum_op` / `promote_dtype`, `preferred_element_type`,
`batch_axis`, an einsum that is not linear in `x`) is an error when targeted
by name or regex and otherwise left alone and reported. Subclasses (such as
`nnx.LoRALinear`) and other kernels (`Conv`, `Embed`) are never replaced:
targeting one is an error naming its path, and `"all-linear"` lists them in
the report as left alone.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from jax import lax

from qlora_jax._src.config import ALL_LINEAR, HEAD_NAMES
from qlora_jax._src.nn.spec import KernelSizes, einsum_kernel_axes, einsum_problem, split_einsum

__all__ = ["SUPPORTED_MODULES", "LinearSite", "find_linears", "unsupported_reason", "find_heads",
           "match_targets", "path_str", "child", "set_child", "node_aliases", "replace_node"]

# Module types apply_qlora replaces, and with what.
SUPPORTED_MODULES: dict[type, str] = {
    nnx.Linear: "QLoRALinear (targeted) or QuantLinear (quantized only)",
    nnx.LinearGeneral: "QLoRALinearGeneral (targeted) or QuantLinearGeneral (quantized only); no batch_axis",
    nnx.Einsum: "QLoRAEinsum (targeted) or QuantEinsum (quantized only)",
}


@dataclasses.dataclass(frozen=True)
class LinearSite(KernelSizes):
    """One supported layer (`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`) of a model and where it lives."""

    path: tuple[Any, ...]  # nnx path from the root, e.g. ("blocks", 0, "attn", "q_proj")
    module: nnx.Module  # the nnx.Linear / nnx.LinearGeneral / nnx.Einsum
    stack_shape: tuple[int, ...]  # leading kernel dims beyond one layer's kernel (layers stacked by nnx.vmap)
    logical_shape: tuple[int, ...]  # one layer's kernel shape: (in, out), (*in, *out) or the Einsum kernel_shape
    contract_axes: tuple[int, ...]  # axes of logical_shape contracted with the input
    problem: str | None = None  # why the layer cannot be replaced faithfully, or None

    @property
    def name(self) -> str:
        """The '/'-joined path."""
        return path_str(self.path)

    @property
    def kind(self) -> str:
        """`"Linear"`, `"LinearGeneral"` or `"Einsum"`."""
        return type(self.module).__name__

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """`(*stack, *logical_shape)`."""
        return (*self.stack_shape, *self.logical_shape)



def path_str(path: Iterable[Any]) -> str:
    """`("blocks", 0, "q_proj")` → `"blocks/0/q_proj"`."""
    return "/".join(str(p) for p in path)


def find_linears(model: nnx.Module) -> tuple[list[LinearSite], list[tuple[str, str]]]:
    """The supported layers of `model`, and the linear-like modules left out.

    Returns:
        `(sites, others)`: sites in nnx's path order (each with its `problem`,
        if any); `others` are `(path, reason)` of modules that hold a kernel
        but are never replaced: unsupported types (subclasses of `nnx.Linear`,
        `Conv`, ...). Layers already converted by `apply_qlora` are in neither.

    Raises:
        ValueError: A layer whose kernel does not have the shape its attributes say.
    """
    sites, others = [], []
    for path, module in nnx.iter_modules(model):
        if not path:
            continue
        if type(module) in SUPPORTED_MODULES:
            sites.append(_site(tuple(path), module))
        elif isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.ConvTranspose)):
            others.append((path_str(path), f"{type(module).__name__} is not supported"))
    return sites, others


def _site(path: tuple[Any, ...], m: nnx.Module) -> LinearSite:
    shape = tuple(int(d) for d in m.kernel.get_value().shape)
    contract: tuple[int, ...] = (0,)
    problem = _config_problem(m)
    if isinstance(m, nnx.Linear):
        logical = (int(m.in_features), int(m.out_features))
    elif isinstance(m, nnx.LinearGeneral):
        if m.batch_axis:
            return LinearSite(path, m, (), shape, (), f"it has batch_axis {dict(m.batch_axis)}, which is not "
                              "supported (its kernel carries the batch axes)")
        logical = (*m.in_features, *m.out_features)
        contract = tuple(range(len(m.in_features)))
    else:  # nnx.Einsum
        logical = tuple(int(d) for d in m.kernel_shape)
        spec_problem = einsum_problem(m.einsum_str)
        if spec_problem is not None:
            return LinearSite(path, m, (), shape, (), spec_problem)
        if len(split_einsum(m.einsum_str)[1]) != len(logical):
            return LinearSite(path, m, (), shape, (), f"its einsum_str {m.einsum_str!r} does not name the "
                              f"{len(logical)} axes of its kernel_shape {logical}")
        contract = einsum_kernel_axes(m.einsum_str)[0]
    if len(shape) < len(logical) or shape[len(shape) - len(logical):] != logical:
        raise ValueError(f"{path_str(path)}: {type(m).__name__} kernel shape {shape} does not end in the shape "
                         f"{logical} its attributes give")
    return LinearSite(path, m, shape[: len(shape) - len(logical)], logical, contract, problem)


def _config_problem(m: nnx.Module) -> str | None:
    """Why the computation of a supported module cannot be reproduced, or None."""
    if isinstance(m, nnx.Einsum):
        if m.einsum_op is not jnp.einsum:
            return "it has a custom einsum_op"
    elif getattr(m, "dot_general_cls", None) is not None:
        return "it has a custom dot_general_cls"
    elif m.dot_general not in (None, lax.dot_general):
        return "it has a custom dot_general"
    if m.preferred_element_type is not None:
        return f"it sets preferred_element_type={m.preferred_element_type}"
    if m.promote_dtype is not nnx_dtypes.promote_dtype:
        return "it has a custom promote_dtype"
    return None


def unsupported_reason(site: LinearSite) -> str | None:
    """Why a supported layer cannot be replaced faithfully, or None."""
    return site.problem


def find_heads(model: nnx.Module, sites: list[LinearSite]) -> dict[str, str]:
    """Output heads among `sites`, as `{path: reason}`.

    A layer whose last path component is in `HEAD_NAMES` is a head. If none
    is named so, the last (in definition order) unstacked layer whose output
    size (all output axes) equals an `nnx.Embed`'s `num_embeddings`, and
    differs from its input size, is the head.
    """
    heads = {s.name: f"output head (named {s.path[-1]!r})" for s in sites if s.path[-1] in HEAD_NAMES}
    if heads:
        return heads
    vocab = {int(m.num_embeddings) for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Embed)}
    candidates = [s for s in sites if not s.stack_shape and not s.problem and s.out_size in vocab
                  and s.out_size != s.in_size]
    if not candidates:
        return {}
    last = max(candidates, key=lambda s: _definition_rank(model, s.path))
    return {last.name: f"output head (out={last.out_size} is an embedding's vocabulary size)"}


def match_targets(model: nnx.Module, targets: str | tuple[str, ...], sites: list[LinearSite],
                  heads: dict[str, str], products: Sequence[Any] = ()) -> list[Any]:
    """The sites selected by `LoraConfig.targets`.

    `products` are the parameters multiplied inside other modules
    (`intercept.ProductSite`): a name matches one when it is the parameter's
    name or its module's (`"q_proj"` for `attn/q_proj/w`), a regex when it
    fully matches the parameter's path or its module's.

    Raises:
        ValueError: A target that matches no layer, or that matches a module
            of a type that is not supported (naming its path and type); the
            message lists the available layer paths. "all-linear" leaves out
            heads and sites with a `problem`; explicit targets keep them (so
            that `apply_qlora` can refuse them by name).
    """
    available = "available layer paths (nnx.Linear, LinearGeneral, Einsum): " + (
        ", ".join(s.name for s in sites) or "(none)")
    if products:
        available += "; multiplied parameters: " + ", ".join(p.name for p in products)
    if targets == ALL_LINEAR:
        chosen = [s for s in [*sites, *products] if s.name not in heads and s.problem is None]
        if not chosen:
            raise ValueError(f"LoraConfig.targets: 'all-linear' matches no layer (output heads excluded); {available}")
        return chosen
    by_name = {s.name: s for s in sites}
    owned = {}  # module path -> its product sites
    for p in products:
        owned.setdefault(path_str(p.owner_path), []).append(p)
    aliases = node_aliases(model)
    # A shared module is listed once, under its first path; it matches a target under any of its paths.
    modules = [(path_str(alias), alias, path_str(p), m) for p, m in nnx.iter_modules(model) if p
               for alias in aliases.get(tuple(p), [tuple(p)])]
    if isinstance(targets, str):
        pattern = re.compile(targets)
        matched = [(name, m) for alias, _, name, m in modules if pattern.fullmatch(alias)]
        matched += [(p.name, p) for p in products if pattern.fullmatch(p.name)]
        if not matched:
            raise ValueError(f"LoraConfig.targets: regex {targets!r} matches no layer path "
                             f"(re.fullmatch on '/'-joined paths); {available}")
    else:
        matched = []
        for target in targets:
            hits = [(name, m) for _, p, name, m in modules if str(p[-1]) == target]
            hits += [(p.name, p) for p in products if p.param == target]
            if not hits:
                raise ValueError(f"LoraConfig.targets: no layer is named {target!r} (names match the last path "
                                 f"component); {available}")
            matched += hits
    chosen, seen = [], set()
    by_name.update({p.name: p for p in products})
    for name, _ in list(matched):
        if name in owned and name not in by_name:  # a module holding multiplied parameters: those
            matched += [(p.name, p) for p in owned[name]]
    for name, module in matched:
        if name in owned and name not in by_name:
            continue
        if name not in by_name:
            raise ValueError(f"LoraConfig.targets: {name} is a {type(module).__name__}, which apply_qlora does not "
                             f"support (supported: {', '.join(t.__name__ for t in SUPPORTED_MODULES)}); {available}")
        if name not in seen:
            seen.add(name)
            chosen.append(by_name[name])
    return chosen


def child(node: Any, key: Any) -> Any:
    """`node.key` or `node[key]`, as nnx paths address them."""
    if isinstance(key, str) and not isinstance(node, dict) and hasattr(node, key):
        return getattr(node, key)
    return node[key]


def set_child(parent: Any, key: Any, value: Any) -> None:
    """Replaces `parent.key` / `parent[key]` by `value`."""
    if isinstance(key, str) and not isinstance(parent, dict) and hasattr(parent, key):
        setattr(parent, key, value)
    elif isinstance(parent, tuple):
        raise ValueError(f"cannot replace element {key!r} of a tuple; hold the layers in an nnx.List")
    else:
        parent[key] = value


def node_aliases(model: nnx.Module) -> dict[tuple, list[tuple]]:
    """`{path: all paths of that node}` for nodes and variables referenced more than once."""
    aliases = {}
    for group in nnx.find_duplicates(model):
        for path in group:
            aliases[tuple(path)] = [tuple(p) for p in group]
    return aliases


def replace_node(model: nnx.Module, path: tuple[Any, ...], value: Any, aliases: dict[tuple, list[tuple]]) -> None:
    """Puts `value` at `path` and at every other path of the node there (a shared layer stays shared)."""
    for alias in aliases.get(tuple(path), [tuple(path)]):
        parent = model
        for key in alias[:-1]:
            parent = child(parent, key)
        set_child(parent, alias[-1], value)


def _definition_rank(model: nnx.Module, path: tuple[Any, ...]) -> tuple[int, ...]:
    """Position of `path` in definition order (attribute insertion order, then list index)."""
    rank, node = [], model
    for key in path:
        if isinstance(node, (list, tuple)):
            rank.append(int(key))
        elif isinstance(node, dict):
            rank.append(list(node).index(key))
        else:
            names = list(vars(node))
            rank.append(names.index(str(key)) if str(key) in names else len(names))
        node = child(node, key)
    return tuple(rank)

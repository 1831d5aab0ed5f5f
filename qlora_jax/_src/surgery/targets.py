"""Which layers of an NNX model `apply_qlora` touches: the coverage table,
output-head detection and target matching.

Supported: exactly `nnx.Linear` (kernel `[*stack, in, out]`, the stack dims
coming from `nnx.vmap`-created layers). Subclasses of `nnx.Linear` (such as
`nnx.LoRALinear`) and other kernels (`LinearGeneral`, `Einsum`, `Conv`,
`Embed`) are not replaced: targeting one is an error naming its path, and
`"all-linear"` lists them in the report as left alone.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from jax import lax

from qlora_jax._src.nn.linear import QuantLinear
from qlora_jax._src.surgery.config import ALL_LINEAR

__all__ = ["SUPPORTED_MODULES", "HEAD_NAMES", "LinearSite", "find_linears", "unsupported_reason", "find_heads",
           "match_targets", "path_str", "child", "set_child"]

# Module types apply_qlora replaces, and with what.
SUPPORTED_MODULES: dict[type, str] = {nnx.Linear: "QLoRALinear (targeted) or QuantLinear (quantized only)"}
# Last path components that mark an output head, excluded from "all-linear" and from quantization.
HEAD_NAMES: tuple[str, ...] = ("lm_head", "head", "output")


@dataclasses.dataclass(frozen=True)
class LinearSite:
    """One `nnx.Linear` of a model and where it lives."""

    path: tuple[Any, ...]  # nnx path from the root, e.g. ("blocks", 0, "attn", "q_proj")
    module: nnx.Linear
    stack_shape: tuple[int, ...]  # leading kernel dims beyond [in, out] (layers stacked by nnx.vmap)

    @property
    def name(self) -> str:
        """The '/'-joined path."""
        return path_str(self.path)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """`(*stack, in, out)`."""
        return (*self.stack_shape, self.module.in_features, self.module.out_features)


def path_str(path: Iterable[Any]) -> str:
    """`("blocks", 0, "q_proj")` → `"blocks/0/q_proj"`."""
    return "/".join(str(p) for p in path)


def find_linears(model: nnx.Module) -> tuple[list[LinearSite], list[tuple[str, str]]]:
    """The supported `nnx.Linear` layers of `model`, and the linear-like modules left out.

    Returns:
        `(sites, others)`: sites in nnx's path order; `others` are
        `(path, reason)` of modules that hold a kernel but are not replaced:
        unsupported types (subclasses of `nnx.Linear`, `LinearGeneral`, ...)
        and layers already converted by `apply_qlora`.
    """
    sites, others = [], []
    for path, module in nnx.iter_modules(model):
        if not path:
            continue
        if type(module) is nnx.Linear:
            kernel = module.kernel[...]
            stack = tuple(int(d) for d in kernel.shape[:-2])
            if tuple(kernel.shape[-2:]) != (module.in_features, module.out_features):
                raise ValueError(f"{path_str(path)}: nnx.Linear kernel shape {tuple(kernel.shape)} does not end in "
                                 f"(in_features, out_features) = {(module.in_features, module.out_features)}")
            sites.append(LinearSite(tuple(path), module, stack))
        elif isinstance(module, QuantLinear):
            others.append((path_str(path), f"already a {type(module).__name__}"))
        elif isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.ConvTranspose)):
            others.append((path_str(path), f"{type(module).__name__} is not supported"))
    return sites, others


def unsupported_reason(site: LinearSite) -> str | None:
    """Why an `nnx.Linear` cannot be replaced faithfully, or None."""
    m = site.module
    if m.dot_general is not lax.dot_general:
        return "it has a custom dot_general"
    if m.preferred_element_type is not None:
        return f"it sets preferred_element_type={m.preferred_element_type}"
    if m.promote_dtype is not nnx_dtypes.promote_dtype:
        return "it has a custom promote_dtype"
    return None


def find_heads(model: nnx.Module, sites: list[LinearSite]) -> dict[str, str]:
    """Output heads among `sites`, as `{path: reason}`.

    A Linear whose last path component is in `HEAD_NAMES` is a head. If none
    is named so, the last (in definition order) unstacked Linear whose output
    size equals an `nnx.Embed`'s `num_embeddings`, and differs from its input
    size, is the head.
    """
    heads = {s.name: f"output head (named {s.path[-1]!r})" for s in sites if s.path[-1] in HEAD_NAMES}
    if heads:
        return heads
    vocab = {int(m.num_embeddings) for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Embed)}
    candidates = [s for s in sites if not s.stack_shape and s.module.out_features in vocab
                  and s.module.out_features != s.module.in_features]
    if not candidates:
        return {}
    last = max(candidates, key=lambda s: _definition_rank(model, s.path))
    return {last.name: f"output head (out={last.module.out_features} is an embedding's vocabulary size)"}


def match_targets(model: nnx.Module, targets: str | tuple[str, ...], sites: list[LinearSite],
                  heads: dict[str, str]) -> list[LinearSite]:
    """The sites selected by `LoraConfig.targets`.

    Raises:
        ValueError: A target that matches no layer, or that matches a module
            which is not a supported `nnx.Linear` (naming its path and type);
            the message lists the available Linear paths.
    """
    available = "available nnx.Linear paths: " + (", ".join(s.name for s in sites) or "(none)")
    if targets == ALL_LINEAR:
        chosen = [s for s in sites if s.name not in heads]
        if not chosen:
            raise ValueError(f"LoraConfig.targets: 'all-linear' matches no layer (output heads excluded); {available}")
        return chosen
    by_name = {s.name: s for s in sites}
    modules = [(path_str(p), p, m) for p, m in nnx.iter_modules(model) if p]
    if isinstance(targets, str):
        pattern = re.compile(targets)
        matched = [(name, m) for name, _, m in modules if pattern.fullmatch(name)]
        if not matched:
            raise ValueError(f"LoraConfig.targets: regex {targets!r} matches no layer path "
                             f"(re.fullmatch on '/'-joined paths); {available}")
    else:
        matched = []
        for target in targets:
            hits = [(name, m) for name, p, m in modules if str(p[-1]) == target]
            if not hits:
                raise ValueError(f"LoraConfig.targets: no layer is named {target!r} (names match the last path "
                                 f"component); {available}")
            matched += hits
    chosen, seen = [], set()
    for name, module in matched:
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

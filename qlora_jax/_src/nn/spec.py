"""Einsum specs of `nnx.Einsum`-style layers: which kernel axes are contracted.

A layer `einsum(spec, x, kernel)` has a kernel whose axes fall in two groups:
the *input* axes, summed against `x` (letters in `x` and the kernel but not in
the output), and the *output* axes (letters of the kernel kept in the output,
including "batch" letters shared with `x`). Blocks of a quantized kernel run
along the input axes (its `contract_axes`), and a LoRA adapter maps the
flattened input axes to the rank and the rank to the flattened output axes.
"""

from __future__ import annotations

import math
import re

__all__ = ["split_einsum", "einsum_kernel_axes", "einsum_problem", "KernelSizes"]


class KernelSizes:
    """`in_size` / `out_size` of a kernel site (a mixin for the classes that describe where a kernel is: they set
    `logical_shape` and `contract_axes`)."""

    logical_shape: tuple[int, ...]
    contract_axes: tuple[int, ...]

    @property
    def in_size(self) -> int:
        """Elements of the contracted (input) axes of one kernel."""
        return math.prod(self.logical_shape[a] for a in self.contract_axes)

    @property
    def out_size(self) -> int:
        """Elements of the other (output) axes of one kernel."""
        return math.prod(d for i, d in enumerate(self.logical_shape) if i not in self.contract_axes)

_SPEC = re.compile(r"([a-zA-Z.]*),([a-zA-Z.]*)->([a-zA-Z.]*)")


def split_einsum(spec: str) -> tuple[str, str, str]:
    """`"...d,dnh->...nh"` → `("...d", "dnh", "...nh")` (spaces removed).

    Raises:
        ValueError: A spec that is not `x_axes,kernel_axes->out_axes`.
    """
    match = _SPEC.fullmatch(spec.replace(" ", ""))
    if not match:
        raise ValueError(f"einsum_str: {spec!r} is not of the form 'x_axes,kernel_axes->out_axes' (two operands, "
                         "an explicit output)")
    return match.group(1), match.group(2), match.group(3)


def einsum_problem(spec: str) -> str | None:
    """Why `spec` is not a linear layer over its kernel that qlora_jax can handle, or None.

    Supported: letters for the kernel (no `...`), `...` at most once in `x`
    and once in the output, no letter repeated within an operand, every kernel
    letter either contracted with `x` or kept in the output, at least one
    contracted letter.
    """
    try:
        xs, ks, out = split_einsum(spec)
    except ValueError as e:
        return str(e)
    if "." in ks:
        return f"its einsum_str {spec!r} puts '...' on the kernel"
    for name, letters in (("x", xs), ("output", out)):
        if letters.count("...") > 1 or "." in letters.replace("...", ""):
            return f"its einsum_str {spec!r} uses '...' other than once in {name}"
    if ("..." in xs) != ("..." in out):
        return f"its einsum_str {spec!r} has '...' in only one of x and the output"
    for name, letters in (("x", xs), ("kernel", ks), ("output", out)):
        plain = letters.replace("...", "")
        if len(set(plain)) != len(plain):
            return f"its einsum_str {spec!r} repeats a letter in {name}"
    lonely = [c for c in ks if c not in xs and c not in out]
    if lonely:
        return f"its einsum_str {spec!r} sums kernel axes {''.join(lonely)} on their own"
    if not any(c in xs and c not in out for c in ks):
        return f"its einsum_str {spec!r} contracts no kernel axis with x"
    return None


def einsum_kernel_axes(spec: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(input axes, output axes)` of the kernel of `spec`, each in kernel order.

    Example: `"...nh,nhd->...d"` → `((0, 1), (2,))`; `"bnd,ndh->bnh"` (a
    per-head kernel, `n` a batch letter) → `((1,), (0, 2))`.

    Raises:
        ValueError: `einsum_problem(spec)` is not None.
    """
    problem = einsum_problem(spec)
    if problem is not None:
        raise ValueError(f"einsum_str: not a linear layer over its kernel: {problem}")
    xs, ks, out = split_einsum(spec)
    contract = tuple(i for i, c in enumerate(ks) if c in xs and c not in out)
    return contract, tuple(i for i in range(len(ks)) if i not in contract)

"""`matrix`: a parametrization whose full product runs with `-m slow`, and a covering subset by default.

Exhaustive matrices (every format × dtype × block size) are worth running, but not on every run of the suite:
the default run (README's test command deselects `slow`) keeps a covering subset, in which every value of every
axis appears at least once; `pytest -m slow` runs the rest.
"""

import itertools

import pytest


def matrix(*axes) -> list:
    """`pytest.param`s of every combination of `axes` (each a sequence of values); all but a covering subset
    (case `i` takes value `i mod len` of each axis, for `i < max(len)`) are marked slow.

    >>> [p.values for p in matrix("ab", [1, 2, 3]) if not p.marks]
    [('a', 1), ('a', 3), ('b', 2)]
    >>> len(matrix("ab", [1, 2, 3]))
    6
    """
    axes = [list(axis) for axis in axes]
    covering = {tuple(axis[i % len(axis)] for axis in axes) for i in range(max(len(axis) for axis in axes))}
    return [pytest.param(*case, marks=() if case in covering else pytest.mark.slow)
            for case in itertools.product(*axes)]


def by_default(values, *default) -> list:
    """`pytest.param`s of `values`; those not in `default` marked slow.

    >>> [(p.values, bool(p.marks)) for p in by_default([1, 5, 8], 5)]
    [((1,), True), ((5,), False), ((8,), True)]
    """
    return [pytest.param(v, marks=() if v in default else pytest.mark.slow) for v in values]

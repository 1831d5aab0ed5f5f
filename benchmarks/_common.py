"""Helpers shared by the benchmark scripts: machine description, interleaved
median timing, Markdown tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

NA = "n/a"


def machine_info() -> dict[str, Any]:
    """Describes the host and library versions.

    Example:
        >>> machine_info()["device_kind"]
        'cpu'
    """
    info = {
        "processor": processor_name(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
    }
    for name in ("torch", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def processor_name() -> str:
    """`platform.processor()`, or the CPU model from /proc/cpuinfo where that is empty (Linux)."""
    name = platform.processor()
    if name:
        return name
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def median_ms(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Median wall time of each `fn()` in milliseconds, after one untimed warm-up call each.

    The functions are timed interleaved (one call of each per repeat), so that
    a change in machine load affects all of them alike. Each `fn` must block
    until its result is ready.

    Example:
        >>> len(median_ms([lambda: sum(range(10)), lambda: None], repeats=3))
        2
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            fn_times.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Formats rows as a GitHub Markdown table.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, 2]]))
        | a | b |
        |---|---|
        | 1 | 2 |
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Writes `results` as indented JSON, creating the folder.

    Example:
        >>> write_json(Path("/tmp/qj_bench/x.json"), {"a": 1})
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def add_output_arguments(parser: Any, default_json: Path) -> None:
    """`--json PATH` (where the results go) and `--default-runtime` (skip `qlora_jax.app.configure_cpu()`)."""
    parser.add_argument("--json", type=Path, default=default_json, help="where to write the results")
    parser.add_argument("--default-runtime", action="store_true",
                        help="skip qlora_jax.app.configure_cpu(): JAX's asynchronous dispatch and glibc's malloc "
                             "defaults")


def runtime_text(runtime: Any, note: str = "") -> str:
    """The header line on `qlora_jax.app.configure_cpu()`: what it set, or that the script ran without it.

    Args:
        runtime: What `configure_cpu` returned, or None where it was not called.
        note: Appended when it was called (for example, that it holds for PyTorch too).

    Example:
        >>> runtime_text(None)
        "JAX's asynchronous dispatch, glibc's malloc defaults (--default-runtime, or not a CPU-only machine)"
    """
    if runtime is None:
        return "JAX's asynchronous dispatch, glibc's malloc defaults (--default-runtime, or not a CPU-only machine)"
    return (f"`qlora_jax.app.configure_cpu()` (synchronous dispatch {runtime.synchronous}, freed memory kept "
            f"{runtime.keep_freed_memory}){note}")

"""The `qlora-jax memory` report: architectures of released models and the table of `step_memory` results.

The library measures a step (`qlora_jax._src.memory.step_memory` compiles it
for abstract shapes); this module only names model presets and formats the
measurements for a person.
"""

from __future__ import annotations

from collections.abc import Sequence

from qlora_jax._src.memory import MethodMemory
from qlora_jax._src.models.config import ModelConfig

__all__ = ["PRESETS", "memory_table"]

# Architectures of released models (config.json values), for reports without a download.
PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                              num_layers=32, num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5,
                              max_position_embeddings=4096),
    "llama-2-13b": ModelConfig(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                               num_layers=40, num_heads=40, num_kv_heads=40, rms_norm_eps=1e-5,
                               max_position_embeddings=4096),
    "llama-2-70b": ModelConfig(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                               num_layers=80, num_heads=64, num_kv_heads=8, rms_norm_eps=1e-5,
                               max_position_embeddings=4096),
    "llama-3-8b": ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                              max_position_embeddings=8192),
}


def memory_table(rows: Sequence[MethodMemory]) -> str:
    """A Markdown table of `step_memory` results (GiB), one column per method.

    Args:
        rows: One `MethodMemory` per method, in the column order.

    Returns:
        The table: a header row of method names, then one row per quantity
        (weights, trainable state, the formula's total, the compiled step).

    Example:
        >>> from qlora_jax._src.memory import MethodMemory
        >>> from qlora_jax.app.report import memory_table
        >>> row = MethodMemory(method="qlora", linear_params=2**30, linear_bytes=2**29, other_params=0,
        ...                    other_bytes=0, trainable_params=10, trainable_bytes=40, gradient_bytes=40,
        ...                    optimizer_bytes=80, formula_bytes=2**29, argument_bytes=2**30, output_bytes=0,
        ...                    alias_bytes=0, temp_bytes=2**30)
        >>> lines = memory_table([row]).splitlines()
        >>> lines[0], lines[3], lines[-1]
        ('| | qlora |', '|   byte/param | 0.5000 |', '| compiled: step total (GiB) | 2.00 |')
    """
    gib = 1024**3

    def cell(x: float) -> str:
        return f"{x / gib:.2f}"

    lines = ["| | " + " | ".join(r.method for r in rows) + " |", "|---|" + "---|" * len(rows)]
    spec = [
        ("linear weights (GiB)", lambda r: cell(r.linear_bytes)),
        ("  byte/param", lambda r: f"{r.linear_bytes_per_param:.4f}"),
        ("embeddings, head, norms (GiB, 16-bit)", lambda r: cell(r.other_bytes)),
        ("trainable params", lambda r: f"{r.trainable_params:,}"),
        ("trainable (GiB)", lambda r: cell(r.trainable_bytes)),
        ("gradients (GiB)", lambda r: cell(r.gradient_bytes)),
        ("optimizer state (GiB)", lambda r: cell(r.optimizer_bytes)),
        ("formula total (GiB)", lambda r: cell(r.formula_bytes)),
        ("compiled: arguments (GiB)", lambda r: cell(r.argument_bytes)),
        ("compiled: temporaries (GiB)", lambda r: cell(r.temp_bytes)),
        ("compiled: step total (GiB)", lambda r: cell(r.compiled_total)),
    ]
    if rows:
        lines += [f"| {name} | " + " | ".join(fn(r) for r in rows) + " |" for name, fn in spec]
    return "\n".join(lines)

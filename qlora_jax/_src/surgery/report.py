"""What `apply_qlora` did: one row per replaced layer, with sizes before and after."""

from __future__ import annotations

import dataclasses

__all__ = ["ReplacedLayer", "QLoRAReport"]


@dataclasses.dataclass(frozen=True)
class ReplacedLayer:
    """One linear layer that `apply_qlora` replaced. Biases are unchanged and not counted.

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
    lora_params: int  # elements of lora_a and lora_b
    bytes_before: int  # bytes of the float kernel
    bytes_after: int  # bytes of the kernel as stored now (packed or float) plus the adapter


@dataclasses.dataclass(frozen=True)
class QLoRAReport:
    """Replaced layers, and linear layers left as they were (with the reason).

    Attributes:
        layers: One `ReplacedLayer` per replaced layer, in path order.
        skipped: `(path, reason)` of linear-like layers not replaced: output
            heads and unsupported types.

    Example:
        >>> from qlora_jax.nnx import QLoRAReport, ReplacedLayer
        >>> row = ReplacedLayer("fc", "QLoRALinear", (128, 64), True, 8192, 768, 32768, 7296)
        >>> r = QLoRAReport(layers=(row,), skipped=())
        >>> r.base_params, r.lora_params, r.bytes_before, r.bytes_after
        (8192, 768, 32768, 7296)
    """

    layers: tuple[ReplacedLayer, ...]
    skipped: tuple[tuple[str, str], ...]

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
        return "\n".join(lines)

"""`QuantConfig` and `LoraConfig`: frozen, keyword-only, validated once.

Both are hashable, so they can be passed to `jax.jit` as static values. They
sit at the bottom of the library (they import only `formats`), so the NNX and
Linen layers, the surgery and the models all take the same objects.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

from qlora_jax._src.formats.blockwise import FLOAT_DTYPES
from qlora_jax._src.formats.qarray import BLOCK_SIZES, FORMATS

__all__ = ["QuantConfig", "LoraConfig", "ALL_LINEAR", "HEAD_NAMES", "INITS", "WEIGHT_INITS", "lora_scale",
           "pissa_niter"]

# `LoraConfig.targets` value meaning every linear layer (nnx.Linear, LinearGeneral, Einsum) except the output head.
ALL_LINEAR = "all-linear"
# Last path components that mark an output head, excluded from "all-linear" and from quantization.
HEAD_NAMES: tuple[str, ...] = ("lm_head", "head", "output")
# Adapter initializations, PEFT's `init_lora_weights` values: True ("default"), "gaussian", and the ones that read
# the base weight: "pissa" (exact SVD; "pissa_niter_N": randomized SVD with N subspace iterations), "olora" (QR)
# and "loftq" (alternating NF4 quantization and SVD, `loftq_iter` rounds).
INITS: tuple[str, ...] = ("default", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq")
# Inits computed from the base weight (and, on a quantized base, changing the stored base to a residual).
WEIGHT_INITS: tuple[str, ...] = ("pissa", "olora", "loftq")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How the frozen base kernels are stored and multiplied.

    Every linear layer (`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`)
    outside the output head is quantized (as bitsandbytes' `load_in_4bit`,
    which skips `lm_head`). Blocks of `block_size` run along the input axis;
    where the input size (the product of the kernel's input axes) is not a
    multiple of `block_size`, they run over the flattened `[out, in]` weight
    and cross rows, exactly as bitsandbytes stores any shape.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlora_jax.nnx import QuantConfig
        >>> QuantConfig(fmt="nf4", block_size=64, double_quant=True, compute_dtype=jnp.bfloat16).compute_dtype
        dtype(bfloat16)
    """

    fmt: str = "nf4"  # "nf4", "fp4", "int4" or "int8"
    block_size: int = 64  # elements per absmax block along the input axis: 32 or 64..4096 (powers of two)
    double_quant: bool = True  # quantize the absmax values to 8 bits too (bitsandbytes' compress_statistics)
    compute_dtype: np.dtype | None = None  # dtype of the matmuls; None: the layer's dtype, else the input's

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"QuantConfig.fmt: unknown format {self.fmt!r}; expected one of {sorted(FORMATS)}")
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES:
            raise ValueError(f"QuantConfig.block_size: {self.block_size!r} is not one of {BLOCK_SIZES}")
        if not isinstance(self.double_quant, (bool, np.bool_)):
            raise ValueError(f"QuantConfig.double_quant: expected a bool, got {self.double_quant!r}")
        object.__setattr__(self, "double_quant", bool(self.double_quant))
        if self.compute_dtype is not None:
            try:
                dtype = np.dtype(self.compute_dtype)
            except TypeError:
                dtype = None
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"QuantConfig.compute_dtype: {self.compute_dtype!r} is not one of float32, "
                                 "bfloat16, float16 or None")
            object.__setattr__(self, "compute_dtype", dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Where LoRA adapters go and how they behave (PEFT's `LoraConfig` semantics).

    `targets` selects linear layers (`nnx.Linear`, `nnx.LinearGeneral`,
    `nnx.Einsum`): `"all-linear"` (every one except the output head), a
    sequence of names matched against the last component of a layer's path
    (`["q_proj", "v_proj"]`), or any other string, a regular expression that
    must match the whole '/'-joined path (`re.fullmatch`, as PEFT), e.g.
    `r".*/attn/(q|v)_proj"`.

    Example:
        >>> from qlora_jax.nnx import LoraConfig
        >>> cfg = LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"])
        >>> cfg.targets, cfg.scale
        (('q_proj', 'v_proj'), 2.0)
    """

    rank: int = 16  # adapter rank r (> 0)
    alpha: float = 32  # lora_alpha (> 0); the scaling is alpha / rank, or alpha / sqrt(rank) with rslora
    dropout: float = 0.0  # dropout probability of the adapter input, in [0, 1)
    targets: str | tuple[str, ...] = ALL_LINEAR  # "all-linear", layer names, or a regex over the path
    rslora: bool = False  # rank-stabilized scaling alpha / sqrt(rank)
    init: str = "default"  # "default" (kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r^2), zero B), or from
    #   the base weight: "pissa", "pissa_niter_N", "olora", "loftq" (see INITS)
    loftq_iter: int = 1  # alternations of NF4 quantization and SVD for init="loftq" (PEFT's LoftQConfig.loftq_iter)
    use_dora: bool = False  # DoRA (weight-decomposed LoRA): a trained magnitude per output (PEFT's use_dora)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank: must be a positive integer, got {self.rank!r}")
        object.__setattr__(self, "rank", int(self.rank))
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.number))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"LoraConfig.alpha: must be a positive number, got {self.alpha!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float, np.number))
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoraConfig.dropout: must lie in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if not isinstance(self.rslora, (bool, np.bool_)):
            raise ValueError(f"LoraConfig.rslora: expected a bool, got {self.rslora!r}")
        object.__setattr__(self, "rslora", bool(self.rslora))
        if pissa_niter(self.init) is None and (self.init not in INITS or self.init == "pissa_niter_N"):
            raise ValueError(f"LoraConfig.init: unknown init {self.init!r}; expected one of {INITS} "
                             "(N a positive integer)")
        if (isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, (int, np.integer))
                or self.loftq_iter < 1):
            raise ValueError(f"LoraConfig.loftq_iter: must be a positive integer, got {self.loftq_iter!r}")
        object.__setattr__(self, "loftq_iter", int(self.loftq_iter))
        if not isinstance(self.use_dora, (bool, np.bool_)):
            raise ValueError(f"LoraConfig.use_dora: expected a bool, got {self.use_dora!r}")
        object.__setattr__(self, "use_dora", bool(self.use_dora))
        object.__setattr__(self, "targets", _normalize_targets(self.targets))

    @property
    def weight_init(self) -> bool:
        """Whether the adapter's init reads the base weight ("pissa", "pissa_niter_N", "olora", "loftq")."""
        return self.init in WEIGHT_INITS or pissa_niter(self.init) is not None

    @property
    def scale(self) -> float:
        """`alpha / rank`, or `alpha / √rank` with `rslora`."""
        return lora_scale(self.rank, self.alpha, self.rslora)


def _normalize_targets(targets: str | Sequence[str]) -> str | tuple[str, ...]:
    if isinstance(targets, str):
        if not targets:
            raise ValueError("LoraConfig.targets: empty string; use 'all-linear', a list of layer names or a regex")
        if targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"LoraConfig.targets: {targets!r} is not a valid regular expression ({e})") from None
        return targets
    if not isinstance(targets, Sequence) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"LoraConfig.targets: expected 'all-linear', a regex string or a non-empty sequence of "
                         f"layer names, got {targets!r}")
    return tuple(targets)


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's scaling: `alpha / rank`, or `alpha / √rank` with rsLoRA.

    Args:
        rank: The adapter rank `r`.
        alpha: `lora_alpha`.
        rslora: Rank-stabilized scaling.

    Returns:
        The scale as a Python float (weakly typed in JAX arithmetic).

    Example:
        >>> from qlora_jax.nnx import lora_scale
        >>> lora_scale(16, 32), lora_scale(16, 32, rslora=True)
        (2.0, 8.0)
    """
    return float(alpha) / (math.sqrt(rank) if rslora else float(rank))


def pissa_niter(init: str) -> int | None:
    """The `N` of a `"pissa_niter_N"` init (randomized SVD with N subspace iterations), else None.

    Args:
        init: A `LoraConfig.init` value.

    Returns:
        `N`, or None when `init` is not of that form.

    Example:
        >>> from qlora_jax.nnx import pissa_niter
        >>> pissa_niter("pissa_niter_4"), pissa_niter("pissa")
        (4, None)
    """
    m = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(m.group(1)) if m else None

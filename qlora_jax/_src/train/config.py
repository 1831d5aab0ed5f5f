"""`TrainConfig`: the optimizer, schedule and step settings of a fine-tuning run.

The defaults are QLoRA's (Dettmers et al., 2023, and its `qlora.py`): AdamW
at 2e-4, a constant schedule after a 3% linear warmup, gradients clipped to
a global norm of 0.3, no weight decay.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["TrainConfig", "SCHEDULES"]

# `TrainConfig.schedule` values: the shape of the learning rate after the warmup.
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How the adapters are trained; frozen and hashable (a static `jit` argument).

    The learning rate warms up linearly from 0 over
    `warmup_steps = ceil(warmup_ratio * total_steps)` updates, then stays
    constant, decays linearly to 0 at `total_steps`, or follows half a cosine
    to 0 at `total_steps`, as `transformers`' `constant_with_warmup`,
    `linear` and `cosine` schedules (so the first update has learning rate 0
    when there is a warmup).

    Example:
        >>> from qlora_jax.train import TrainConfig
        >>> cfg = TrainConfig(total_steps=1000, schedule="cosine")
        >>> cfg.lr, cfg.warmup_steps, cfg.max_grad_norm
        (0.0002, 30, 0.3)
    """

    total_steps: int  # optimizer updates in the run (> 0); the schedule ends here
    lr: float = 2e-4  # peak learning rate (> 0)
    schedule: str = "constant"  # "constant", "linear" or "cosine" after the warmup
    warmup_ratio: float = 0.03  # fraction of total_steps spent warming up from 0, in [0, 1]
    max_grad_norm: float | None = 0.3  # clip the global gradient norm to this (> 0); None disables clipping
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (>= 0)
    b1: float = 0.9  # Adam's first-moment decay, in [0, 1)
    b2: float = 0.999  # Adam's second-moment decay, in [0, 1)
    eps: float = 1e-8  # Adam's epsilon (> 0)
    grad_accum: int = 1  # micro-batches per update: a batch of B rows is run as grad_accum slices of B / grad_accum
    seed: int = 0  # `Trainer` reseeds the model's "dropout" RNG streams with it; a data pipeline may use it too
    loss_chunk: int | None = 1024  # tokens whose logits exist at once in the loss (chunked_cross_entropy); None: all

    def __post_init__(self) -> None:
        _check_int(self, "total_steps", minimum=1)
        _check_float(self, "lr", lambda v: v > 0, "a positive number")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule: unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        _check_float(self, "warmup_ratio", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
        if self.max_grad_norm is not None:
            _check_float(self, "max_grad_norm", lambda v: v > 0, "a positive number or None")
        _check_float(self, "weight_decay", lambda v: v >= 0, "a non-negative number")
        _check_float(self, "b1", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
        _check_float(self, "b2", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
        _check_float(self, "eps", lambda v: v > 0, "a positive number")
        _check_int(self, "grad_accum", minimum=1)
        _check_int(self, "seed", minimum=0)
        if self.loss_chunk is not None:
            _check_int(self, "loss_chunk", minimum=1)

    @property
    def warmup_steps(self) -> int:
        """`ceil(warmup_ratio * total_steps)`, as `transformers.TrainingArguments`."""
        return math.ceil(self.warmup_ratio * self.total_steps)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict (stored with checkpoints).

        Example:
            >>> from qlora_jax.train import TrainConfig
            >>> TrainConfig(total_steps=10).to_dict()["schedule"]
            'constant'
        """
        return dataclasses.asdict(self)


def _check_int(cfg: TrainConfig, name: str, *, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"TrainConfig.{name}: must be an integer >= {minimum}, got {value!r}")
    object.__setattr__(cfg, name, int(value))


def _check_float(cfg: TrainConfig, name: str, ok, expected: str) -> None:
    value = getattr(cfg, name)
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(value) or not ok(value)):
        raise ValueError(f"TrainConfig.{name}: must be {expected}, got {value!r}")
    object.__setattr__(cfg, name, float(value))

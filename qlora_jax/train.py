"""Fine-tuning: TrainConfig, AdamW + schedules, jitted train/eval steps and `Trainer` (checkpoints: `qj.checkpoint`).

Example:
    >>> from qlora_jax.train import TrainConfig
    >>> TrainConfig(total_steps=100).warmup_steps
    3
"""

from qlora_jax._src.train import *  # noqa: F403  (the public names, listed in __all__ there)
from qlora_jax._src.train import __all__  # noqa: F401

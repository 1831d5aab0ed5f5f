"""Fine-tuning: TrainConfig, AdamW + schedules, jitted train/eval steps, exact resume.

Example:
    >>> from qlora_jax.train import TrainConfig
    >>> TrainConfig(total_steps=100).warmup_steps
    3
"""

from qlora_jax._src.train import (
    BATCH_KEYS,
    MODEL_INPUT_KEYS,
    SCHEDULES,
    TrainConfig,
    Trainer,
    eval_step,
    evaluate,
    make_optimizer,
    make_schedule,
    masked_cross_entropy,
    restore,
    save,
    train_step,
)

__all__ = [
    "BATCH_KEYS",
    "MODEL_INPUT_KEYS",
    "SCHEDULES",
    "TrainConfig",
    "Trainer",
    "eval_step",
    "evaluate",
    "make_optimizer",
    "make_schedule",
    "masked_cross_entropy",
    "restore",
    "save",
    "train_step",
]

"""Fine-tuning: `TrainConfig`, the AdamW optimizer and schedules, jitted train/eval steps, `Trainer`."""

from qlora_jax._src.train.config import SCHEDULES, TrainConfig
from qlora_jax._src.train.loss import chunked_cross_entropy, masked_cross_entropy
from qlora_jax._src.train.optim import make_optimizer, make_schedule
from qlora_jax._src.train.step import BATCH_KEYS, MODEL_INPUT_KEYS, eval_step, evaluate, train_step
from qlora_jax._src.train.trainer import Trainer

__all__ = [
    "BATCH_KEYS",
    "MODEL_INPUT_KEYS",
    "SCHEDULES",
    "TrainConfig",
    "Trainer",
    "chunked_cross_entropy",
    "eval_step",
    "evaluate",
    "make_optimizer",
    "make_schedule",
    "masked_cross_entropy",
    "train_step",
]

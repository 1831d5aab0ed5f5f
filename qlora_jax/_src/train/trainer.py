"""`Trainer`: the model, its optimizer and the config of a run, for a notebook or a script."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from qlora_jax._src import checkpoint
from qlora_jax._src.train.config import TrainConfig
from qlora_jax._src.train.optim import make_optimizer
from qlora_jax._src.train.step import Batch, bound_train_step, check_batch, evaluate

__all__ = ["Trainer"]


class Trainer:
    """Trains the `wrt` variables of `model` in place with `TrainConfig`'s AdamW and schedule.

    By default `wrt` is `nnx.LoRAParam`: only the adapters are differentiated
    and updated, the (packed) base stays frozen. `wrt=nnx.Param` trains every
    parameter of a float model (e.g. pre-training before quantization).

    Creating a Trainer reseeds the model's "dropout" RNG streams from
    `config.seed` (`nnx.reseed`), so the dropout masks of a run follow from
    its config; `restore` then brings back the saved streams.

    Attributes:
        model: The model being trained (updated in place).
        config: The `TrainConfig`.
        optimizer: `nnx.Optimizer(model, make_optimizer(config), wrt=wrt)`.

    Example:
        >>> import numpy as np, qlora_jax as qj
        >>> from flax import nnx
        >>> class TinyLM(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.embed = nnx.Embed(16, 64, rngs=rngs)
        ...         self.proj = nnx.Linear(64, 64, rngs=rngs)
        ...         self.lm_head = nnx.Linear(64, 16, rngs=rngs)
        ...     def __call__(self, input_ids, **kwargs):
        ...         return self.lm_head(self.proj(self.embed(input_ids)))
        >>> model = qj.apply_qlora(TinyLM(nnx.Rngs(0)), quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=4),
        ...                        rngs=nnx.Rngs(1))
        >>> trainer = qj.train.Trainer(model, qj.train.TrainConfig(total_steps=20, lr=1e-2, warmup_ratio=0.0))
        >>> ids = np.tile(np.arange(8, dtype=np.int32), (4, 1))
        >>> batch = {"input_ids": ids, "targets": (ids + 1) % 16, "weights": np.ones((4, 8), np.float32)}
        >>> before = trainer.evaluate([batch])["loss"]
        >>> for _ in range(20):
        ...     metrics = trainer.train_step(batch)
        >>> trainer.step, trainer.evaluate([batch])["loss"] < before
        (20, True)
    """

    def __init__(self, model: nnx.Module, config: TrainConfig, *, wrt: nnx.filterlib.Filter = nnx.LoRAParam):
        """Reseeds the model's dropout streams and creates the optimizer.

        Args:
            model: A model with `nnx.LoRAParam` adapters (e.g. after `apply_qlora`),
                or any model with variables that `wrt` selects.
            config: The `TrainConfig`.
            wrt: The variables to differentiate and update (an `nnx` filter);
                default the adapters, `nnx.Param` for full training of a float model.

        Raises:
            TypeError: `config` is not a `TrainConfig`.
            ValueError: `model` has no variable that `wrt` selects.
        """
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if not jax.tree.leaves(nnx.state(model, wrt)):
            if wrt is nnx.LoRAParam:
                raise ValueError("model: has no nnx.LoRAParam variables to train; add adapters with qj.apply_qlora")
            raise ValueError(f"model: has no variables selected by wrt={wrt!r} to train")
        nnx.reseed(model, dropout=config.seed, policy="match_shape")
        self.model = model
        self.config = config
        self.optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=wrt)
        # Restored arrays are committed to their devices; committing every array now, where it already is, gives
        # the step the same signature before and after `restore` (no second compilation, and a persistent
        # compilation cache hit when a new process resumes).
        _commit(model)
        _commit(self.optimizer)
        # `bound_train_step`, made at the first step, the modules it saw and their modes then
        self._step: Any = None
        self._modules: list[nnx.Module] = []
        self._modes: tuple[Any, ...] = ()

    @property
    def step(self) -> int:
        """Updates applied so far (the optimizer's step count)."""
        return int(self.optimizer.step[...])

    def train_step(self, batch: Batch) -> dict[str, jax.Array]:
        """One update on `batch`; returns `loss`, `grad_norm`, `lr`, `tokens` (see `qj.train.train_step`).

        The same step as `qj.train.train_step` with `micro_batches=config.grad_accum`
        and `loss_chunk=config.loss_chunk`, without its per-call walk over the
        model's and optimizer's graphs in Python: the step is bound to the
        trainer's model and optimizer at its first call and bound again when a
        module's mode changes (`model.train()` / `model.eval()`);
        `restore` and `shard_model` write into the same variables, which the
        bound step reads. Replace `trainer.model`'s modules only through a new
        `Trainer`.
        """
        batch = check_batch(batch, self.config.grad_accum, "TrainConfig.grad_accum")
        if self._step is None or _modes(self._modules) != self._modes:
            self._modules = [module for _, module in nnx.iter_modules(self.model)]
            self._step, self._modes = bound_train_step(self.model, self.optimizer), _modes(self._modules)
        return self._step(batch, micro_batches=self.config.grad_accum, loss_chunk=self.config.loss_chunk)

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """`loss`, `perplexity` and `tokens` over `batches`, without dropout (see `qj.train.evaluate`)."""
        return evaluate(self.model, batches)

    def save(self, directory: str | os.PathLike, data_state: Any = None, *, max_to_keep: int | None = 3) -> Path:
        """Saves adapters, RNG and optimizer state, the config and `data_state` as step `self.step`.

        Returns the step's directory (see `qj.checkpoint.save`).
        """
        return checkpoint.save(directory, self.model, self.optimizer, step=self.step, data_state=data_state,
                               config=self.config, max_to_keep=max_to_keep)

    def restore(self, directory: str | os.PathLike, *, step: int | None = None) -> Any:
        """Restores the latest (or the given) step in place and returns its `data_state`.

        Raises `ValueError` when the checkpoint was saved with a different
        `TrainConfig`, before anything is restored (see `qj.checkpoint.restore`).
        """
        # Restored values go into the same variables (`nnx.update`): the bound step reads them, uncompiled again.
        return checkpoint.restore(directory, self.model, self.optimizer, step=step, config=self.config).data_state


def _modes(modules: list[nnx.Module]) -> tuple[Any, ...]:
    """The modules' `deterministic` and `use_running_average` flags (what `model.train()` / `eval()` set)."""
    return tuple((getattr(m, "deterministic", None), getattr(m, "use_running_average", None)) for m in modules)


def _commit(node: nnx.Module | nnx.Optimizer) -> None:
    """Commits every array of `node` to the devices it is on (no copy)."""
    nnx.update(node, jax.tree.map(lambda x: jax.device_put(x, x.sharding), nnx.state(node)))

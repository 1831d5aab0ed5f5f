"""Orbax checkpoints of a fine-tuning run: adapters, RNG and optimizer state, step, data position and config.

Example:
    >>> import tempfile, qlora_jax as qj
    >>> qj.checkpoint.latest_step(tempfile.mkdtemp()) is None
    True
"""

from qlora_jax._src.checkpoint import (
           CheckpointMetadata,
           DamagedCheckpoint,
           DamagedCheckpointWarning,
           latest_step,
           metadata,
           restore,
           save,
)

__all__ = ["CheckpointMetadata", "DamagedCheckpoint", "DamagedCheckpointWarning", "latest_step", "metadata", "restore",
           "save"]

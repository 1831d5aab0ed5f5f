"""Orbax checkpoints of a fine-tuning run: adapters, optimizer state, step and extras.

Example:
    >>> import tempfile, qlora_jax as qj
    >>> qj.checkpoint.latest_step(tempfile.mkdtemp()) is None
    True
"""

from qlora_jax._src.checkpoint import latest_step, restore, save

__all__ = ["latest_step", "restore", "save"]

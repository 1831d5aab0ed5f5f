"""Llama-family models (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3) from Hugging Face checkpoints.

Example:
    >>> from qlora_jax.models import ModelConfig
    >>> ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
    ...             num_kv_heads=2).head_dim
    16
"""

from qlora_jax._src.models import *  # noqa: F403  (the public names, listed in __all__ there)
from qlora_jax._src.models import __all__  # noqa: F401

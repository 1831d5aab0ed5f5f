"""Fine-tuning data: rows from JSONL, JSON, CSV, Parquet, Arrow or `datasets` sources, loss masks, packed or padded
NumPy batches with resumable shuffling.

Example:
    >>> from qlora_jax.data import row_kind
    >>> row_kind({"prompt": "2+2=", "completion": "4"})
    'prompt_completion'
"""

from qlora_jax._src.data import *  # noqa: F403  (the public names, listed in __all__ there)
from qlora_jax._src.data import __all__  # noqa: F401

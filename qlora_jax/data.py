"""Fine-tuning data: JSONL rows, loss masks, packed or padded NumPy batches with resumable shuffling.

Example:
    >>> from qlora_jax.data import row_kind
    >>> row_kind({"prompt": "2+2=", "completion": "4"})
    'prompt_completion'
"""

from qlora_jax._src.data import (
    ROLES,
    SCHEMAS,
    Batcher,
    DataStats,
    Example,
    collate,
    count_tokens,
    load_examples,
    load_jsonl,
    pack_examples,
    row_kind,
    tokenize_examples,
)

__all__ = [
    "ROLES",
    "SCHEMAS",
    "Batcher",
    "DataStats",
    "Example",
    "collate",
    "count_tokens",
    "load_examples",
    "load_jsonl",
    "pack_examples",
    "row_kind",
    "tokenize_examples",
]

"""Fine-tuning data: rows from JSONL, JSON, CSV, Parquet, Arrow or `datasets`; tokenization with loss masks;
packed or padded batches.

Example:
    >>> from qlora_jax._src.data import Batcher, Example
    >>> batch = next(Batcher([Example([1, 2, 3], [0, 1, 1])], batch_size=1, seq_len=4))
    >>> sorted(batch)
    ['input_ids', 'positions', 'segment_ids', 'targets', 'weights']
"""

from qlora_jax._src.data.batching import Batcher, collate, count_tokens, pack_examples
from qlora_jax._src.data.jsonl import ROLES, SCHEMAS, load_jsonl, row_kind
from qlora_jax._src.data.sources import iter_rows
from qlora_jax._src.data.tokenize import DataStats, Example, load_examples, tokenize_examples

__all__ = [
    "ROLES",
    "SCHEMAS",
    "Batcher",
    "DataStats",
    "Example",
    "collate",
    "count_tokens",
    "iter_rows",
    "load_examples",
    "load_jsonl",
    "pack_examples",
    "row_kind",
    "tokenize_examples",
]

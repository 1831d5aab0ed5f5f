"""Examples to fixed-shape numpy batches: packing, padding, shuffling, resuming.

With `pack=True` examples are packed into rows of exactly `seq_len` tokens
by best-fit decreasing (the longest example first, each into the fullest row
it fits; as TRL's "bfd" packing), once, when the `Batcher` is built. Each row
carries `segment_ids` (1, 2, ... per example, 0 for padding) and `positions`
restarting at 0 per example, so `CausalLM(..., positions=, segment_ids=)`
computes every example exactly as if it ran alone. With `pack=False` each
example is one row, right-padded, with an `attention_mask`.

Targets are the next token of the same example: `targets[t] = input_ids[t+1]`
with weight `loss_mask[t+1]`; the last token of each example, and padding,
have weight 0, so no target crosses an example boundary.

Each epoch visits the rows in an order drawn from
`numpy.random.default_rng([seed, epoch])` (or in build order without
shuffling). The position is `(epoch, index)` (rows already served in the
epoch), so a restored `Batcher` continues exactly where the saved one stood.
The last batch of an epoch is filled with empty rows (weight 0) so every
batch has the same shape (no recompilation under `jit`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from qlora_jax._src.data.tokenize import Example

__all__ = ["Batcher", "collate", "count_tokens", "pack_examples"]


def pack_examples(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit-decreasing packing of examples into rows of `seq_len` tokens.

    Deterministic: examples are taken longest first (ties in index order), each
    into the open row with the least room that still fits it, else a new row.

    Args:
        lengths: Tokens in each example, each in `[1, seq_len]`.
        seq_len: Tokens per row.

    Returns:
        Rows as lists of example indices, in the order the rows were opened.

    Raises:
        ValueError: A length outside `[1, seq_len]` (naming the example).

    Example:
        >>> from qlora_jax._src.data import pack_examples
        >>> pack_examples([3, 6, 2, 5, 4], seq_len=8)
        [[1, 2], [3, 0], [4]]
    """
    for i, n in enumerate(lengths):
        if not 1 <= n <= seq_len:
            raise ValueError(f"example {i}: {n} tokens, expected 1 to seq_len={seq_len}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []  # sorted distinct free space of the open rows
    open_rows: dict[int, list[int]] = {}  # free space -> rows with that much
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(room, n)
        if j < len(room):
            free = room[j]
            r = open_rows[free].pop()
            if not open_rows[free]:
                del open_rows[free]
                room.pop(j)
        else:
            free, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        free -= n
        if free:
            if free not in open_rows:
                bisect.insort(room, free)
                open_rows[free] = []
            open_rows[free].append(r)
    return rows


def collate(
    rows: Sequence[Sequence[Example]],
    batch_size: int,
    seq_len: int,
    *,
    pack: bool = True,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """One batch from rows of examples; missing rows are empty (all padding).

    Args:
        rows: At most `batch_size` rows, each a sequence of examples whose
            lengths sum to at most `seq_len` (one example per row when
            `pack=False`).
        batch_size: Rows in the batch, `B`.
        seq_len: Tokens per row, `S`.
        pack: Emit `segment_ids` (else `attention_mask`).
        pad_id: Token id of padding and of targets with weight 0.

    Returns:
        `input_ids`, `targets`, `positions` int32 `[B, S]`; `weights` float32
        `[B, S]`; and `segment_ids` int32 `[B, S]` (1, 2, ... per example, 0 for
        padding) when `pack`, else `attention_mask` int32 `[B, S]` (1 real, 0 padding).

    Raises:
        ValueError: Too many rows, a row longer than `seq_len`, or several
            examples in a row with `pack=False`.

    Example:
        >>> from qlora_jax._src.data import Example, collate
        >>> a, b = Example([7, 8, 9], [0, 1, 1]), Example([5, 6], [0, 1])
        >>> batch = collate([[a, b]], batch_size=1, seq_len=6)
        >>> for key in ("input_ids", "targets", "weights", "positions", "segment_ids"):
        ...     print(key, batch[key][0].tolist())
        input_ids [7, 8, 9, 5, 6, 0]
        targets [8, 9, 0, 6, 0, 0]
        weights [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
        positions [0, 1, 2, 0, 1, 0]
        segment_ids [1, 1, 1, 2, 2, 0]
    """
    if len(rows) > batch_size:
        raise ValueError(f"rows: {len(rows)} rows for batch_size={batch_size}")
    shape = (batch_size, seq_len)
    input_ids = np.full(shape, pad_id, np.int32)
    targets = np.full(shape, pad_id, np.int32)
    weights = np.zeros(shape, np.float32)
    positions = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        if not pack and len(row) > 1:
            raise ValueError(f"rows[{r}]: {len(row)} examples in one row, but pack=False")
        if sum(len(ex) for ex in row) > seq_len:
            raise ValueError(f"rows[{r}]: {sum(len(ex) for ex in row)} tokens, more than seq_len={seq_len}")
        start = 0
        for segment, ex in enumerate(row, start=1):
            n = len(ex)
            stop = start + n
            input_ids[r, start:stop] = ex.input_ids
            targets[r, start:stop - 1] = ex.input_ids[1:]  # the last token predicts nothing
            weights[r, start:stop - 1] = ex.loss_mask[1:]
            positions[r, start:stop] = np.arange(n, dtype=np.int32)
            segment_ids[r, start:stop] = segment
            start = stop
    batch = {"input_ids": input_ids, "targets": targets, "weights": weights, "positions": positions}
    if pack:
        batch["segment_ids"] = segment_ids
    else:
        batch["attention_mask"] = (segment_ids > 0).astype(np.int32)
    return batch


def count_tokens(batch: dict[str, np.ndarray]) -> int:
    """Non-padding tokens in a batch (for tokens/s).

    Example:
        >>> from qlora_jax._src.data import Example, collate, count_tokens
        >>> count_tokens(collate([[Example([1, 2, 3], [0, 1, 1])]], batch_size=2, seq_len=8))
        3
    """
    real = batch["segment_ids"] if "segment_ids" in batch else batch["attention_mask"]
    return int(np.count_nonzero(real))


class Batcher:
    """An iterator of fixed-shape numpy batches over examples, with a resumable position.

    Rows (packed, or one per example) are built once; epoch `e` visits them in
    the order `numpy.random.default_rng([seed, e]).permutation(num_rows)` (build
    order when `shuffle=False`), `batch_size` rows per batch; the last batch of
    an epoch is completed with empty rows. Batches are `collate`'s dicts.

    Attributes:
        examples: The examples.
        batch_size: Rows per batch, `B`.
        seq_len: Tokens per row, `S`.
        pack: Pack several examples per row (`segment_ids`), else pad each (`attention_mask`).
        shuffle: Shuffle the rows each epoch.
        seed: Seed of the shuffle.
        num_epochs: Epochs to serve, or None for no end.
        pad_id: Token id of padding.

    Example:
        >>> from qlora_jax._src.data import Batcher, Example
        >>> examples = [Example(list(range(1, n + 1)), [True] * n) for n in (3, 5, 2, 6, 4)]
        >>> batcher = Batcher(examples, batch_size=2, seq_len=8, seed=0, num_epochs=2)
        >>> batcher.num_rows, batcher.num_batches_per_epoch, batcher.num_batches
        (3, 2, 4)
        >>> batch = next(batcher)
        >>> batch["input_ids"].shape, batch["weights"].dtype
        ((2, 8), dtype('float32'))
        >>> state = batcher.state()
        >>> state
        {'epoch': 0, 'index': 2, 'seed': 0, 'num_rows': 3}
        >>> rest = list(batcher)
        >>> again = Batcher(examples, batch_size=2, seq_len=8, seed=0, num_epochs=2).restore(state)
        >>> all((a[k] == b[k]).all() for a, b in zip(rest, again, strict=True) for k in a)
        True
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seq_len: int,
        *,
        pack: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        num_epochs: int | None = 1,
        pad_id: int = 0,
    ):
        """Builds the rows (packing if `pack`) and starts at epoch 0, row 0.

        Args:
            examples: Tokenized examples, each at most `seq_len` tokens.
            batch_size: Rows per batch.
            seq_len: Tokens per row.
            pack: Pack examples into rows (best-fit decreasing).
            shuffle: Shuffle the rows each epoch.
            seed: Seed of the shuffle (an int >= 0).
            num_epochs: Epochs to serve (None: never stop).
            pad_id: Token id of padding and of targets with weight 0.

        Raises:
            ValueError: No examples, a bad size, or an example longer than `seq_len` (named).
        """
        if not examples:
            raise ValueError("examples: empty dataset (no examples)")
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
            raise ValueError(f"num_epochs: expected a positive int or None, got {num_epochs!r}")
        lengths = [len(ex) for ex in examples]
        for i, n in enumerate(lengths):
            if n > seq_len:
                raise ValueError(f"examples[{i}]: {n} tokens, more than seq_len={seq_len} (tokenize with this "
                                 "seq_len to truncate)")
        self.examples = examples
        self.batch_size, self.seq_len = batch_size, seq_len
        self.pack, self.shuffle, self.seed = bool(pack), bool(shuffle), seed
        self.num_epochs, self.pad_id = num_epochs, pad_id
        self._rows = pack_examples(lengths, seq_len) if pack else [[i] for i in range(len(examples))]
        self._num_tokens = sum(lengths)
        self._epoch, self._index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, row order) cache

    @classmethod
    def for_eval(
        cls, examples: Sequence[Example], batch_size: int, seq_len: int, *, pack: bool = True, pad_id: int = 0
    ) -> Batcher:
        """A `Batcher` for evaluation: no shuffling, one pass.

        Example:
            >>> from qlora_jax._src.data import Batcher, Example
            >>> examples = [Example([1, 2, 3], [0, 1, 1]), Example([4, 5], [0, 1])]
            >>> [b["input_ids"].tolist() for b in Batcher.for_eval(examples, batch_size=2, seq_len=4, pack=False)]
            [[[1, 2, 3, 0], [4, 5, 0, 0]]]
        """
        return cls(examples, batch_size, seq_len, pack=pack, shuffle=False, num_epochs=1, pad_id=pad_id)

    @property
    def num_rows(self) -> int:
        """Rows of `seq_len` tokens per epoch."""
        return len(self._rows)

    @property
    def num_batches_per_epoch(self) -> int:
        """`ceil(num_rows / batch_size)`."""
        return math.ceil(self.num_rows / self.batch_size)

    @property
    def num_batches(self) -> int | None:
        """Batches over all epochs (None when `num_epochs` is None)."""
        return None if self.num_epochs is None else self.num_epochs * self.num_batches_per_epoch

    @property
    def tokens_per_batch(self) -> float:
        """Mean non-padding tokens per batch over an epoch (see `count_tokens` for one batch)."""
        return self._num_tokens / self.num_batches_per_epoch

    @property
    def fill(self) -> float:
        """Fraction of the epoch's row slots that hold real tokens (padding excluded)."""
        return self._num_tokens / (self.num_rows * self.seq_len)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def __iter__(self) -> Batcher:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        order = self._epoch_order()
        take = order[self._index:self._index + self.batch_size]
        rows = [[self.examples[i] for i in self._rows[r]] for r in take]
        batch = collate(rows, self.batch_size, self.seq_len, pack=self.pack, pad_id=self.pad_id)
        self._index += len(take)
        if self._index >= self.num_rows:
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self._epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, self._epoch]).permutation(self.num_rows)
            else:
                order = np.arange(self.num_rows)
            self._order = (self._epoch, order)
        return self._order[1]

    def state(self) -> dict[str, int]:
        """The position, as a JSON-able dict: `epoch`, `index` (rows served in
        the epoch), and `seed` and `num_rows` (checked by `restore`).

        Example:
            >>> from qlora_jax._src.data import Batcher, Example
            >>> Batcher([Example([1, 2], [0, 1])], batch_size=1, seq_len=2).state()
            {'epoch': 0, 'index': 0, 'seed': 0, 'num_rows': 1}
        """
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed, "num_rows": self.num_rows}

    def restore(self, state: dict[str, Any]) -> Batcher:
        """Continues from a `state()` of a `Batcher` built with the same examples and settings.

        Args:
            state: A dict from `state()` (e.g. after a JSON round trip).

        Returns:
            `self`, positioned at `state`.

        Raises:
            ValueError: A malformed state, or one from a different dataset or
                seed (the mismatching key named).

        Example:
            >>> from qlora_jax._src.data import Batcher, Example
            >>> b = Batcher([Example([1, 2], [0, 1])] * 3, batch_size=1, seq_len=2, num_epochs=None)
            >>> b.restore({"epoch": 4, "index": 2, "seed": 0, "num_rows": 3}).epoch
            4
        """
        expected = ("epoch", "index", "seed", "num_rows")
        if not isinstance(state, dict) or set(state) != set(expected):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: expected keys {list(expected)}, got {got}")
        for key in expected:
            if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
                raise ValueError(f"state[{key!r}]: expected an int >= 0, got {state[key]!r}")
        for key, mine in (("seed", self.seed), ("num_rows", self.num_rows)):
            if state[key] != mine:
                raise ValueError(f"state[{key!r}] is {state[key]}, but this Batcher has {key}={mine} (saved from a "
                                 "different dataset or settings)")
        if state["index"] >= self.num_rows:
            raise ValueError(f"state['index']: {state['index']} is past the epoch's {self.num_rows} rows")
        self._epoch, self._index = state["epoch"], state["index"]
        return self

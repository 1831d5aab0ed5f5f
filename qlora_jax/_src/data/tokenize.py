"""Rows to token ids and loss masks.

Every row becomes one string and the character spans that carry loss; the
string is tokenized once (with `add_special_tokens=False`, batched for plain
rows) and a token carries loss when its character offsets overlap a span,
the rule `transformers` uses for `{% generation %}` assistant masks (a token
with empty offsets `(k, k)` counts as the character before `k`: byte-level
tokenizers that trim offsets report a lone space token so, one past it):

* `text`: the whole text.
* `prompt`/`completion`: `prompt + completion` is tokenized as one string (the
  tokens a model reads), and the completion's characters carry loss. A token
  that merges across the boundary carries loss.
* `messages`: rendered with `tokenizer.apply_chat_template`. When the template
  marks assistant text with `{% generation %}` blocks, the mask is
  `return_assistant_tokens_mask`. Otherwise each assistant turn `i` spans from
  the end of `render(messages[:i], add_generation_prompt=True)` (so the
  assistant header does not carry loss) to the end of `render(messages[:i+1])`
  (its content and end-of-turn tokens, and whatever the template appends after
  them); both renders must be prefixes of the whole conversation's render,
  else the row is an error (e.g. a template that rewrites earlier turns; add
  `{% generation %}` markers to it).

The special tokens the tokenizer adds around a single sequence (a BOS, and for
some an EOS) are added to `text` and `prompt`/`completion` rows, and the
tokenizer's EOS is appended when it is not already last (as `transformers`'
and TRL's causal LM training do); added prefix tokens carry no loss, added
suffix tokens and the EOS do. Chat templates write their own special tokens,
so nothing is added to `messages` rows.

Rows longer than `seq_len` tokens are truncated to their first `seq_len`
tokens; rows left without any loss-carrying target are dropped. Both are
counted in `DataStats` and logged.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from qlora_jax._src.data.jsonl import row_kind
from qlora_jax._src.data.sources import iter_rows

__all__ = ["DataStats", "Example", "load_examples", "tokenize_examples"]

_logger = logging.getLogger("qlora_jax")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_CHUNK = 1024  # rows per batched tokenizer call


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One tokenized example: token ids and which tokens are training targets.

    `loss_mask[t]` says whether token `t` is predicted (from the tokens before
    it) in the loss; `loss_mask[0]` has no effect, as nothing predicts the
    first token. Both arrays have the same length `n >= 1`.

    Attributes:
        input_ids: int32 `[n]`.
        loss_mask: bool `[n]`.

    Example:
        >>> from qlora_jax._src.data import Example
        >>> ex = Example([5, 6, 7], [False, False, True])
        >>> len(ex), ex.input_ids.dtype, ex.num_loss_tokens
        (3, dtype('int32'), 1)
    """

    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]

    def __post_init__(self):
        ids = np.asarray(self.input_ids)
        mask = np.asarray(self.loss_mask)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"input_ids: expected a non-empty 1-D sequence, got shape {ids.shape}")
        if not (np.issubdtype(ids.dtype, np.integer) and ids.min() >= 0 and ids.max() <= np.iinfo(np.int32).max):
            raise ValueError(f"input_ids: expected non-negative int32 token ids, got dtype {ids.dtype}")
        if mask.shape != ids.shape:
            raise ValueError(f"loss_mask: shape {mask.shape} differs from input_ids' {ids.shape}")
        if mask.dtype != np.bool_ and not np.isin(mask, (0, 1)).all():
            raise ValueError(f"loss_mask: expected booleans or 0/1, got {mask.dtype} values")
        object.__setattr__(self, "input_ids", ids.astype(np.int32))
        object.__setattr__(self, "loss_mask", mask.astype(np.bool_))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        """Targets that carry loss (`loss_mask[1:]` set)."""
        return int(self.loss_mask[1:].sum())


@dataclasses.dataclass(frozen=True)
class DataStats:
    """What tokenization did to a dataset.

    Example:
        >>> from qlora_jax._src.data import DataStats
        >>> s = DataStats(num_rows=3, num_examples=2, num_tokens=40, num_loss_tokens=12, num_truncated=1,
        ...               num_truncated_tokens=9, num_dropped=1, max_length=25)
        >>> s.num_examples / s.num_rows
        0.6666666666666666
    """

    num_rows: int  # rows in the input
    num_examples: int  # examples kept
    num_tokens: int  # tokens of the kept examples (after truncation)
    num_loss_tokens: int  # targets that carry loss in the kept examples
    num_truncated: int  # rows longer than seq_len, cut to their first seq_len tokens
    num_truncated_tokens: int  # tokens cut off by truncation
    num_dropped: int  # rows left with no loss-carrying target (after truncation), not kept
    max_length: int  # tokens in the longest row before truncation


def tokenize_examples(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    seq_len: int,
    *,
    add_eos: bool = True,
) -> tuple[list[Example], DataStats]:
    """Tokenizes validated rows (see `row_kind`) into `Example`s (method: module docstring).

    Args:
        rows: Rows in any of the three schemas, mixed freely.
        tokenizer: A fast `transformers` tokenizer (character offsets are
            needed), with a chat template for `messages` rows.
        seq_len: Longer rows are truncated to their first `seq_len` tokens.
        add_eos: Append `tokenizer.eos_token_id` (when it has one) to `text` and
            `prompt`/`completion` rows that do not already end with it.

    Returns:
        The kept examples (in row order) and their `DataStats`.

    Raises:
        ValueError: An invalid row or one the chat template cannot render as
            described (named `row i`, 0-based), no rows, or no example left.

    Example:
        >>> import transformers
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from qlora_jax._src.data import tokenize_examples
        >>> vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "two", "plus", "is", "four"])}
        >>> tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
        >>> rows = [{"prompt": "two plus two is", "completion": " four"}]
        >>> [ex], stats = tokenize_examples(rows, tokenizer, seq_len=16)
        >>> ex.input_ids.tolist(), ex.loss_mask.astype(int).tolist()
        ([2, 3, 2, 4, 5, 1], [0, 0, 0, 0, 1, 1])
    """
    return _tokenize(rows, [f"row {i}" for i in range(len(rows))], tokenizer, seq_len, add_eos)


def load_examples(
    source: str | os.PathLike,
    tokenizer: Any,
    seq_len: int,
    *,
    add_eos: bool = True,
    text_field: str | None = None,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    messages_field: str | None = None,
) -> tuple[list[Example], DataStats]:
    """`iter_rows` then `tokenize_examples`, a batch of rows at a time; every error names the row's place.

    Args:
        source: A JSONL, JSON, CSV, Parquet or Arrow file, a `save_to_disk`
            directory or a hub dataset `org/name[:split]` (see `iter_rows`).
        tokenizer: A fast `transformers` tokenizer (with a chat template for `messages` rows).
        seq_len: Longer rows are truncated to their first `seq_len` tokens.
        add_eos: As in `tokenize_examples`.
        text_field: The column of plain text (see `iter_rows`).
        prompt_field: The column of prompts.
        completion_field: The column of completions.
        messages_field: The column of conversations.

    Returns:
        The kept examples (in source order) and their `DataStats`.

    Raises:
        FileNotFoundError: No such file (and no hub dataset of that name).
        ImportError: A format that needs the optional `pyarrow`/`datasets` without them.
        ValueError: As `iter_rows` and `tokenize_examples`, naming the line or row.

    Example:
        >>> from qlora_jax._src.data import load_examples
        >>> load_examples("/nonexistent.jsonl", tokenizer=None, seq_len=8)
        Traceback (most recent call last):
        ...
        FileNotFoundError: /nonexistent.jsonl: no such file
    """
    rows = iter_rows(source, text_field=text_field, prompt_field=prompt_field, completion_field=completion_field,
                     messages_field=messages_field)
    return _tokenize_stream(rows, tokenizer, seq_len, add_eos, source=f"{source}: ")


def _tokenize(rows, wheres, tokenizer, seq_len, add_eos, source: str = "") -> tuple[list[Example], DataStats]:
    return _tokenize_stream(zip(rows, wheres, strict=True), tokenizer, seq_len, add_eos, source)


def _tokenize_stream(pairs: Iterable[tuple[dict[str, Any], str]], tokenizer, seq_len, add_eos,
                     source: str = "") -> tuple[list[Example], DataStats]:
    """Tokenizes `(row, where)` pairs `_CHUNK` rows at a time: the rows are not kept, only the examples."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an int >= 2, got {seq_len!r}")
    examples: list[Example] = []
    num_rows = truncated = truncated_tokens = dropped = max_length = 0
    context: dict[str, Any] = {}  # the tokenizer's added special tokens and chat template, found once
    pairs = iter(pairs)
    while chunk := list(itertools.islice(pairs, _CHUNK)):
        num_rows += len(chunk)
        for ids, mask in _encode_chunk(chunk, tokenizer, add_eos, context):
            max_length = max(max_length, len(ids))
            if len(ids) > seq_len:
                truncated += 1
                truncated_tokens += len(ids) - seq_len
                ids, mask = ids[:seq_len], mask[:seq_len]
            if not mask[1:].any():
                dropped += 1
                continue
            examples.append(Example(np.asarray(ids, np.int32), mask))
    if not num_rows:
        raise ValueError(f"{source or 'rows: '}empty dataset (no rows)")
    if truncated or dropped:
        _logger.warning("data: %d of %d rows truncated to seq_len=%d (%d tokens cut); %d dropped with no "
                        "loss-carrying target left", truncated, num_rows, seq_len, truncated_tokens, dropped)
    if not examples:
        raise ValueError(f"{source}no example left: all {num_rows} rows have no loss-carrying target within "
                         f"seq_len={seq_len} tokens")
    stats = DataStats(
        num_rows=num_rows,
        num_examples=len(examples),
        num_tokens=sum(len(e) for e in examples),
        num_loss_tokens=sum(e.num_loss_tokens for e in examples),
        num_truncated=truncated,
        num_truncated_tokens=truncated_tokens,
        num_dropped=dropped,
        max_length=max_length,
    )
    return examples, stats


def _encode_chunk(chunk: list[tuple[dict[str, Any], str]], tokenizer, add_eos,
                  context: dict[str, Any]) -> list[tuple[list[int], np.ndarray]]:
    """Validated, tokenized rows (ids, loss mask before truncation), in order."""
    rows = [row for row, _ in chunk]
    wheres = [where for _, where in chunk]
    kinds = [row_kind(row, where) for row, where in chunk]
    if not context:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"tokenizer: {type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer; "
                             "character offsets are needed to place the loss")
        context["special"] = _added_special_tokens(tokenizer)
    prefix, suffix = context["special"]
    eos = tokenizer.eos_token_id if add_eos else None
    encoded: list[tuple[list[int], np.ndarray] | None] = [None] * len(rows)

    plain = [i for i, k in enumerate(kinds) if k != "messages"]
    if plain:
        texts, spans = [], []
        for i in plain:
            row = rows[i]
            if kinds[i] == "text":
                texts.append(row["text"])
                spans.append([(0, len(row["text"]))])
            else:
                texts.append(row["prompt"] + row["completion"])
                spans.append([(len(row["prompt"]), len(texts[-1]))])
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for i, ids, offsets, row_spans in zip(plain, enc["input_ids"], enc["offset_mapping"], spans, strict=True):
            mask = _overlapping(offsets, row_spans)
            if kinds[i] == "text":
                mask[:] = True
            ids = [*prefix, *ids, *suffix]
            mask = np.concatenate([np.zeros(len(prefix), bool), mask, np.ones(len(suffix), bool)])
            if eos is not None and ids[-1] != eos:
                ids.append(eos)
                mask = np.append(mask, True)
            encoded[i] = (ids, mask)

    for i in (i for i, k in enumerate(kinds) if k == "messages"):
        if "template" not in context:
            context["template"] = _chat_template(tokenizer, wheres[i])
        encoded[i] = _encode_messages(rows[i]["messages"], tokenizer, context["template"], wheres[i])
    return encoded


def _overlapping(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool `[tokens]`: the token's characters `[start, end)` (`[k - 1, k)` for an empty `(k, k)`) overlap one
    of `spans`."""
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    end = off[:, 1]
    start = np.where(off[:, 0] == end, end - 1, off[:, 0])  # empty (k, k): the character before k
    mask = np.zeros(off.shape[0], bool)
    for a, b in spans:
        mask |= (start < b) & (end > a)
    return mask


def _added_special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a single sequence (`add_special_tokens=True`)."""
    probe = "hello world"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(without) + 1):
        if with_special[i:i + len(without)] == without:
            return with_special[:i], with_special[i + len(without):]
    raise ValueError(f"tokenizer: cannot tell which special tokens it adds: {probe!r} tokenizes to {with_special} "
                     f"with special tokens and to {without} without")


def _chat_template(tokenizer: Any, where: str) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ValueError(f"{where}: a messages row needs a chat template, and the tokenizer has none "
                         "(set tokenizer.chat_template)")
    return template


def _render(tokenizer: Any, messages: list[dict[str, str]], where: str, **kwargs) -> Any:
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as e:  # jinja2 errors, raise_exception() in templates, ...
        raise ValueError(f"{where}: the chat template failed on messages[:{len(messages)}]: "
                         f"{type(e).__name__}: {e}") from e


def _encode_messages(messages, tokenizer, template: str, where: str) -> tuple[list[int], np.ndarray]:
    """Token ids and the assistant-token mask of one conversation."""
    if _GENERATION.search(template):
        out = _render(tokenizer, messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), np.asarray(out["assistant_masks"], bool)
        if not mask.any():
            raise ValueError(f"{where}: the chat template's {{% generation %}} blocks cover no token")
        return ids, mask
    full = _render(tokenizer, messages, where, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], where, tokenize=False, add_generation_prompt=True)
        turn = _render(tokenizer, messages[:i + 1], where, tokenize=False)
        for name, text in ((f"messages[:{i}] (with the generation prompt)", head), (f"messages[:{i + 1}]", turn)):
            if not full.startswith(text):
                raise ValueError(f"{where}: the chat template does not render {name} as a prefix of the whole "
                                 f"conversation, so assistant message {i} cannot be located; mark assistant text "
                                 "with {% generation %} ... {% endgeneration %} in the template")
        if len(turn) <= len(head):
            raise ValueError(f"{where}: assistant message {i} renders as no text after the generation prompt")
        spans.append((len(head), len(turn)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), _overlapping(enc["offset_mapping"], spans)

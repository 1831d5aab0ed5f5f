"""JSON Lines datasets: one example per line, in one of three schemas.

* `{"text": ...}`: plain language modelling; every token carries loss.
* `{"prompt": ..., "completion": ...}`: loss only on the completion.
* `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation rendered
  with the tokenizer's chat template; loss only on the assistant turns.

Rows are validated as they are read, and every error names the file and the
1-based line number (`data.jsonl:7: ...`). Blank lines are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ROLES", "SCHEMAS", "load_jsonl", "row_kind"]

# Row schema name -> the exact set of keys a row of that schema has.
SCHEMAS: dict[str, frozenset[str]] = {
    "text": frozenset({"text"}),
    "prompt_completion": frozenset({"prompt", "completion"}),
    "messages": frozenset({"messages"}),
}
# Message roles a conversation may use.
ROLES = ("system", "user", "assistant")


def row_kind(row: Any, where: str = "row") -> str:
    """Validates one dataset row and returns its schema: a key of `SCHEMAS`.

    A row is a dict with exactly the keys of one schema; every string is
    non-empty (not only whitespace) and valid Unicode (no lone surrogate); `messages` is a non-empty list of
    `{"role", "content"}` dicts with roles from `ROLES`, that does not start
    with an assistant message and holds at least one.

    Args:
        row: The parsed row.
        where: Names the row in error messages (e.g. `"data.jsonl:7"`).

    Returns:
        `"text"`, `"prompt_completion"` or `"messages"`.

    Raises:
        ValueError: The row does not fit any schema; the message starts with `where`.

    Example:
        >>> from qlora_jax._src.data import row_kind
        >>> row_kind({"prompt": "2+2=", "completion": "4"})
        'prompt_completion'
        >>> row_kind({"text": ""}, "train.jsonl:3")
        Traceback (most recent call last):
        ...
        ValueError: train.jsonl:3: "text" is empty
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    keys = frozenset(row)
    kind = next((k for k, v in SCHEMAS.items() if v == keys), None)
    if kind is None:
        expected = " or ".join(str(sorted(v)) for v in SCHEMAS.values())
        raise ValueError(f"{where}: keys {sorted(keys)} match no schema; expected exactly {expected}")
    if kind == "messages":
        _check_messages(row["messages"], where)
    else:
        for key in sorted(keys):
            _check_string(row[key], where, f'"{key}"')
    return kind


def _check_string(value: Any, where: str, name: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: {name} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800": a lone surrogate no tokenizer can take
        raise ValueError(f"{where}: {name} is not valid Unicode ({e.reason} at character {e.start})") from None


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list):
        raise ValueError(f'{where}: "messages" must be a list, got {type(messages).__name__}')
    if not messages:
        raise ValueError(f'{where}: "messages" is empty')
    for i, message in enumerate(messages):
        name = f'"messages"[{i}]'
        if not isinstance(message, dict):
            raise ValueError(f"{where}: {name} must be an object, got {type(message).__name__}")
        if set(message) != {"role", "content"}:
            raise ValueError(f'{where}: {name} has keys {sorted(message)}; expected exactly ["content", "role"]')
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: {name} has role {message['role']!r}; expected one of {list(ROLES)}")
        _check_string(message["content"], where, f'{name}["content"]')
    if messages[0]["role"] == "assistant":
        raise ValueError(f'{where}: "messages"[0] is an assistant message; a conversation starts with a system '
                         "or user message")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f'{where}: "messages" has no assistant message, so nothing to train on')


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[Any, int]]:
    """The parsed lines of a JSON Lines file, not validated, with their 1-based line numbers; blank lines are
    skipped. Reads one line at a time."""
    path = Path(path)
    if not path.is_file():
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        raise ValueError(f"{path}: not a regular file")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # an integer too long to convert, nesting too deep
                raise ValueError(f"{where}: invalid JSON: {type(e).__name__}: {e}") from None
            yield row, lineno


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int]]:
    """`load_jsonl`, also returning each row's 1-based line number (for later error messages)."""
    path = Path(path)
    rows, lines = [], []
    for row, lineno in iter_jsonl(path):
        row_kind(row, f"{path}:{lineno}")
        rows.append(row)
        lines.append(lineno)
    if not rows:
        raise ValueError(f"{path}: empty dataset (no rows, only blank lines or nothing)")
    return rows, lines


def load_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads and validates a JSON Lines dataset (see `row_kind` for the schemas).

    Args:
        path: A `.jsonl` file, UTF-8, one JSON object per line; blank lines are skipped.

    Returns:
        The rows, in file order.

    Raises:
        FileNotFoundError: `path` does not exist (the message names it).
        ValueError: Invalid UTF-8 or JSON, a row that fits no schema, wrong
            types or empty content (each named `path:line`), or no rows at all.

    Example:
        >>> import json, pathlib, tempfile
        >>> from qlora_jax._src.data import load_jsonl
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "train.jsonl"
        >>> _ = path.write_text(json.dumps({"text": "hi"}) + "\\n" + '{"text": 1}\\n')
        >>> load_jsonl(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...train.jsonl:2: "text" must be a string, got int
        >>> _ = path.write_text(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\\n")
        >>> load_jsonl(path)
        [{'prompt': '2+2=', 'completion': '4'}]
    """
    return read_jsonl(path)[0]

"""Dataset sources: files of several formats, `datasets` directories and hub datasets, as rows of the three schemas.

A source is read in batches of rows and never whole, so a file larger than
memory can be read (the tokenized examples are what is kept):

* `.jsonl` / `.ndjson`: JSON Lines, one line at a time (rows named `file:LINE`).
* `.json`: a JSON array of objects (parsed incrementally, one object at a time)
  or JSON Lines (rows named `file:LINE`, the line where the object starts).
* `.csv` / `.tsv`: the standard library's `csv` module, header row first
  (rows named `file:LINE`, the line where the record starts). A messages or
  conversations cell holds the list as JSON.
* `.parquet`: `pyarrow.parquet.ParquetFile.iter_batches`, a row group at a time
  (rows named `file:row N`, counted from 1).
* `.arrow` / `.feather` / `.ipc`: an Arrow IPC file or stream, memory-mapped,
  one record batch at a time (`file:row N`).
* a directory written by `datasets.Dataset.save_to_disk` (or a `DatasetDict`'s,
  as `dir` for its `train` split or `dir:split`), memory-mapped by
  `datasets.load_from_disk` (`dir:row N`).
* `org/name[:split]` (default split `train`), only when no such local path
  exists: a Hugging Face hub dataset, streamed by
  `datasets.load_dataset(..., streaming=True)` (`org/name[split]:row N`).

Parquet, Arrow, `save_to_disk` directories and hub datasets need the optional
packages `pyarrow` and `datasets` (`pip install 'qlora_jax[data]'`); JSONL,
JSON and CSV do not.

Columns become one of the three schemas of `row_kind`. Named explicitly
(`text_field`; `prompt_field` and `completion_field`, each defaulting to its
schema's name; or `messages_field`), those columns are used and any others
ignored. Otherwise a row's columns must be exactly those of one of these
layouts (an extra column is an error, as a misspelt one would be):

* `text`; `prompt` + `completion`; `messages` (lists of `role`/`content`);
* `instruction` + `output`, with an optional `input` (Alpaca): the prompt is
  the instruction, then a blank line and the input when it is not empty, then
  a newline; the completion is the output;
* `question` + `answer`: the prompt is the question and a newline, the completion the answer;
* `conversations` (ShareGPT): a list of `from`/`value` messages, `from` being
  `human`, `gpt` or `system` (`user`, `assistant` also accepted), read as
  `messages` with roles `user`, `assistant`, `system`.

Messages given as `from`/`value` are read as `role`/`content` under any
column name, and keys whose value is null (an Arrow struct's absent fields)
are dropped. Columns that are not exactly one layout's (missing, extra, or
those of several layouts) are an error naming the row, the columns found,
the layouts they hold and the flags that pick columns.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qlora_jax._src.data.jsonl import iter_jsonl, row_kind

__all__ = ["iter_rows"]

_BATCH = 1024  # rows per batch read from a columnar source
_JSON_CHUNK = 1 << 20  # characters per read of a JSON array
_INSTALL = "pip install 'qlora_jax[data]'"
# A hub dataset name as the Hub spells one, `org/name`, and an optional `:split`.
_HUB_NAME = re.compile(r"(?P<name>[\w.-]+/[\w.-]{1,96})(?::(?P<split>[\w.-]+))?")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
             ".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
# Layouts recognised without flags: name, required columns, optional columns.
_LAYOUTS = (
    ("text", ("text",), ()),
    ("prompt/completion", ("prompt", "completion"), ()),
    ("messages", ("messages",), ()),
    ("instruction/output (Alpaca)", ("instruction", "output"), ("input",)),
    ("question/answer", ("question", "answer"), ()),
    ("conversations (ShareGPT)", ("conversations",), ()),
)
_FLAGS = ("--text-field (text_field), --prompt-field and --completion-field (prompt_field, completion_field) or "
          "--messages-field (messages_field)")


@dataclasses.dataclass(frozen=True)
class _Fields:
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: str | None = None

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}_field: expected a column name, got {value!r}")
        groups = [g for g, on in (("--text-field", self.text), ("--prompt-field/--completion-field",
                                                                self.prompt or self.completion),
                                  ("--messages-field", self.messages)) if on]
        if len(groups) > 1:
            raise ValueError(f"{' and '.join(groups)}: name the columns of one schema only")

    @property
    def given(self) -> bool:
        return any(dataclasses.asdict(self).values())


def iter_rows(
    source: str | os.PathLike,
    *,
    text_field: str | None = None,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    messages_field: str | None = None,
) -> Iterator[tuple[dict[str, Any], str]]:
    """The rows of a dataset source in the schemas of `row_kind`, validated, each with where it came from.

    Formats, field mappings and recognised layouts: the module docstring. The
    source is read lazily, a batch of rows at a time.

    Args:
        source: A file (`.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet`,
            `.arrow`, `.feather`), a `save_to_disk` directory (`dir[:split]`),
            or a hub dataset `org/name[:split]`.
        text_field: The column holding plain text.
        prompt_field: The column holding prompts (default `prompt` when
            `completion_field` is given).
        completion_field: The column holding completions (default `completion`
            when `prompt_field` is given).
        messages_field: The column holding conversations (`role`/`content` or
            ShareGPT `from`/`value` messages).

    Yields:
        `(row, where)`: a row of one schema, and its place (`file:LINE` or `file:row N`).

    Raises:
        FileNotFoundError: No such file, and (for a name spelled `org/name`) no
            hub dataset that could be loaded; one line naming what was tried.
        ImportError: A format that needs `pyarrow` or `datasets` without them
            (the message names `pip install 'qlora_jax[data]'`).
        ValueError: An unknown format, columns missing or fitting no or several
            layouts (the columns found and the flags named), or a bad row
            (named by its place).

    Example:
        >>> import csv, pathlib, tempfile
        >>> from qlora_jax._src.data.sources import iter_rows
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "qa.csv"
        >>> with path.open("w", newline="") as f:
        ...     csv.writer(f).writerows([["question", "answer"], ["2+2?", "4"]])
        >>> [(row, where.rsplit("/", 1)[1]) for row, where in iter_rows(path)]
        [({'prompt': '2+2?\\n', 'completion': '4'}, 'qa.csv:2')]
        >>> next(iter_rows(path, text_field="body"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...qa.csv:2: no column 'body' (--text-field / text_field); columns found: ['answer', 'question']
    """
    fields = _Fields(text_field, prompt_field, completion_field, messages_field)
    label, kind, raw_rows = _open(source)
    layouts: dict[tuple[str, ...], Callable[[dict[str, Any], str], dict[str, Any]]] = {}
    for raw, where in raw_rows:
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object (a row with columns), got {type(raw).__name__}")
        keys = tuple(sorted(str(k) for k in raw))
        convert = layouts.get(keys)
        if convert is None:
            convert = layouts[keys] = _layout(keys, fields, where, json_strings=kind == "csv")
        row = convert(raw, where)
        row_kind(row, where)
        yield row, where


def _open(source: str | os.PathLike) -> tuple[str, str, Iterator[tuple[Any, str]]]:
    """`(label, format, raw rows with their places)` of a source; the rows are read lazily."""
    path = Path(source)
    name = str(source)
    if path.is_dir():
        return name, "datasets", _iter_saved(path, None)
    if path.exists():
        kind = _SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"{path}: unknown data format {path.suffix!r}; expected one of "
                             f"{sorted(_SUFFIXES)}, a save_to_disk directory or a hub dataset (org/name[:split])")
        if not path.is_file():
            raise ValueError(f"{path}: not a regular file")
        reader = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "parquet": _iter_parquet,
                  "arrow": _iter_arrow}[kind]
        return name, kind, reader(path)
    base, _, split = name.rpartition(":")
    if base and split and Path(base).is_dir():  # a DatasetDict directory and one of its splits
        return name, "datasets", _iter_saved(Path(base), split)
    hub = _HUB_NAME.fullmatch(name)
    if name.startswith(("/", ".")) or path.suffix.lower() in _SUFFIXES or hub is None or ".." in name \
            or "--" in name:
        if name.startswith(("/", ".")) or path.suffix.lower() in _SUFFIXES:
            raise FileNotFoundError(f"{name}: no such file")
        raise FileNotFoundError(f"{name}: no such file or directory, and not a Hugging Face hub dataset name "
                                "(org/name[:split])")
    return name, "datasets", _iter_hub(hub["name"], hub["split"] or "train")


def _require(module: str, label: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{label}: reading {what} needs the optional package {module.split('.')[0]!r}: "
                          f"{_INSTALL}") from None


# ------------------------------------------------------------------------------------------------ readers


def _iter_jsonl(path: Path) -> Iterator[tuple[Any, str]]:
    for row, lineno in iter_jsonl(path):
        yield row, f"{path}:{lineno}"


def _iter_json(path: Path) -> Iterator[tuple[Any, str]]:
    first = b""
    with path.open("rb") as f:
        while not first and (chunk := f.read(4096)):
            first = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    yield from (_iter_json_array(path) if first == b"[" else _iter_jsonl(path))


_SPACE = re.compile(r"[ \t\r\n]*")
_EXTRA = "\0extra"  # csv.DictReader's key for the fields of a record beyond the header's


def _iter_json_array(path: Path) -> Iterator[tuple[Any, str]]:
    """The elements of a JSON array, decoded one at a time from a window of the file (`file:LINE` of each)."""
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8-sig") as f:
        state = {"buf": "", "pos": 0, "eof": False, "line": 1, "counted": 0}

        def fill() -> None:  # drop what was consumed, read the next chunk
            buf, pos = state["buf"], state["pos"]
            state["line"] += buf.count("\n", state["counted"], pos)
            try:
                more = f.read(_JSON_CHUNK)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_at(pos)}: not valid UTF-8 ({e.reason}) in the lines after this "
                                 "one") from None
            state.update(buf=buf[pos:] + more, pos=0, counted=0, eof=not more)

        def line_at(i: int) -> int:
            state["line"] += state["buf"].count("\n", state["counted"], i)
            state["counted"] = i
            return state["line"]

        def skip_space() -> None:
            while True:
                state["pos"] = _SPACE.match(state["buf"], state["pos"]).end()
                if state["pos"] < len(state["buf"]) or state["eof"]:
                    return
                fill()

        def fail(message: str) -> ValueError:
            return ValueError(f"{path}:{line_at(state['pos'])}: invalid JSON: {message}")

        skip_space()
        if state["buf"][state["pos"]:state["pos"] + 1] != "[":
            raise fail("expected '['")
        state["pos"] += 1
        first = True
        while True:
            skip_space()
            if state["pos"] >= len(state["buf"]):
                raise fail("the array is not closed (expected ']')")
            if state["buf"][state["pos"]] == "]":
                state["pos"] += 1
                break
            if not first:
                if state["buf"][state["pos"]] != ",":
                    raise fail("expected ',' or ']' after an element")
                state["pos"] += 1
                skip_space()
            while True:
                try:
                    value, end = decoder.raw_decode(state["buf"], state["pos"])
                except json.JSONDecodeError as e:
                    if state["eof"]:
                        raise fail(e.msg) from None
                    fill()
                    continue
                except RecursionError:
                    raise fail("nesting too deep") from None
                if end >= len(state["buf"]) and not state["eof"]:  # a number may go on in the next chunk
                    fill()
                    continue
                break
            yield value, f"{path}:{line_at(state['pos'])}"
            state["pos"] = end
            first = False
        skip_space()
        if state["pos"] < len(state["buf"]):
            raise fail("data after the array")


def _iter_csv(path: Path) -> Iterator[tuple[Any, str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, restkey=_EXTRA)
        line = 1
        try:
            if not reader.fieldnames:
                return
            line = reader.line_num + 1
            for record in reader:
                where = f"{path}:{line}"
                line = reader.line_num + 1
                if _EXTRA in record:
                    raise ValueError(f"{where}: {len(reader.fieldnames) + len(record[_EXTRA])} fields, but the "
                                     f"header has {len(reader.fieldnames)}")
                yield record, where
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason}) in this line or the next ones") from None
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: invalid CSV: {e}") from None


def _iter_batches(label: str, batches: Iterator[Any]) -> Iterator[tuple[Any, str]]:
    """Rows of Arrow record batches or tables, `_BATCH` rows converted to Python at a time."""
    n = 0
    for batch in batches:
        for start in range(0, batch.num_rows, _BATCH):
            for row in batch.slice(start, _BATCH).to_pylist():
                n += 1
                yield row, f"{label}:row {n}"


def _iter_parquet(path: Path) -> Iterator[tuple[Any, str]]:
    pq = _require("pyarrow.parquet", str(path), "Parquet")
    pa = _require("pyarrow", str(path), "Parquet")
    try:
        file = pq.ParquetFile(path, pre_buffer=False)  # pre_buffer reads ahead the whole file's column chunks
    except pa.ArrowException as e:
        raise ValueError(f"{path}: not a Parquet file ({e})") from None
    try:  # one row group at a time: a column chunk is read whole, so a row group is what memory holds
        batches = (b for i in range(file.num_row_groups)
                   for b in file.iter_batches(batch_size=_BATCH, row_groups=[i], use_threads=False))
        yield from _iter_batches(str(path), batches)
    finally:
        file.close()


def _iter_arrow(path: Path) -> Iterator[tuple[Any, str]]:
    pa = _require("pyarrow", str(path), "Arrow")
    ipc = _require("pyarrow.ipc", str(path), "Arrow")
    with pa.memory_map(str(path)) as source:
        try:
            reader = ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                batches = iter(ipc.open_stream(source))
            except pa.ArrowInvalid as e:
                raise ValueError(f"{path}: neither an Arrow IPC file nor stream ({e})") from None
        yield from _iter_batches(str(path), batches)


def _iter_saved(path: Path, split: str | None) -> Iterator[tuple[Any, str]]:
    label = str(path) if split is None else f"{path}:{split}"
    datasets = _require("datasets", label, "a save_to_disk directory")
    if not any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        raise ValueError(f"{path}: a directory, but not one written by datasets' save_to_disk (no state.json or "
                         "dataset_dict.json)")
    try:
        data = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: datasets.load_from_disk failed: {_first_line(e)}") from None
    if isinstance(data, datasets.DatasetDict):
        splits = sorted(data)
        if split is None:
            split = "train" if "train" in data else (splits[0] if len(splits) == 1 else None)
            if split is None:
                raise ValueError(f"{path}: a DatasetDict with splits {splits} and no 'train'; name one as "
                                 f"{path}:SPLIT")
            label = f"{path}:{split}"
        if split not in data:
            raise ValueError(f"{path}: no split {split!r}; the splits are {splits}")
        data = data[split]
    elif split is not None:
        raise ValueError(f"{path}: a Dataset without splits; {split!r} names none")
    yield from _iter_batches(label, data.with_format("arrow").iter(batch_size=_BATCH))


def _iter_hub(name: str, split: str) -> Iterator[tuple[Any, str]]:
    datasets = _require("datasets", name, "a hub dataset")
    try:
        data = datasets.load_dataset(name, split=split, streaming=True)
    except (OSError, ValueError) as e:  # no network, no such dataset or split, a gated one, ...
        raise FileNotFoundError(f"{name}: no such file or directory, and the hub dataset {name!r} (split "
                                f"{split!r}) could not be loaded ({type(e).__name__}: {_first_line(e)})") from None
    n = 0
    for batch in data.iter(batch_size=_BATCH):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            n += 1
            yield dict(zip(columns, values, strict=True)), f"{name}[{split}]:row {n}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


# ------------------------------------------------------------------------------------------------ layouts


def _layout(keys: tuple[str, ...], fields: _Fields, where: str, *,
            json_strings: bool) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    """How rows with columns `keys` become a schema's row (checked once per set of columns)."""

    def need(column: str, flag: str) -> str:
        if column not in keys:
            raise ValueError(f"{where}: no column {column!r} ({flag}); columns found: {list(keys)}")
        return column

    def messages(column: str) -> Callable[[dict[str, Any], str], dict[str, Any]]:
        return lambda r, w: {"messages": _messages(r[column], w, column, json_strings)}

    if fields.given:
        if fields.text:
            text = need(fields.text, "--text-field / text_field")
            return lambda r, w: {"text": r[text]}
        if fields.messages:
            return messages(need(fields.messages, "--messages-field / messages_field"))
        prompt = need(fields.prompt or "prompt", "--prompt-field / prompt_field")
        completion = need(fields.completion or "completion", "--completion-field / completion_field")
        return lambda r, w: {"prompt": r[prompt], "completion": r[completion]}
    found = [name for name, required, optional in _LAYOUTS
             if set(required) <= set(keys) <= set(required) | set(optional)]
    if len(found) != 1:
        held = [name for name, required, _ in _LAYOUTS if set(required) <= set(keys)]
        raise ValueError(f"{where}: columns {list(keys)} match no schema: expected exactly text | prompt, "
                         "completion | messages | instruction, output[, input] | question, answer | conversations"
                         + (f"; they hold those of {' and '.join(held)}" if held else "")
                         + f"; name the columns to use with {_FLAGS} (other columns are then ignored)")
    name = found[0]
    if name == "text":
        return lambda r, w: {"text": r["text"]}
    if name == "prompt/completion":
        return lambda r, w: {"prompt": r["prompt"], "completion": r["completion"]}
    if name == "messages":
        return messages("messages")
    if name == "conversations (ShareGPT)":
        return messages("conversations")
    if name == "question/answer":
        return lambda r, w: {"prompt": _join(r["question"], None, w, "question"), "completion": r["answer"]}
    has_input = "input" in keys
    return lambda r, w: {"prompt": _join(r["instruction"], r["input"] if has_input else None, w, "instruction"),
                         "completion": r["output"]}


def _join(first: Any, second: Any, where: str, name: str) -> Any:
    """`first`, a blank line and `second` (when not empty), and a newline: the prompt of a derived layout."""
    if not isinstance(first, str) or not first.strip():
        return first  # left for row_kind's message, under the column's name
    if second is not None and not isinstance(second, str):
        raise ValueError(f'{where}: "input" must be a string, got {type(second).__name__}')
    return first + (f"\n\n{second}" if second and second.strip() else "") + "\n"


def _messages(value: Any, where: str, column: str, json_strings: bool) -> Any:
    """A conversation as `role`/`content` dicts: ShareGPT's `from`/`value` renamed, null-valued keys dropped."""
    if isinstance(value, str) and json_strings:
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: {column!r} is not a JSON list of messages ({e.msg})") from None
    if not isinstance(value, list):
        return value  # row_kind names the type
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            out.append(message)
            continue
        message = {k: v for k, v in message.items() if v is not None}
        if set(message) == {"from", "value"}:
            role = _SHAREGPT_ROLES.get(message["from"]) if isinstance(message["from"], str) else None
            if role is None:
                raise ValueError(f"{where}: {column!r}[{i}] has from={message['from']!r}; expected one of "
                                 f"{list(_SHAREGPT_ROLES)}")
            message = {"role": role, "content": message["value"]}
        out.append(message)
    return out

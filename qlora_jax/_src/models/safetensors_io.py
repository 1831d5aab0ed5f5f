"""Reading and writing `*.safetensors` one tensor at a time.

A small reader over the format (8-byte little-endian header length, a JSON
header of `{name: {dtype, shape, data_offsets}}`, then the raw bytes) that
reads one tensor per call into a fresh array (no memory map), so a loader that
quantizes as it reads never holds more than one full-precision tensor. Works
for a single `model.safetensors` or a sharded checkpoint with
`model.safetensors.index.json`, and checks every tensor's bytes against the
file size before reading, so a truncated file is reported with the file and
tensor it cuts.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from qlora_jax._src.models.atomic_dir import naming_file

__all__ = ["SafetensorsReader", "save_safetensors", "DTYPES"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsReader(Mapping[str, np.ndarray]):
    """Tensors of a checkpoint directory (or one file), read lazily by name.

    `reader[name]` returns a fresh NumPy copy of one tensor; iteration gives
    the names in file order. Headers are validated on open.

    Example:
        >>> import tempfile, numpy as np, os
        >>> from qlora_jax._src.models.safetensors_io import SafetensorsReader, save_safetensors
        >>> d = tempfile.mkdtemp()
        >>> save_safetensors(os.path.join(d, "model.safetensors"), {"w": np.ones((2, 3), np.float32)})
        >>> SafetensorsReader(d)["w"].shape
        (2, 3)
    """

    def __init__(self, path: str | os.PathLike):
        """Opens `path`: a directory with `model.safetensors` or an index, or a `.safetensors` file.

        Raises:
            FileNotFoundError: No safetensors file (names the directory).
            ValueError: A malformed header or index, or a tensor whose bytes lie
                beyond the end of its file (names the file and the tensor).
        """
        path = Path(path)
        self._entries: dict[str, tuple[Path, dict]] = {}
        self._data_start: dict[Path, int] = {}
        if path.is_file():
            files = [path]
        elif (path / "model.safetensors.index.json").is_file():
            index_path = path / "model.safetensors.index.json"
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{index_path}: not a safetensors index ({e})") from e
            files = sorted({path / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    names = sorted(n for n, v in weight_map.items() if path / v == f)
                    raise FileNotFoundError(f"{f}: listed in {index_path.name} for {names[:3]}... but missing")
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        for f in files:
            self._read_header(f)

    def _read_header(self, file: Path) -> None:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise ValueError(f"{file}: truncated safetensors file (header of {n} bytes, file of {size})")
            try:
                header = json.loads(fh.read(n))
            except ValueError as e:
                raise ValueError(f"{file}: malformed safetensors header ({e})") from e
        start = 8 + n
        self._data_start[file] = start
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in DTYPES:
                raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            expected = DTYPES[info["dtype"]].itemsize * int(np.prod(info["shape"], dtype=np.int64))
            if end - begin != expected:
                raise ValueError(f"{file}: tensor {name!r} has {end - begin} bytes for shape {info['shape']} "
                                 f"{info['dtype']} ({expected} expected)")
            if start + end > size:
                raise ValueError(f"{file}: truncated: tensor {name!r} needs bytes up to {start + end}, "
                                 f"the file has {size}")
            self._entries[name] = (file, info)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            file, info = self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint") from None
        begin, end = info["data_offsets"]
        out = np.empty(info["shape"], DTYPES[info["dtype"]])
        view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
        with open(file, "rb", buffering=0) as fh:  # a plain read: no file pages stay mapped into the process
            fh.seek(self._data_start[file] + begin)
            got = fh.readinto(view) if out.size else 0
        if got != end - begin:
            raise ValueError(f"{file}: truncated: tensor {name!r} needs {end - begin} bytes, read {got}")
        return out

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of tensor `name` (along its first axis), read alone.

        Example:
            >>> import tempfile, numpy as np, os
            >>> from qlora_jax._src.models.safetensors_io import SafetensorsReader, save_safetensors
            >>> d = tempfile.mkdtemp()
            >>> save_safetensors(os.path.join(d, "model.safetensors"), {"w": np.arange(6.0).reshape(3, 2)})
            >>> SafetensorsReader(d).rows("w", 1, 3).tolist()
            [[2.0, 3.0], [4.0, 5.0]]
        """
        file, info = self._entries[name]
        shape = info["shape"]
        dtype = DTYPES[info["dtype"]]
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        out = np.empty((stop - start, *shape[1:]), dtype)
        with open(file, "rb", buffering=0) as fh:
            fh.seek(self._data_start[file] + info["data_offsets"][0] + start * row_bytes)
            got = fh.readinto(memoryview(out.reshape(-1).view(np.uint8))) if out.size else 0
        if got != out.nbytes:
            raise ValueError(f"{file}: truncated: tensor {name!r} rows {start}:{stop} could not be read")
        return out

    def file_of(self, name: str) -> Path:
        """The file holding tensor `name`."""
        return self._entries[name][0]

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype name of tensor `name` ("F32", "BF16", "U8", ...)."""
        return self._entries[name][1]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` without reading it."""
        return tuple(self._entries[name][1]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` to `path` atomically (a temporary file, then rename).

    A failed write raises an `OSError` that names `path` and removes the
    temporary file.

    Example:
        >>> import tempfile, os, numpy as np
        >>> from qlora_jax._src.models.safetensors_io import save_safetensors
        >>> save_safetensors(os.path.join(tempfile.mkdtemp(), "a.safetensors"), {"x": np.zeros(3, np.float32)})
    """
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _NAMES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {array.dtype}")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with naming_file(path), open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for array in arrays:
                fh.write(array.tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

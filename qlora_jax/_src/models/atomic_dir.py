"""Output directories written all at once: `atomic_directory`, `naming_file`, `write_text`.

A writer fills a temporary sibling of its target (`.{name}.tmp-<random>`, in
the same parent, hence the same file system), the files are fsynced, and only
then is the complete directory renamed into place. A failure before that
point (a full disk, a file size limit, an error in the writer, an interrupt)
removes the temporary directory and leaves the previous output untouched.

Replacing an existing target takes two renames: the old directory moves aside
to `.{name}.old-<random>`, the new one moves in, and the old one is removed.
Between the two renames (two system calls, no data written) the target does
not exist; a crash in that instant leaves the previous output complete under
the `.old-` name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_directory", "naming_file", "write_text"]


@contextlib.contextmanager
def naming_file(path: str | os.PathLike) -> Iterator[None]:
    """Re-raises an `OSError` without a file name (a failed `write`, `flush` or `close`) naming `path`.

    Example:
        >>> import errno
        >>> with naming_file("out/model.safetensors"):
        ...     raise OSError(errno.EFBIG, "File too large")
        Traceback (most recent call last):
        OSError: [Errno 27] File too large: 'out/model.safetensors'
    """
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path`; a failed write raises an `OSError` naming `path`.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "config.json"
        >>> write_text(path, "{}")
        >>> path.read_text()
        '{}'
    """
    with naming_file(path):
        Path(path).write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, owns: Callable[[str], bool]) -> Iterator[Path]:
    """Yields an empty temporary directory that replaces `directory` when the block completes.

    On success every file written is fsynced, the directory is renamed into
    place (see the module docstring for the replacement of an existing one)
    and the parent is fsynced. On any exception the temporary directory is
    removed and `directory` is left as it was.

    Args:
        directory: The target (a symbolic link: the directory it points to).
            Its parent is created if missing.
        owns: Whether a file name is one this writer writes. An existing
            `directory` is replaced only if it is empty or holds nothing but
            such files (a previous output of the same writer); anything else
            in it is refused before any file is written, so that a user's
            unrelated files are never deleted.

    Yields:
        The temporary directory to write into.

    Raises:
        ValueError: `directory` exists and is not a directory, or holds
            entries that `owns` does not claim (named).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> parent = Path(tempfile.mkdtemp())
        >>> with atomic_directory(parent / "out", owns=lambda name: name == "a.txt") as tmp:
        ...     _ = (tmp / "a.txt").write_text("1")
        >>> with atomic_directory(parent / "out", owns=lambda name: name == "a.txt") as tmp:
        ...     _ = (tmp / "a.txt").write_text("2")
        ...     raise RuntimeError("fails halfway")
        Traceback (most recent call last):
        RuntimeError: fails halfway
        >>> [p.name for p in parent.iterdir()], (parent / "out" / "a.txt").read_text()
        (['out'], '1')
    """
    directory = Path(directory)
    if directory.is_symlink():  # replace what the link points to, keep the link
        directory = directory.resolve()
    _check_replaceable(directory, owns)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(directory, "tmp")
    try:
        yield tmp
        _check_replaceable(directory, owns)  # again: something may have appeared while we wrote
        _fsync_tree(tmp)
        _swap(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


def _new_sibling(directory: Path, kind: str) -> Path:
    """Creates `.{name}.{kind}-<random>` next to `directory`, with the usual permissions (umask), unlike mkdtemp."""
    while True:
        path = directory.parent / f".{directory.name}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _check_replaceable(directory: Path, owns: Callable[[str], bool]) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory; refusing to replace it")
    foreign = sorted(p.name for p in directory.iterdir() if not (p.is_file() and owns(p.name)))
    if foreign:
        raise ValueError(f"{directory}: holds {foreign[:5]}{'...' if len(foreign) > 5 else ''}, which this writer "
                         "does not write; refusing to replace the directory (and delete them). Remove them or "
                         "choose another directory")


def _fsync_tree(directory: Path) -> None:
    """fsyncs every file under `directory`, then the directory itself."""
    for path in directory.iterdir():
        with naming_file(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap(new: Path, directory: Path) -> None:
    """Renames `new` to `directory`, replacing an existing `directory` (removed after the swap)."""
    if not directory.exists():
        os.rename(new, directory)
        _fsync_dir(directory.parent)
        return
    os.chmod(new, stat.S_IMODE(directory.stat().st_mode))  # the replaced directory's permissions
    old = _new_sibling(directory, "old")
    os.rename(directory, old)  # replaces the empty `old`: directory -> old, atomically
    try:
        os.rename(new, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    _fsync_dir(directory.parent)
    shutil.rmtree(old)

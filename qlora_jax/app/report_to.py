"""Metrics to TensorBoard and Weights & Biases: what `--report-to` opens (the Hugging Face Trainer's name).

One interface for every command: `ReportTo.open(names, directory, ...)`, then
`log(row)` with a `metrics.jsonl` row, then `close()` (or a `with` block).
A row's `step` is the step; each other number is logged under a tag:

* `loss`, `lr`, `grad_norm`, `tokens`, `seconds`, `tokens_per_s`,
  `peak_memory_gib` → `train/loss`, `train/learning_rate`, `train/grad_norm`,
  `train/tokens`, `train/step_seconds`, `train/tokens_per_second`,
  `train/peak_memory_gib` (other keys: `train/<key>`);
* `eval_<name>` → `eval/<name>` (`eval_loss` → `eval/loss`).

Where they write, under the run's directory:

* `tensorboard`: event files in `<directory>/tensorboard/` (tensorboardX's
  writer; `tensorboard --logdir <directory>/tensorboard` shows them).
* `wandb`: a W&B run named after the directory, in project `$WANDB_PROJECT`
  (default `qlora-jax`), files in `<directory>/wandb/`. Without an API key
  (`WANDB_API_KEY`, or the `~/.netrc` login `wandb login` writes) or without a
  connection to the W&B server, the run is logged offline (`wandb sync
  <directory>/wandb/offline-run-*` uploads it later); `WANDB_MODE`, when set,
  decides instead. Only this run is switched to offline (`wandb.init(mode=...)`);
  no environment variable is changed.

A resumed run (`resume_step`: the step of the checkpoint it continues from)
appends to the same logs. The steps after that checkpoint that the stopped
session had logged are run again: TensorBoard shows the new values (the
writer starts with a purge at `resume_step + 1`, which TensorBoard's reader
applies to the earlier event files, as `metrics.jsonl` drops those rows);
W&B only appends steps beyond the last one it has (`logged_through`), so
there the first session's values of those steps stay (they are equal where
the steps are recomputed deterministically: the same checkpoint, data
position and random keys). The W&B run id is kept in
`<directory>/wandb/run_id` so the resumed session continues the same run.
A writer added on `--resume` (no event files, no W&B run yet) first logs
the run's earlier rows (`history`), so its curves start at step 1.
"""

from __future__ import annotations

import importlib
import math
import netrc
import os
import secrets
import shutil
import socket
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

__all__ = ["REPORTERS", "ReportTo", "check_report_to", "parse_report_to", "tag"]

# name -> (the package it needs, the extra that installs it)
REPORTERS = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}
_TAGS = {"lr": "learning_rate", "seconds": "step_seconds", "tokens_per_s": "tokens_per_second"}


def parse_report_to(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """The reporters `--report-to` names: `"none"`, one name, a comma-separated list, or a list of those.

    Raises:
        ValueError: An unknown name (the message lists the known ones), or
            `none` together with another name.

    Example:
        >>> from qlora_jax.app.report_to import parse_report_to
        >>> parse_report_to("tensorboard,wandb"), parse_report_to(["wandb", "tensorboard"]), parse_report_to("none")
        (('tensorboard', 'wandb'), ('wandb', 'tensorboard'), ())
        >>> parse_report_to("tensorbord")
        Traceback (most recent call last):
        ...
        ValueError: --report-to: unknown 'tensorbord'; expected tensorboard, wandb or none (a list: tensorboard,wandb)
    """
    items = [value] if value is None or isinstance(value, str) else list(value)
    names = [n.strip() for item in items for n in (item or "none").split(",") if n.strip()]
    for name in names:
        if name not in (*REPORTERS, "none"):
            raise ValueError(f"--report-to: unknown {name!r}; expected {', '.join(REPORTERS)} or none "
                             f"(a list: {','.join(REPORTERS)})")
    if "none" in names and len(names) > 1:
        raise ValueError(f"--report-to: 'none' together with {[n for n in names if n != 'none']}")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def check_report_to(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`parse_report_to`, then imports each reporter's package: a run's pre-flight (nothing is written).

    Raises:
        ValueError: As `parse_report_to`, or a package that is not installed
            (one line, with the `pip install` that installs it).

    Example:
        >>> from qlora_jax.app.report_to import check_report_to
        >>> check_report_to("none")
        ()
    """
    names = parse_report_to(value)
    for name in names:
        _package(name)
    return names


def _package(name: str) -> ModuleType:
    package, extra = REPORTERS[name]
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ValueError(f"--report-to {name}: the {package} package is not installed ({e}); "
                         f"pip install 'qlora_jax[{extra}]'") from None


def tag(key: str) -> str:
    """The TensorBoard / W&B tag of a `metrics.jsonl` key.

    Example:
        >>> from qlora_jax.app.report_to import tag
        >>> tag("loss"), tag("lr"), tag("tokens_per_s"), tag("eval_loss")
        ('train/loss', 'train/learning_rate', 'train/tokens_per_second', 'eval/loss')
    """
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + _TAGS.get(key, key)


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's finite numbers (not `step`) under their tags."""
    out = {}
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[tag(key)] = float(value)
    return out


class _TensorBoard:
    def __init__(self, directory: Path, resume_step: int | None, history: Sequence[Mapping[str, Any]]) -> None:
        tensorboardx = _package("tensorboard")
        logdir = directory / "tensorboard"
        if resume_step is None:  # a new run: the event files of a run this one replaces (--overwrite) go
            shutil.rmtree(logdir, ignore_errors=True)
        sessions = len(list(logdir.glob("*tfevents*")))
        earlier = resume_step is not None and sessions > 0
        # purge_step: TensorBoard's reader drops what the earlier files hold from that step on (rewritten now).
        # The file name's session number keeps two sessions started in the same second (the name's timestamp) in
        # two files, read in session order.
        self.writer = tensorboardx.SummaryWriter(logdir=str(logdir), flush_secs=30, filename_suffix=f".{sessions:04d}",
                                                 purge_step=resume_step + 1 if earlier else None)
        if resume_step is not None and not earlier:  # added on --resume: the rows of the earlier sessions first
            for row in history:
                self.log(int(row["step"]), _scalars(row))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, directory: Path, resume_step: int | None, logged_through: int,
                 history: Sequence[Mapping[str, Any]], config: Mapping[str, Any], name: str) -> None:
        wandb = _package("wandb")
        root = directory / "wandb"
        if resume_step is None:  # a new run: the W&B files of a run this one replaces (--overwrite) go
            shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.logged_through = logged_through if run_id is not None else 0
        if run_id is None:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_file.write_text(run_id + "\n")
        self.mode = wandb_mode()
        self.run = wandb.init(dir=str(directory), project=os.environ.get("WANDB_PROJECT", "qlora-jax"), name=name,
                              id=run_id, resume="allow", config=dict(config), mode=self.mode)
        if self.logged_through == 0:  # a new W&B run (or one added on --resume): the earlier sessions' rows first
            for row in history:
                self.log(int(row["step"]), _scalars(row))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step > self.logged_through and scalars:  # W&B appends steps only; a step it has is not logged again
            self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_mode() -> str:
    """The mode a `--report-to wandb` run is started in (`wandb.init(mode=...)`): `$WANDB_MODE` when set, else
    `"online"` with an API key and a connection to the server, else `"offline"`.

    The key is `WANDB_API_KEY` or a `~/.netrc` (or `$NETRC`) login for the
    server's host (`WANDB_BASE_URL`, default `https://api.wandb.ai`); the
    connection is a TCP connection to that host within 3 seconds.

    Example:
        >>> from qlora_jax.app.report_to import wandb_mode
        >>> wandb_mode() in ("online", "offline", "disabled")  # "offline" here: no API key, no connection
        True
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if netrc.netrc(os.environ.get("NETRC")).authenticators(host) is None:
                return "offline"
        except (OSError, netrc.NetrcParseError):
            return "offline"
    try:
        socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=3).close()
    except OSError:
        return "offline"
    return "online"


class ReportTo:
    """The metric writers of one run (`--report-to`): `open`, `log` rows, `close`.

    Only process 0 of a multi-process run should open one (the others log
    nothing). Without names it does nothing.

    Example:
        >>> from qlora_jax.app.report_to import ReportTo
        >>> with ReportTo.open("none", tmp) as report:
        ...     report.log({"step": 1, "loss": 2.5, "lr": 1e-4})
        >>> report.names
        ()
    """

    def __init__(self, names: tuple[str, ...], writers: list[Any]) -> None:
        self.names = names
        self._writers = writers

    @classmethod
    def open(cls, names: str | Sequence[str] | None, directory: str | os.PathLike, *,
             config: Mapping[str, Any] | None = None, resume_step: int | None = None, logged_through: int = 0,
             history: Sequence[Mapping[str, Any]] = (), name: str | None = None) -> ReportTo:
        """Starts the writers `names` (as `--report-to` spells them) for the run in `directory`.

        Args:
            names: `"none"`, `"tensorboard"`, `"wandb"`, a comma-separated
                list or a list of those.
            directory: The run's directory (`--output`); each writer uses its
                own folder in it.
            config: The run's settings (W&B's run config).
            resume_step: `None` for a new run (the writers' folders of a
                run it replaces are removed), else the step of the
                checkpoint a resumed run continues from (see the module's
                docstring).
            logged_through: For a resumed run, the last step the stopped
                session logged (W&B does not get steps up to it again).
            history: For a resumed run, its rows up to `resume_step`: what
                a writer the earlier sessions did not have logs first.
            name: The W&B run's name (default: the directory's name).

        Raises:
            ValueError: As `check_report_to`.
        """
        names = check_report_to(names)
        directory = Path(directory)
        writers: list[Any] = []
        try:
            for reporter in names:
                if reporter == "tensorboard":
                    writers.append(_TensorBoard(directory, resume_step, history))
                else:
                    writers.append(_Wandb(directory, resume_step, logged_through, history, config or {},
                                          name or directory.resolve().name))
        except BaseException:
            for writer in writers:
                writer.close()
            raise
        return cls(names, writers)

    def log(self, row: Mapping[str, Any]) -> None:
        """Logs a `metrics.jsonl` row: its numbers (not `step`) under their tags (`tag`) at its `step`."""
        scalars = _scalars(row)
        if scalars:
            for writer in self._writers:
                writer.log(int(row["step"]), scalars)

    def close(self) -> None:
        """Flushes and closes every writer (W&B: finishes the run)."""
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.close()

    def __enter__(self) -> ReportTo:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

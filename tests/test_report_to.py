"""`qlora-jax finetune --report-to tensorboard,wandb`: TensorBoard's own reader and W&B's record format read back
what metrics.jsonl holds, one value per step, also after a resumed run recomputed steps; a missing writer package
is refused before anything is written. The run trains on a Parquet file written by pyarrow (issue 25's acceptance).
W&B's offline transaction log is read with W&B's own protobuf schema (`wandb.proto`); wandb 0.31 has no Python reader
of the file's framing any more (it moved to the Go service), so the framing is decoded here.
"""

import json
import struct
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_data import finetune_files
from wandb.proto import wandb_internal_pb2

from qlora_jax.app.cli import main
from qlora_jax.app.plot import loss_figure
from qlora_jax.app.report_to import ReportTo

ROWS = [{"prompt": "what is two plus two", "completion": "two plus two is four"},
        {"prompt": "the cat sat on", "completion": "the mat"},
        {"prompt": "hello there", "completion": "i am fine thanks"}] * 2
# metrics.jsonl key -> tag
TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
        "tokens_per_s": "train/tokens_per_second", "peak_memory_gib": "train/peak_memory_gib",
        "seconds": "train/step_seconds", "tokens": "train/tokens", "eval_loss": "eval/loss"}


def _wandb_records(path):
    """The records of a W&B transaction log (`run-<id>.wandb`), decoded with W&B's own protobuf schema.

    The framing is the LevelDB log format W&B documents for these files: a 7-byte header (`:W&B`, magic 0xBEE1,
    version 0), then 32 KiB blocks of chunks, each `crc32c (4) | length (2, little endian) | type (1) | data`
    (type 1 a whole record, 2/3/4 its first/middle/last piece; a block's tail under 7 bytes is padding)."""
    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), data[:7]
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (length, kind) == (0, 0):  # zero padding to the block's end
            pos += block - pos % block
            continue
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def _finished_records(path, timeout=30.0):
    """`_wandb_records(path)` once the file holds the run's exit record: W&B's service process writes the file
    on its own schedule, and may still be closing it when `run.finish()` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _wandb_history(out):
    """{step: {tag: value}} over every offline W&B run directory of `out` (sessions in order), and the run ids."""
    history, ids = {}, []
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in _finished_records(path):
            if record.WhichOneof("record_type") == "run":
                ids.append(record.run.run_id)
            elif record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                step = items.pop("_step")
                assert step not in history, f"step {step} logged twice to W&B"
                history[step] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history, ids


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(out):
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return events


def _expected(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


def test_tensorboard_and_wandb_hold_metrics_jsonl(tmp_path, monkeypatch, capsys):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no W&B login: the run is logged offline
    path, _, _ = finetune_files(tmp_path)
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), data)
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(path), "--data", str(data), "--output", str(out), "--steps", "4",
                 "--batch-size", "2", "--seq-len", "16", "--rank", "2", "--alpha", "4", "--lr", "1e-2",
                 "--warmup-ratio", "0.5", "--targets", "q_proj", "v_proj", "--eval-data", str(data),
                 "--eval-every", "2", "--no-fit", "--report-to", "tensorboard,wandb"]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 4]  # every 2 steps, and at the end
    lr = [v for _, v in _expected(rows, "lr")]
    assert lr[0] < lr[1] < lr[2] == lr[3]  # warm-up over 2 of the 4 steps, then constant

    # TensorBoard's reader: every metric at every step, equal to metrics.jsonl's values as float32.
    events = _tensorboard(out)
    assert set(TAGS.values()) <= set(events.Tags()["scalars"])
    for key, name in TAGS.items():
        got, expected = [(e.step, e.value) for e in events.Scalars(name)], _expected(rows, key)
        assert [s for s, _ in got] == [s for s, _ in expected], name
        np.testing.assert_allclose([v for _, v in got], np.float32([v for _, v in expected]), rtol=1e-7,
                                   err_msg=name)

    # W&B, offline: the same history (a step's last value: the evaluation at step 4 is logged twice).
    history, ids = _wandb_history(out)
    assert ids == [(out / "wandb" / "run_id").read_text().strip()] and sorted(history) == [1, 2, 3, 4]
    for key, name in TAGS.items():
        expected = dict(_expected(rows, key))
        assert {s: history[s][name] for s in expected} == expected, name
    assert "wandb sync" in "".join(capsys.readouterr())  # W&B says how to upload the offline run

    # loss.png: a PNG of the figure's size that PIL reads; the figure plots metrics.jsonl.
    with Image.open(out / "loss.png") as image:
        assert image.format == "PNG" and image.size == (640, 480)
    loss_axes, lr_axes = loss_figure(out / "metrics.jsonl").axes
    (train, evals), (rate,) = loss_axes.get_lines(), lr_axes.get_lines()
    for line, key in ((train, "loss"), (evals, "eval_loss"), (rate, "lr")):
        assert list(zip(line.get_xdata().tolist(), line.get_ydata().tolist(), strict=True)) == _expected(rows, key)


def test_resumed_run_appends_without_duplicate_steps(tmp_path, monkeypatch):
    """What `finetune --resume` passes: a run stopped after logging step 4 resumes from its step-2 checkpoint and
    logs the recomputed steps 3, 4 again. TensorBoard's reader shows each step once, the new values (the purge);
    W&B keeps the first values of the steps it has and gets only new steps. A writer first named on resume (a
    second directory) logs the earlier rows first."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")

    def row(step, loss):
        return {"step": step, "loss": loss, "lr": 1e-3 * step, "tokens_per_s": 100.0 + loss}

    first = [row(s, 3.0 / s) for s in (1, 2, 3, 4)] + [{"step": 4, "eval_loss": 2.5}]
    again = [row(3, 1.25), row(4, 1.5), {"step": 4, "eval_loss": 2.0}, row(5, 0.5)]  # recomputed 3, 4; new 5
    kept = [r for r in first if r["step"] <= 2]
    with ReportTo.open("tensorboard,wandb", tmp_path / "run") as report:
        for r in first:
            report.log(r)
    for directory in (tmp_path / "run", tmp_path / "added"):
        with ReportTo.open("tensorboard,wandb", directory, resume_step=2, logged_through=4, history=kept) as report:
            for r in again:
                report.log(r)
    for directory, wandb_rows in ((tmp_path / "run", first + again[3:]), (tmp_path / "added", kept + again)):
        events = _tensorboard(directory)
        history, ids = _wandb_history(directory)
        assert len(ids) == (2 if directory.name == "run" else 1)  # one offline run directory per session
        assert len(set(ids)) == 1  # the resumed session continues the same W&B run
        assert len(list((directory / "tensorboard").glob("*tfevents*"))) == len(ids)  # one file per session
        for key in ("loss", "lr", "tokens_per_s", "eval_loss"):
            name = TAGS[key]
            assert [(e.step, e.value) for e in events.Scalars(name)] == [
                (s, np.float32(v)) for s, v in _expected(kept + again, key)], (directory.name, name)
            expected = dict(_expected(wandb_rows, key))
            assert {s: history[s][name] for s in expected} == expected, (directory.name, name)


@pytest.mark.parametrize("name, extra", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_missing_writer_package_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, name, extra):
    monkeypatch.setitem(sys.modules, {"wandb": "wandb", "tensorboard": "tensorboardX"}[name], None)  # not importable
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"), "--output",
            str(out), "--report-to", f"none,{name}"]
    assert main(argv) == 2
    assert "'none' together with" in capsys.readouterr().err
    assert main([*argv[:-1], name]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install 'qlora_jax[{extra}]'" in err, err
    assert not out.exists()

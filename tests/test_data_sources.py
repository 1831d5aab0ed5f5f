"""Dataset sources beyond JSONL (issue 25): Parquet, Arrow, `save_to_disk`, CSV and JSON files written here by
pyarrow, `datasets` and the standard library give the rows, token ids and loss masks of the same rows as JSONL read
by `load_jsonl` and tokenized by `tokenize_examples`; field mappings and the common layouts give the rows written
out below; errors name the file, the row, the columns and the flag; a Parquet file is read a row group at a time;
resuming from a saved data position on a Parquet source continues with the batches of an uninterrupted pass."""

import csv
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from test_data import CONVERSATION, PLAIN_TEMPLATE, _tokenizer

from qlora_jax._src.data import Batcher, iter_rows, load_examples, load_jsonl, sources, tokenize_examples

datasets = pytest.importorskip("datasets")

TEXT = [{"text": "the cat sat on the mat"}, {"text": "hello there how are you"}, {"text": "i am fine thanks"}]
PROMPT = [{"prompt": "what is two plus two", "completion": " two plus two is four"},
          {"prompt": "tell me a story", "completion": " the cat sat on the mat"}]
CHAT = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]


@pytest.fixture(scope="module")
def tokenizer():
    tok = _tokenizer("bpe")
    tok.chat_template = PLAIN_TEMPLATE
    return tok


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    return path


def _same_examples(a, b):
    (xa, sa), (xb, sb) = a, b
    assert sa == sb
    assert len(xa) == len(xb)
    for ea, eb in zip(xa, xb, strict=True):
        np.testing.assert_array_equal(ea.input_ids, eb.input_ids)
        np.testing.assert_array_equal(ea.loss_mask, eb.loss_mask)


def test_every_format_gives_the_rows_and_tokens_of_the_same_jsonl(tmp_path, tokenizer):
    for name, rows in (("text", TEXT * 400), ("prompt", PROMPT), ("chat", CHAT)):  # 1200 rows: several batches
        d = tmp_path / name
        d.mkdir()
        reference_rows = load_jsonl(_jsonl(d / "data.jsonl", rows))
        reference = tokenize_examples(reference_rows, tokenizer, 32)
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, d / "data.parquet", row_group_size=500)
        feather.write_feather(table, d / "data.feather")  # an Arrow IPC file
        with pa.ipc.new_stream(d / "stream.arrow", table.schema) as w:  # an Arrow IPC stream
            w.write_table(table, max_chunksize=300)
        (d / "array.json").write_text(json.dumps(rows, indent=1))
        (d / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        _csv(d / "data.csv", rows)
        ds = datasets.Dataset.from_list(rows)
        ds.save_to_disk(d / "saved")
        datasets.DatasetDict({"train": ds, "test": ds.select(range(1))}).save_to_disk(d / "dict")
        for source in ("data.parquet", "data.feather", "stream.arrow", "array.json", "lines.json", "data.csv",
                       "saved", "dict", "dict:train"):
            got = list(iter_rows(d / source if source != "dict:train" else f"{d}/dict:train"))
            assert [r for r, _ in got] == reference_rows, (name, source)
            _same_examples(load_examples(d / source, tokenizer, 32), reference)
        assert [w for _, w in iter_rows(d / "data.parquet")][-1] == f"{d}/data.parquet:row {len(rows)}"
        assert [r for r, _ in iter_rows(f"{d}/dict:test")] == reference_rows[:1]
    # JSON arrays decoded from small windows of the file: the elements and the lines they start on.
    rows = [{"text": "\u00e9t\u00e9 " * k + "x", "n": 10 ** k} for k in range(1, 30)]
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    lines = [i for i, line in enumerate(path.read_text().splitlines(), start=1) if line == "  {"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sources, "_JSON_CHUNK", 7)
        got = list(sources._iter_json(path))
    assert [r for r, _ in got] == rows
    assert [w for _, w in got] == [f"{path}:{n}" for n in lines]


def test_field_mappings_and_common_layouts(tmp_path, tokenizer):
    chat = [{"from": "system", "value": "be brief", "weight": None}, {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"}]
    table = [{"id": 1, "body": "the cat", "q": "two plus", "a": " two", "chat": chat}]
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(table), path)
    expected_chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}]
    for fields, row in (({"text_field": "body"}, {"text": "the cat"}),
                        ({"prompt_field": "q", "completion_field": "a"}, {"prompt": "two plus", "completion": " two"}),
                        ({"messages_field": "chat"}, {"messages": expected_chat})):
        assert [r for r, _ in iter_rows(path, **fields)] == [row], fields
    # Only one of the two named: the other is its schema's name.
    pq.write_table(pa.Table.from_pylist([{"q": "a", "completion": "b"}]), tmp_path / "half.parquet")
    assert [r for r, _ in iter_rows(tmp_path / "half.parquet", prompt_field="q")] == [{"prompt": "a",
                                                                                      "completion": "b"}]
    layouts = {
        "alpaca": ([{"instruction": "add", "input": "2 2", "output": "4"},
                    {"instruction": "say hi", "input": "", "output": "hi"}],
                   [{"prompt": "add\n\n2 2\n", "completion": "4"}, {"prompt": "say hi\n", "completion": "hi"}]),
        "alpaca_no_input": ([{"instruction": "say hi", "output": "hi"}],
                            [{"prompt": "say hi\n", "completion": "hi"}]),
        "qa": ([{"question": "2+2?", "answer": "4"}], [{"prompt": "2+2?\n", "completion": "4"}]),
        "sharegpt": ([{"conversations": chat}], [{"messages": expected_chat}]),
    }
    for name, (given, expected) in layouts.items():
        pq.write_table(pa.Table.from_pylist(given), tmp_path / f"{name}.parquet")
        for source in (tmp_path / f"{name}.parquet", _jsonl(tmp_path / f"{name}.jsonl", given),
                       _csv(tmp_path / f"{name}.csv", given)):
            assert [r for r, _ in iter_rows(source)] == expected, source
        _same_examples(load_examples(tmp_path / f"{name}.parquet", tokenizer, 64),
                       tokenize_examples(expected, tokenizer, 64))


def _error(source, match, exc=ValueError, **fields):
    with pytest.raises(exc) as info:
        list(iter_rows(source, **fields))
    message = str(info.value)
    assert "\n" not in message
    for part in match:
        assert part in message, (part, message)
    return message


def test_errors_name_the_file_the_row_the_columns_and_the_flag(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"body": "a", "id": 1}] * 2), path)
    _error(path, [f"{path}:row 1: no column 'text'", "--text-field", "columns found: ['body', 'id']"],
           text_field="text")
    _error(path, [f"{path}:row 1: columns ['body', 'id'] match no schema", "--text-field", "--messages-field"])
    pq.write_table(pa.Table.from_pylist([{"text": "a", "prompt": "p", "completion": "c"}]), path)
    _error(path, ["columns ['completion', 'prompt', 'text'] match no schema",
                  "they hold those of text and prompt/completion", "--text-field", "--prompt-field"])
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": 1}]), path)  # an extra column: named, not ignored
    _error(path, ["columns ['label', 'text'] match no schema", "they hold those of text;", "--text-field"])
    assert [r for r, _ in iter_rows(path, text_field="text")] == [{"text": "a"}]
    _error(path, ["--text-field and --prompt-field/--completion-field"], text_field="text", prompt_field="prompt")
    pq.write_table(pa.Table.from_pylist([{"text": "a"}] * 2 + [{"text": " "}] + [{"text": "b"}]), path)
    _error(path, [f"{path}:row 3: \"text\" is empty"])
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}]), path)
    _error(path, [f"{path}:row 2: \"text\" must be a string, got NoneType"])
    pq.write_table(pa.Table.from_pylist([{"conversations": [{"from": "tool", "value": "x"}]}]), path)
    _error(path, [f"{path}:row 1: 'conversations'[0] has from='tool'"])
    bad_csv = tmp_path / "d.csv"
    bad_csv.write_text('text,id\n"a",1\n"multi\nline",2\n"",3\n')
    _error(bad_csv, [f"{bad_csv}:5: \"text\" is empty"], text_field="text")
    bad_csv.write_text("text\na\nb,c\n")
    _error(bad_csv, [f"{bad_csv}:3: 2 fields, but the header has 1"])
    bad_json = tmp_path / "d.json"
    bad_json.write_text('[\n {"text": "a"},\n {"text": 3}\n]')
    _error(bad_json, [f"{bad_json}:3: \"text\" must be a string, got int"])
    bad_json.write_text('[\n {"text": "a"},\n {"text": "b"\n]')
    _error(bad_json, [f"{bad_json}:3: invalid JSON"])
    (tmp_path / "d.txt").write_text("x")
    _error(tmp_path / "d.txt", ["unknown data format '.txt'"])
    _error(tmp_path / "nope.parquet", [f"{tmp_path}/nope.parquet: no such file"], FileNotFoundError)
    _error("trian", ["trian: no such file or directory, and not a Hugging Face hub dataset name"], FileNotFoundError)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network: fail at once
    monkeypatch.setattr(sys.modules["huggingface_hub"].constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    _error("some-org/some-dataset:test", ["some-org/some-dataset: no such file or directory, and the hub dataset "
                                          "'some-org/some-dataset' (split 'test') could not be loaded ("],
           FileNotFoundError)
    # Without the optional packages: Parquet, Arrow and datasets name the extra; JSONL, JSON and CSV still work.
    feather.write_feather(pa.table({"text": ["a"]}), tmp_path / "x.feather")
    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(tmp_path / "saved")
    for module in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)
    pq_path = tmp_path / "d.parquet"
    _error(pq_path, [f"{pq_path}: reading Parquet needs the optional package 'pyarrow': pip install "
                     "'qlora_jax[data]'"], ImportError)
    _error(tmp_path / "x.feather", ["x.feather: reading Arrow needs", "pip install 'qlora_jax[data]'"], ImportError)
    _error(tmp_path / "saved", ["saved: reading a save_to_disk directory needs the optional package 'datasets'"],
           ImportError)
    (tmp_path / "ok.csv").write_text("text\nhello\n")
    (tmp_path / "ok.json").write_text('[{"text": "hello"}]')
    assert [r for r, _ in iter_rows(tmp_path / "ok.csv")] == [r for r, _ in iter_rows(tmp_path / "ok.json")]


def test_resume_mid_epoch_on_parquet_continues_the_uninterrupted_batches(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    words = "the cat sat on mat what is two plus four hello there how are you".split()
    rows = [{"prompt": " ".join(rng.choice(words, rng.integers(1, 6))),
             "completion": " " + " ".join(rng.choice(words, rng.integers(1, 8)))} for _ in range(60)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet", row_group_size=16)

    def make():
        examples, _ = load_examples(tmp_path / "train.parquet", tokenizer, 24)
        return Batcher(examples, batch_size=4, seq_len=24, seed=3, num_epochs=2)

    straight = list(make())
    reference = Batcher(tokenize_examples(rows, tokenizer, 24)[0], batch_size=4, seq_len=24, seed=3, num_epochs=2)
    stop = make().num_batches_per_epoch + 2  # mid-way through the second epoch
    batcher = make()
    for _ in range(stop):
        next(batcher)
    rest = list(make().restore(json.loads(json.dumps(batcher.state()))))
    assert len(rest) == len(straight) - stop > 0
    for a, b in zip(rest, straight[stop:], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for a, b in zip(straight, reference, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_parquet_is_read_a_row_group_at_a_time(tmp_path):
    row_groups, rows_per_group, chars = 16, 256, 2048
    path = tmp_path / "big.parquet"
    text = pa.array([f"{i:06d}" + "x" * chars for i in range(row_groups * rows_per_group)])
    pq.write_table(pa.table({"text": text}), path, row_group_size=rows_per_group, compression="none")
    size = row_groups * rows_per_group * chars
    del text
    before = pa.total_allocated_bytes()
    peak, n = 0, 0
    for row, _ in iter_rows(path):
        assert row["text"].startswith(f"{n:06d}")
        n += 1
        peak = max(peak, pa.total_allocated_bytes() - before)
    assert n == row_groups * rows_per_group
    assert peak < size / 4, (peak, size)
    # The measure sees a whole-table read: what a reader that loads the file whole would hold.
    table = pq.read_table(path)
    assert pa.total_allocated_bytes() - before >= size
    del table


def test_cli_finetune_preflight_reads_parquet_columns_before_writing(tmp_path, capsys):
    """The data's columns are checked right after the model's config.json is read: a config is all it takes."""
    from qlora_jax.app.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}))
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"body": "the cat sat on the mat", "id": 1}] * 4), data)
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(model), "--data", str(data), "--output", str(out), "--steps", "1",
            "--no-fit"]
    assert main([*argv, "--text-field", "txt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{data}:row 1: no column 'txt'" in err and "['body', 'id']" in err, err
    assert main([*argv, "--prompt-field", "body", "--messages-field", "id"]) == 2
    assert "--prompt-field/--completion-field and --messages-field" in capsys.readouterr().err
    assert not out.exists()

"""`qlora-jax finetune` checks its input before it writes anything: a run that cannot start exits 2 with one line
naming the offending thing, leaves `--output` as it was, and the corrected command then runs without
`--overwrite`."""

import json
from pathlib import Path

import huggingface_hub
import pytest
from test_data import finetune_files

from qlora_jax.app.cli import main

ROWS = [{"prompt": "what is two plus two", "completion": "two plus two is four"},
        {"text": "the cat sat on the mat"}] * 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint with a tokenizer, a copy of it whose `model.safetensors` is cut short, and a JSONL file."""
    tmp = tmp_path_factory.mktemp("preflight")
    path, _, _ = finetune_files(tmp)
    truncated = tmp / "truncated"
    truncated.mkdir()
    for f in path.iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) - 1000] if f.name == "model.safetensors" else data)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path, truncated, data


def _args(model, data, out, *extra):
    return ["finetune", "--model", str(model), "--data", str(data), "--output", str(out), "--steps", "1",
            "--batch-size", "2", "--seq-len", "16", "--rank", "2", "--alpha", "4", "--targets", "q_proj", *extra]


def _listing(directory: Path) -> dict[str, bytes] | None:
    """Every file under `directory` with its bytes (None where it does not exist)."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(directory.rglob("*"))}


def _refused(argv, out, capsys, *named):
    """Runs `argv`; checks exit 2, one `error:` line naming each of `named`, and `out` left as it was."""
    before = _listing(out)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    for name in named:
        assert name in err, err
    assert _listing(out) == before
    return err


@pytest.mark.parametrize("bad", [["--rank", "0"], ["--steps", "-5"], ["--steps", "0"], ["--block-size", "48"]])
def test_bad_setting_is_refused_before_anything_is_written(files, tmp_path, capsys, bad):
    model, _, data = files
    out = tmp_path / "run"
    argv = _args(model, data, out)
    _refused([*argv, *bad], out, capsys, *bad)
    assert not out.exists()
    out.mkdir()  # an existing empty --output stays empty
    _refused([*argv, *bad], out, capsys, *bad)
    assert main(argv) == 0  # the corrected command, without --overwrite
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_every_range_is_checked_before_the_model_is_read(files, tmp_path, capsys):
    model, _, data = files
    out = tmp_path / "run"
    for bad in (["--epochs", "0"], ["--batch-size", "0"], ["--grad-accum", "0"], ["--seq-len", "0"],
                ["--alpha", "-1"], ["--lr", "0"], ["--dropout", "1"], ["--warmup-ratio", "2"],
                ["--max-grad-norm", "-1"], ["--eval-every", "-1"], ["--save-every", "-1"], ["--seed", "-1"],
                ["--init", "svd"], ["--init", "pissa_niter_x"], ["--init", "pissa_niter_0"], ["--loftq-iter", "0"],
                ["--loftq-iter", "3"], ["--init", "loftq", "--format", "none"], ["--save-residual-base"]):
        _refused([*_args(model, data, out), *bad], out, capsys, *bad)
    _refused([*_args(model, data, out), "--init", "pissa", "--use-dora", "--save-residual-base"], out, capsys,
             "--save-residual-base", "--use-dora")
    assert not out.exists()


def test_a_block_size_that_divides_no_layer_width_runs(files, tmp_path):
    """A block size of the format's list larger than every layer (blocks cross rows, one partial block per
    kernel, as bitsandbytes stores it) is no shape problem: the run trains and writes its adapter."""
    model, _, data = files
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    assert hidden % 4096
    out = tmp_path / "run"
    assert main([*_args(model, data, out), "--block-size", "4096"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_truncated_safetensors_is_named_before_loading(files, tmp_path, capsys):
    model, truncated, data = files
    out = tmp_path / "run"
    _refused(_args(truncated, data, out), out, capsys, str(truncated / "model.safetensors"), "truncated")
    assert not out.exists()
    assert main(_args(model, data, out)) == 0


def test_bad_settings_leave_an_existing_run_intact(files, tmp_path, capsys):
    """--overwrite with a bad setting refuses before touching the run it would replace, --resume with one keeps
    the run resumable."""
    model, truncated, data = files
    out = tmp_path / "run"
    argv = _args(model, data, out)
    assert main(argv) == 0
    _refused([*argv, "--overwrite", "--rank", "0"], out, capsys, "--rank")
    _refused([*_args(truncated, data, out), "--overwrite"], out, capsys, "model.safetensors")
    _refused([*argv, "--resume", "--steps", "0"], out, capsys, "--steps")
    _refused([*argv, "--resume", "--init", "olora"], out, capsys, "--resume", "'init'", "olora")  # what is trained


def test_a_mistyped_model_directory_is_not_a_hub_id(files, tmp_path, monkeypatch, capsys):
    model, _, data = files
    monkeypatch.chdir(tmp_path)
    err = _refused(_args("my_modle", data, "run"), tmp_path / "run", capsys, "my_modle", "no directory")
    assert "hub" in err
    assert not (tmp_path / "run").exists()
    assert main(_args(model, data, "run")) == 0


def test_an_unresolvable_hub_id_is_one_line(files, tmp_path, monkeypatch, capsys):
    _, _, data = files
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail at once
    monkeypatch.chdir(tmp_path)
    _refused(_args("some-org/some-model", data, "run"), tmp_path / "run", capsys, "some-org/some-model", "hub")
    assert not (tmp_path / "run").exists()

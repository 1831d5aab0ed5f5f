"""`qlora-jax finetune` -> `generate` -> `export` through the command line on a tiny
checkpoint and JSONL file made here; the adapter loads in PEFT."""

import json

import numpy as np
import pytest
import torch
import transformers
from test_data import _tokenizer, finetune_files

from qlora_jax.app.cli import main

ROWS = [{"prompt": "what is two plus two", "completion": "two plus two is four"},
        {"text": "the cat sat on the mat"},
        {"prompt": "hello there", "completion": "i am fine thanks"}] * 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The straight run that the tests below inspect; also the one-device reference of `--mesh data=8` (hence 8
    rows a batch). Interrupted runs: tests/test_interrupts.py."""
    tmp = tmp_path_factory.mktemp("cli")
    path, hf, data = finetune_files(tmp, ROWS)
    out = tmp / "run"
    args = ["finetune", "--model", str(path), "--data", str(data), "--output", str(out), "--steps", "6",
            "--batch-size", "8", "--seq-len", "32", "--rank", "4", "--alpha", "8", "--lr", "1e-2",
            "--eval-data", str(data), "--save-every", "3", "--targets", "q_proj", "v_proj", "down_proj"]
    assert main(args) == 0
    return tmp, path, hf, data, out, args


def test_finetune_writes_the_run(run):
    _, _, _, _, out, _ = run
    for name in ("run_config.json", "metrics.jsonl", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert any("eval_loss" in r for r in rows)
    assert json.loads((out / "run_config.json").read_text())["format"] == "nf4"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def test_existing_run_is_refused_without_resume_or_overwrite(run, capsys):
    tmp, _, _, _, _, args = run
    assert main(args) == 2
    assert "already holds files" in capsys.readouterr().err
    fresh = [a if a != str(tmp / "run") else str(tmp / "fresh") for a in args]
    assert main([*fresh, "--seq-len", "100000"]) == 2  # checked before anything is written
    assert "--seq-len: 100000 exceeds" in capsys.readouterr().err
    assert not (tmp / "fresh").exists()


def test_bad_data_names_the_line(run, capsys, tmp_path):
    _, path, _, _, _, _ = run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    assert main(["finetune", "--model", str(path), "--data", str(bad), "--output", str(tmp_path / "o"),
                 "--seq-len", "32"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    assert main(["finetune", "--model", str(path), "--data", str(missing), "--output", str(tmp_path / "o"),
                 "--seq-len", "32"]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(["finetune", "--model", str(path), "--data", str(empty), "--output", str(tmp_path / "o"),
                 "--seq-len", "32"]) == 2
    assert "empty.jsonl: empty dataset" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a run that could not start


def test_generate_and_export(run, capsys):
    tmp, path, _, _, out, _ = run
    assert main(["generate", "--model", str(path), "--adapter", str(out / "adapter"), "--prompt",
                 "what is two plus two", "--max-new-tokens", "5"]) == 0
    words = capsys.readouterr().out.split()
    vocab = set(_tokenizer("wordlevel").get_vocab())
    assert len(words) <= 5 and all(w in vocab for w in words)  # at most 5 new word-level tokens, decoded
    merged = tmp / "merged"
    assert main(["export", "--model", str(path), "--adapter", str(out / "adapter"), "--merged", str(merged)]) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(merged).config.model_type == "llama"
    assert transformers.AutoTokenizer.from_pretrained(merged)("the cat")["input_ids"]


def test_adapter_loads_in_peft(run):
    from peft import PeftModel

    _, path, hf, _, out, _ = run
    peft_model = PeftModel.from_pretrained(hf, out / "adapter").eval()
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        assert np.isfinite(peft_model(ids).logits.numpy()).all()
    assert sorted(json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]) == [
        "down_proj", "q_proj", "v_proj"]


def _interrupted_args(args, run_dir, out):
    return [a if a != str(run_dir) else str(out) for a in args]


def run_losses(out):
    """The training losses, then the evaluation losses, in a finetune run's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r] + [r["eval_loss"] for r in rows if "eval_loss" in r]


def test_finetune_on_a_mesh_matches_one_device(run, tmp_path, capsys):
    """--mesh data=8 (8 CPU devices, data parallel) trains and evaluates like one device: the same training and
    evaluation losses to 1e-5 (dropout included: its masks do not depend on the sharding)."""
    _, _, _, _, straight, args = run
    assert main([*_interrupted_args(args, straight, tmp_path / "mesh"), "--mesh", "data=8"]) == 0
    losses, reference = run_losses(tmp_path / "mesh"), run_losses(straight)
    assert len(reference) == 7  # 6 steps and the final evaluation
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    assert (tmp_path / "mesh" / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main([*_interrupted_args(args, straight, tmp_path / "bad_mesh"), "--mesh", "data=3"]) == 2
    assert "mesh {'data': 3}: the axis sizes multiply to 3, but there are 8 devices" in capsys.readouterr().err
    assert not (tmp_path / "bad_mesh").exists()

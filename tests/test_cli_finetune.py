"""`qlora-jax finetune` -> `generate` -> `export` through the command line on a tiny
checkpoint and JSONL file made here; the adapter loads in PEFT."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from test_data import _tokenizer, finetune_files

import qlora_jax as qj
from qlora_jax._src import checkpoint as checkpoint_module
from qlora_jax._src.train.trainer import Trainer
from qlora_jax.app.cli import main

ROWS = [{"prompt": "what is two plus two", "completion": "two plus two is four"},
        {"text": "the cat sat on the mat"},
        {"prompt": "hello there", "completion": "i am fine thanks"}] * 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The straight run that the tests below inspect, interrupt and resume; also the one-device reference of
    `--mesh data=8` (hence 8 rows a batch)."""
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


@pytest.fixture(autouse=True)
def _sigint_raises():
    """Python's own SIGINT handler, also where the test runner was started with SIGINT ignored (a background job
    of a non-interactive shell)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _send_sigint(times=1):
    for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_mid_step_saves_that_step_and_resume_is_exact(run, monkeypatch, capsys):
    """A real SIGINT during step 2: the step finishes, is checkpointed, and --resume ends bit-identical to a
    straight run (adapters; the optimizer state is checked by the SIGKILL resume test)."""
    tmp, _, _, _, straight, args = run
    out = tmp / "interrupted_mid_step"
    argv = _interrupted_args(args, straight, out)
    original = Trainer.train_step

    def train_step(self, batch):
        if self.step == 1:  # the signal arrives while step 2 is being computed
            _send_sigint()
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert main(argv) == 130
    assert "saved step 2 of 6" in capsys.readouterr().err
    assert qj.checkpoint.latest_step(out / "checkpoints") == 2
    assert not (out / "adapter").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(Trainer, "train_step", original)
    assert main([*argv, "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 3, 4, 5, 6, 6]  # each step once, then the final eval
    assert ((out / "adapter" / "adapter_model.safetensors").read_bytes()
            == (straight / "adapter" / "adapter_model.safetensors").read_bytes())


def test_ctrl_c_during_a_checkpoint_save_finishes_it(run, monkeypatch, capsys):
    tmp, _, _, _, straight, args = run
    out = tmp / "interrupted_in_save"
    original = checkpoint_module.save

    def save(*a, **k):
        _send_sigint()  # the handler runs here, inside the save
        return original(*a, **k)

    monkeypatch.setattr(checkpoint_module, "save", save)
    assert main(_interrupted_args(args, straight, out)) == 130
    assert "saved step 3 of 6" in capsys.readouterr().err  # the save at step 3 (--save-every 3) completed
    assert qj.checkpoint.latest_step(out / "checkpoints") == 3


def test_second_ctrl_c_abandons_the_save_in_progress(run, monkeypatch, capsys):
    """Ctrl-C twice while step 3 is being written: the run stops at once, the half-written step is ignored and
    the run resumes from its last complete checkpoint to the straight run's result."""
    tmp, _, _, _, straight, args = run
    out = tmp / "interrupted_twice"
    argv = _interrupted_args(args, straight, out)
    original = checkpoint_module.save
    calls = []

    def save(directory, model, optimizer=None, *, step=0, **k):
        calls.append(step)
        if step == 4:
            Path(directory, "4.orbax-checkpoint-tmp-123").mkdir()  # what a cut-short Orbax write leaves
            _send_sigint(2)
        return original(directory, model, optimizer, step=step, **k)

    monkeypatch.setattr(checkpoint_module, "save", save)
    argv_every = [*argv[:argv.index("--save-every") + 1], "1", *argv[argv.index("--save-every") + 2:]]
    assert main(argv_every) == 130
    assert calls == [1, 2, 3, 4]
    assert qj.checkpoint.latest_step(out / "checkpoints") == 3
    monkeypatch.setattr(checkpoint_module, "save", original)
    assert main([*argv_every, "--resume"]) == 0
    assert ((out / "adapter" / "adapter_model.safetensors").read_bytes()
            == (straight / "adapter" / "adapter_model.safetensors").read_bytes())


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

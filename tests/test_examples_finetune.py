"""`examples/finetune.py` and `examples/finetune_notebook.ipynb` run on a tiny checkpoint made here: the loss
falls, and the adapter they write loads in PEFT over the original model."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from test_data import finetune_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("example")
    path, hf, _ = finetune_files(tmp, tokenizer="bpe")
    return tmp, path, hf


def _loads_in_peft(hf, adapter: Path) -> None:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        assert torch.isfinite(peft_model(torch.tensor([[2, 5, 6, 7]])).logits).all()
    assert peft_model.peft_config["default"].r == 16
    peft_model.unload()


def test_finetune_script(checkpoint, monkeypatch, capsys):
    tmp, path, hf = checkpoint
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the cat sat on", "completion": " the mat"}) + "\n"
                            for _ in range(16)))
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--model", str(path), "--data", str(data), "--output",
                                      str(tmp / "out"), "--steps", "20", "--seq-len", "32", "--lr", "1e-2",
                                      "--prompt", "the cat sat on"])
    result = runpy.run_path(str(ROOT / "examples" / "finetune.py"), run_name="not_main")["main"]()
    assert result["last_loss"] < result["first_loss"] - 1.0  # the untrained head limits how far it falls
    out = capsys.readouterr().out
    assert "after:  the mat\n" in out  # the greedy answer learned the completion
    assert (tmp / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _loads_in_peft(hf, tmp / "out" / "adapter")


def test_notebook_code_cells_run_in_order(checkpoint, monkeypatch):
    tmp, path, hf = checkpoint
    notebook = json.loads((ROOT / "examples" / "finetune_notebook.ipynb").read_text())
    assert notebook["nbformat"] == 4
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("QLORA_JAX_MODEL", str(path))
    monkeypatch.setenv("QLORA_JAX_STEPS", "20")
    monkeypatch.setenv("QLORA_JAX_SEQ_LEN", "64")
    monkeypatch.setenv("QLORA_JAX_LR", "1e-2")
    namespace: dict = {}
    for i, cell in enumerate(c for c in notebook["cells"] if c["cell_type"] == "code"):
        exec(compile("".join(cell["source"]), f"finetune_notebook.ipynb[code cell {i}]", "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5  # the untrained head limits how far it falls
    assert (tmp / "qlora_notebook_out" / "loss.png").is_file()
    _loads_in_peft(hf, tmp / "qlora_notebook_out" / "adapter")

"""`examples/finetune.py` and `examples/finetune_notebook.ipynb` run on a tiny checkpoint made here: the loss
falls, and the adapter they write loads in PEFT over the original model."""

import base64
import json
import re
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


def test_notebook_runs_in_a_jupyter_kernel(checkpoint, monkeypatch):
    """The notebook in a real kernel (nbclient + ipykernel), with tiny settings injected after its `parameters`
    cell as papermill does: no cell fails, the training bar is a tqdm.auto widget, the plot cell displays a PNG,
    the loss it prints fell, and the adapter it saves loads in PEFT."""
    import nbformat
    from ipykernel.kernelspec import install
    from nbclient import NotebookClient

    tmp, path, hf = checkpoint
    # A kernel spec of this interpreter, found first: never a "python3" spec of another environment.
    install(kernel_name="qlora-jax-test", prefix=str(tmp / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp / "jupyter" / "share" / "jupyter"))
    notebook = nbformat.read(ROOT / "examples" / "finetune_notebook.ipynb", as_version=4)
    nbformat.validate(notebook)
    tagged = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    out = tmp / "notebook_out"
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(
        f"MODEL = {str(path)!r}\nSTEPS = 20\nSEQ_LEN = 64\nLR = 1e-2\nOUTPUT = {str(out)!r}",
        metadata={"tags": ["injected-parameters"]}))
    # No pip in any code cell: installing is documented in a markdown cell.
    assert not any("pip install" in c.source for c in notebook.cells if c.cell_type == "code")
    NotebookClient(notebook, timeout=300, kernel_name="qlora-jax-test",
                   resources={"metadata": {"path": str(tmp)}}).execute()

    def outputs(cell_source: str) -> list:
        cell = next(c for c in notebook.cells if c.cell_type == "code" and cell_source in c.source)
        return cell.outputs

    for cell in ("tqdm(range(1, STEPS + 1)", "progress=True"):  # the training bar and from_pretrained's loading bar
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs(cell)), cell
    plot = next(c for c in notebook.cells if "plot" in c.metadata.get("tags", []))
    images = [o["data"]["image/png"] for o in plot.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1 and base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"
    printed = "".join(o.get("text", "") for o in outputs("tqdm(range(1, STEPS + 1)") if o.output_type == "stream")
    first, last = map(float, re.search(r"loss: first step ([\d.]+), last step ([\d.]+)", printed).groups())
    assert last < first - 0.5  # the untrained head limits how far it falls
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _loads_in_peft(hf, out / "adapter")

"""The `qlora-jax` command."""

import json
import subprocess
import sys
import time

from qlora_jax.app import cli


def test_demo_formats_only_writes_its_table(tmp_path, capsys, monkeypatch):
    """The command's path (table, round trip, JSON); the full-size table's numbers: `run_formats`' doctest."""
    from qlora_jax.app import demo

    monkeypatch.setattr(demo, "STACK_SHAPES", ((256, 704), (704, 256)))  # the same kinds of kernel, smaller
    assert cli.main(["demo", "--formats-only", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| nf4 | True | 0.5159 |" in out
    assert "dequantizes to identical values" in out
    rows = json.loads((tmp_path / "quantization.json").read_text())
    assert {(r["format"], r["double_quant"]) for r in rows["rows"]} >= {("nf4", True), ("int8", False)}


def _demo_table(out):
    """The rows of the demo's Markdown table by method: [eval loss, accuracy, bytes/param, KiB, MiB, ms]."""
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")}


def test_demo_quick_compares_qlora_with_lora_and_reuses_its_cached_base(tmp_path, capsys):
    start = time.perf_counter()
    assert cli.main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    first_seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "STAND-IN" in out and "pre-trained the base" in out
    rows = _demo_table(out)
    qlora = next(v for k, v in rows.items() if k.startswith("QLoRA"))
    lora = next(v for k, v in rows.items() if k.startswith("LoRA"))
    base = rows["base model, no fine-tuning"]
    assert float(qlora[2]) <= 0.52 and float(lora[2]) == 4.0 and float(base[2]) == 4.0
    assert float(qlora[3]) < 0.14 * float(lora[3])  # packed base bytes vs float32
    assert 0 < float(qlora[4]) < float(lora[4])  # compiled step memory, MiB
    assert float(qlora[5]) > 0 and base[5] == "-"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["base"]["stand_in"] and not result["base"]["reused"]
    assert [len(r["losses"]) for r in result["rows"]] == [0, 20, 20]
    assert list(tmp_path.glob("base_*")) == [tmp_path / result["base"]["cache"].split("/")[-1]]

    start = time.perf_counter()
    assert cli.main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    second_seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "reusing the cached base" in out and "pre-trained the base" not in out
    again = json.loads((tmp_path / "demo.json").read_text())
    assert again["base"]["reused"] and second_seconds < first_seconds
    assert [(r["eval_loss"], r["accuracy"], r["losses"]) for r in again["rows"]] == [
        (r["eval_loss"], r["accuracy"], r["losses"]) for r in result["rows"]]


def test_demo_rejects_settings_it_cannot_run(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--finetune-steps", "0", "--output", str(tmp_path)]) == 2
    assert "finetune_steps" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "qlora_jax.app.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def test_memory_reports_a_7b_step_from_the_compiled_program(capsys):
    from qlora_jax.app.cli import main

    assert main(["memory", "--model", "llama-2-7b", "--methods", "lora", "qlora", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| |")}
    lora_bpp, qlora_bpp = (float(x) for x in rows["byte/param"])
    assert lora_bpp == 2.0 and qlora_bpp <= 0.516
    assert "embeddings, head, norms (GiB, 16-bit)" in rows
    lora_total, qlora_total = (float(x) for x in rows["compiled: step total (GiB)"])
    assert qlora_total < 0.3 * lora_total  # far below 16-bit LoRA
    assert float(rows["compiled: arguments (GiB)"][1]) > 3.0  # the packed 7B base really is an argument


def test_demo_with_model_fine_tunes_that_checkpoint(tmp_path, capsys):
    from test_models import make_checkpoint

    from qlora_jax.app.demo import VOCAB_SIZE, char_tokenizer

    tokenizer = char_tokenizer()  # a Hugging Face fast tokenizer, saved with the checkpoint
    # A Hugging Face checkpoint with the shapes of the quick demo's stand-in base (64 ids, MLP width 128): the steps
    # it compiles in the test above (fine-tuning, evaluation, generation) are reused here.
    path, _ = make_checkpoint(tmp_path, "llama-gqa-untied", vocab_size=VOCAB_SIZE, intermediate_size=128)
    assert len(tokenizer) <= VOCAB_SIZE
    tokenizer.save_pretrained(path)
    out_dir = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--model", str(path), "--output", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert f"QLoRA vs 32-bit LoRA on {path}" in out and "STAND-IN" not in out
    rows = _demo_table(out)
    assert sorted(k.split(":")[0] for k in rows) == ["LoRA", "QLoRA"]  # no stand-in base row
    qlora = next(v for k, v in rows.items() if k.startswith("QLoRA"))
    assert float(qlora[2]) <= 0.52
    result = json.loads((out_dir / "demo.json").read_text())
    assert result["base"]["stand_in"] is False and result["base"]["model"] == str(path)
    assert result["model"]["hidden_size"] == 64 and result["base"]["params"] > 0
    assert not list(out_dir.glob("base_*")) and (out_dir / "loss.png").is_file()
    assert all(len(r["losses"]) == 20 and r["losses"][-1] < r["losses"][0] for r in result["rows"])

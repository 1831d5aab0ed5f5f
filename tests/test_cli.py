"""The `qlora-jax` command."""

import json
import subprocess
import sys

from qlora_jax import cli


def test_demo_runs_and_writes_its_table(tmp_path, capsys):
    assert cli.main(["demo", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| nf4 | True | 0.5159 |" in out
    assert "dequantizes to identical values" in out
    rows = json.loads((tmp_path / "quantization.json").read_text())
    assert {(r["format"], r["double_quant"]) for r in rows["rows"]} >= {("nf4", True), ("int8", False)}


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "qlora_jax.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def test_memory_reports_a_7b_step_from_the_compiled_program(capsys):
    from qlora_jax.cli import main

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

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

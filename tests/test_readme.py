"""README.md's commands stay true: CI runs exactly the README's test command,
and the example runs."""

import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    install_demo, tests = blocks[0].strip(), blocks[1].strip()
    assert install_demo.endswith("qlora-jax demo")
    test_command = tests.split("&&")[-1].strip()
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    assert ci_lines[-1] == test_command
    for step in tests.split("&&")[:-1]:  # the same installs, in the same order
        assert any(step.strip().split("pip install")[-1].strip() in ln for ln in ci_lines), step


def test_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["quantize_and_export.py", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "quantize_and_export.py"), run_name="__main__")
    assert "reloaded bit-exact" in capsys.readouterr().out

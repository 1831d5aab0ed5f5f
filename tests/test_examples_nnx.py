"""`examples/own_flax_model_nnx.py` runs as a script: the adapters learn, and the merged model agrees."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_own_flax_model_example_trains_and_merges():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "own_flax_model_nnx.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    before = float(re.search(r"loss before training: ([\d.]+)", out).group(1))
    after = float(re.search(r"loss after training:\s+([\d.]+)", out).group(1))
    assert after < 0.5 * before, out
    assert re.search(r"^up\s+QLoRALinear\s+\(128, 256\)", out, re.M), out  # the apply_qlora report
    assert "left as is: head (output head (named 'head'))" in out
    assert re.search(r"^up\s+QLoRALinear\s+Linear\s+\(128, 256\)\s+yes\s+float32\s+-$", out, re.M), out  # merge_report
    difference = float(re.search(r"merged model: Linear layers, max \|output difference\| ([\d.e+-]+)", out).group(1))
    assert difference < 1e-4, out

"""`examples/own_flax_model_linen.py` runs as a script: the adapters learn, the base weights shrink."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_own_flax_model_linen_example_trains_the_adapters():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "own_flax_model_linen.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    before = float(re.search(r"loss before training: ([\d.]+)", out).group(1))
    after = float(re.search(r"loss after training:\s+([\d.]+)", out).group(1))
    assert after < 0.5 * before, out
    assert re.search(r"^up\s+QLoRADense\s+\(128, 256\)", out, re.M), out  # the convert_params report
    assert "left as is: head (output head (named 'head'))" in out
    bytes_before, bytes_after = (int(b.replace(",", "")) for b in re.search(
        r"base weights of the converted layers: ([\d,]+) bytes before, ([\d,]+) bytes after", out).groups())
    assert bytes_after < 0.13 * bytes_before, out  # NF4 + double quant: ~0.516 of 4 bytes per param
    params, floats = (int(n.replace(",", "")) for n in re.search(
        r"adapter parameters: ([\d,]+); adamw state floats: ([\d,]+)", out).groups())
    assert floats == 2 * params, out  # two moments per adapter parameter, nothing for the rest

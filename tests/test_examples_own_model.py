"""`examples/own_flax_model_{nnx,linen}.py` run as scripts: the adapters learn, the base weights shrink, the output
head stays as it was; the NNX model merges back into Linear layers that agree."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> str:
    """The script's stdout, once it exited 0 and halved its loss, with the output head left as is."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    before = float(re.search(r"loss before training: ([\d.]+)", out).group(1))
    after = float(re.search(r"loss after training:\s+([\d.]+)", out).group(1))
    assert after < 0.5 * before, out
    assert "left as is: head (output head (named 'head'))" in out
    return out


def _numbers(pattern: str, out: str) -> tuple[int, ...]:
    return tuple(int(n.replace(",", "")) for n in re.search(pattern, out).groups())


def test_own_flax_model_example_trains_and_merges():
    out = _run("own_flax_model_nnx.py")
    assert re.search(r"^up\s+QLoRALinear\s+\(128, 256\)", out, re.M), out  # qlora_report
    assert re.search(r"^up\s+QLoRALinear\s+Linear\s+\(128, 256\)\s+yes\s+float32\s+-$", out, re.M), out  # merge_report
    difference = float(re.search(r"merged model: Linear layers, max \|output difference\| ([\d.e+-]+)", out).group(1))
    assert difference < 1e-4, out


def test_own_flax_model_linen_example_trains_the_adapters():
    out = _run("own_flax_model_linen.py")
    assert re.search(r"^up\s+QLoRADense\s+\(128, 256\)", out, re.M), out  # the convert_params report
    bytes_before, bytes_after = _numbers(r"base weights of the converted layers: ([\d,]+) bytes before, ([\d,]+) "
                                         r"bytes after", out)
    assert bytes_after < 0.13 * bytes_before, out  # NF4 + double quant: ~0.516 of 4 bytes per param
    params, floats = _numbers(r"adapter parameters: ([\d,]+); adamw state floats: ([\d,]+)", out)
    assert floats == 2 * params, out  # two moments per adapter parameter, nothing for the rest

"""The benchmark scripts run (on tiny shapes) and write what they claim to."""

import json
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]


def test_qmatmul_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "qmatmul.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "qmatmul.py"), "--m", "1", "3", "--k", "256", "--n", "128",
         "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "| M | path | ms | ratio to dense |" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["m"] for row in rows] == [1, 3]
    for row in rows:
        assert row["paths"]["xla"]["ratio"] > 0 and row["dense_ms"] > 0
        if jax.default_backend() == "cpu":
            assert "default backend is cpu" in row["paths"]["pallas_gpu"]["skipped"]

"""The benchmark scripts run (on tiny shapes) and write what they claim to."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_qmatmul_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "qmatmul.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "qmatmul.py"), "--m", "1", "3", "--k", "256", "--n", "128",
         "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "| M | path | ms | ratio to dense |" in result.stdout
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [row["m"] for row in rows] == [1, 3]
    if jax.default_backend() == "cpu":  # a CPU-only machine: the script configures the CPU runtime first
        assert data["settings"]["runtime"]["synchronous"] is True
        assert "`qlora_jax.app.configure_cpu()` (synchronous dispatch True" in result.stdout
    for row in rows:
        assert row["paths"]["xla"]["ratio"] > 0 and row["dense_ms"] > 0
        if jax.default_backend() == "cpu":
            assert "default backend is cpu" in row["paths"]["pallas_gpu"]["skipped"]


@pytest.mark.slow  # ~40 s; what it measures (compiled step memory) is asserted by the memory tests
def test_memory_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "memory.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--quick", "--methods", "qlora-dq",
         "--rss-methods", "qlora-dq", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "| config | method | N (linear params) | M (trained params) | base linear weights |" in result.stdout
    assert "| config | method | arguments | temporaries | outputs | aliased | step total |" in result.stdout
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["method"] == "qlora-dq" and row["config"] == "small"
    assert row["linear_bytes"] / row["linear_params"] <= 0.5159
    assert abs(row["parts_bytes"] / row["formula_bytes"] - 1) < 1e-3  # the measured parts are the formula's
    assert row["argument_bytes"] > row["linear_bytes"] and row["compiled_total"] > row["argument_bytes"]
    real = row["real_optimizer"]  # optax state of zero-filled adapters: two float32 moments per parameter
    assert real["adapter_params"] == row["trainable_params"] > 0 and real["moment_bytes"] == 8 * real["adapter_params"]
    (rss,) = data["rss"]
    assert rss["method"] == "qlora-dq" and rss["optimizer"]["moment_bytes"] == 8 * rss["trained_params"] > 0
    assert rss["peak_rss_lifetime"] >= rss["rss_after_imports"] > 0 and len(rss["losses"]) == 1
    assert [c["ok"] for c in data["acceptance"]] == [True, True, True]


@pytest.mark.slow  # ~30 s; the methods it compares are tested against PEFT and NumPy in their own tests
def test_quality_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "quality.json"
    demo = tmp_path / "demo.json"
    demo.write_text(json.dumps({"rows": [{"method": "QLoRA: NF4", "accuracy": 0.5, "eval_loss": 0.25},
                                         {"method": "LoRA: float32", "accuracy": 0.25}]}))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--shape", "256", "96", "--block-sizes", "32",
         "256", "--no-real", "--demo-json", str(demo), "--json", str(out),
         # --methods smoke test: one method, QUICK sizes, a random base (no pre-training), 2 steps
         "--methods", "loftq_2", "--method-steps", "2", "--methods-quick", "--methods-pretrain-steps", "0",
         "--methods-dir", str(tmp_path / "bases")],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "| format | block | double quant | bytes/param | relative MSE (f64) | SQNR dB |" in result.stdout
    assert "| QLoRA: NF4 | 50.0% | 0.2500 |" in result.stdout
    data = json.loads(out.read_text())
    rows = {(r["format"], r["block_size"], r["double_quant"]): r for r in data["gaussian"]["rows"]}
    assert len(rows) == 14 and data["real"] == {"skipped": "--no-real"}
    assert data["demo"]["qlora_minus_lora_accuracy"] == 0.25
    for r in rows.values():  # qlora_jax's rounding is as good as the independent float64 reference
        assert abs(r["relative_mse_vs_reference"] - 1) < 1e-3
        assert abs(r["relative_mse_float32"] / r["relative_mse"] - 1) < 1e-3
    assert rows[("nf4", 32, False)]["relative_mse"] < rows[("nf4", 256, False)]["relative_mse"]
    assert rows[("nf4", 256, False)]["relative_mse"] < rows[("fp4", 256, False)]["relative_mse"] < 0.03
    assert rows[("int8", 32, False)]["relative_mse"] < 1e-4
    assert rows[("nf4", 256, True)]["bytes_per_param"] < rows[("nf4", 256, False)]["bytes_per_param"]
    assert "| method | what | eval loss at init | eval loss after training |" in result.stdout
    (m,) = data["methods"]["rows"]
    assert (m["method"], m["init"], m["loftq_iter"], m["use_dora"]) == ("loftq_2", "loftq", 2, False)
    assert m["base"] == "nf4+dq"
    # QUICK: 2 layers, hidden 64, intermediate 128, 4 heads / 2 KV heads of 16; rank 8 x (in + out) per projection
    per_layer = (64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64)  # q, k+v, o, gate+up, down
    assert m["trained_params"] == 2 * 8 * per_layer
    assert len(m["losses"]) == 2 and all(math.isfinite(x) for x in [*m["losses"], m["eval_loss"]])
    assert data["methods"]["settings"]["pretrain_steps"] == 0 and data["init_error"] == {"skipped": "--no-real"}



def test_train_step_benchmark_runs(tmp_path):
    out = tmp_path / "train_step.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    header = "| case | step ms | / qlora_jax LoRA | qlora_jax QLoRA / this | model GFLOP/s | utilisation |"
    assert header in result.stdout
    data = json.loads(out.read_text())
    assert {"machine", "settings", "matmul_gflops", "model_flops", "rows", "targets"} <= set(data)
    assert data["settings"]["quick"] and data["settings"]["threads"] >= 1 and data["matmul_gflops"] > 0
    assert set(data["targets"]) == {"qlora_vs_lora", "qlora_vs_peft_bnb", "qlora_utilisation"}
    rows = {r["case"]: r for r in data["rows"]}
    ours, lora = rows["qlora_jax QLoRA (NF4)"], rows["qlora_jax LoRA (f32)"]
    for row in (ours, lora):
        assert row["ms"] > 0 and row["utilisation"] > 0 and row["issued_dot_flops"] > 0
    assert data["targets"]["qlora_vs_lora"]["value"] == ours["ms"] / lora["ms"]
    # Each frozen-weight product of the step timed alone: counts and FLOPs add up to the formula's frozen part.
    assert "| layers | product | tokens x in -> out | per step | XLA ms | PyTorch ms |" in result.stdout
    products = data["frozen_products"]
    assert sum(p["count"] * p["flops"] for p in products) == data["model_flops"]["frozen_linear"]
    assert all(p["xla_ms"] > 0 for p in products)
    bound = data["product_bound"]
    assert bound["xla_ms"] == sum(p["count"] * p["xla_ms"] for p in products)
    for row in (ours, lora):
        assert row["page_faults"] >= 0
    # The same checkpoint and batch in PyTorch: the first loss (adapters still zero) agrees.
    for torch_case, ours_case in (("PEFT + bnb QLoRA (NF4)", ours), ("PEFT LoRA (f32)", lora)):
        if "skipped" in rows[torch_case]:  # e.g. bitsandbytes without CPU support: reported, not timed
            continue
        assert rows[torch_case]["ms"] > 0
        assert abs(rows[torch_case]["loss0"] - ours_case["loss0"]) < 1e-3


@pytest.mark.slow  # four processes (~60 s); the loaders, step flavours and bitsandbytes import have their own tests
def test_big_model_benchmark_runs_on_a_small_shape(tmp_path):
    """`big_model.py` end to end on the `tiny` shape: a sharded bf16 checkpoint and a bitsandbytes-4bit one are
    written, loaded in fresh processes, trained (each step flavour once) and their adapters saved; the bf16
    checkpoint is reused by a second run and removed with --remove."""
    script = str(ROOT / "benchmarks" / "big_model.py")
    runs = [("bf16", "nnx-jit"), ("bf16", "trainer"), ("bnb4", "trainer")]
    stamp = None
    for checkpoint, step in runs:
        directory, out = tmp_path / checkpoint, tmp_path / f"{checkpoint}-{step}.json"
        command = [sys.executable, script, "--shape", "tiny", "--checkpoint", checkpoint, "--step", step,
                   "--steps", "2", "--seq-len", "16", "--dir", str(directory), "--json", str(out)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "| model | checkpoint | step | load (s) |" in result.stdout
        (row,) = json.loads(out.read_text())["rows"]
        assert row["step"] == step and row["checkpoint"] == checkpoint
        assert len(row["losses"]) == 2 and row["losses"][1] < row["losses"][0]  # the adapters learn
        assert row["adapter_bytes"] > 0 and row["read_bytes"] > 0 and row["steps_peak_bytes"] > 0
        assert row["base_bytes"] / row["linear_params"] < 0.52  # NF4 + double quant, packed
        config = json.loads((directory / "config.json").read_text())
        assert (config.get("quantization_config", {}).get("load_in_4bit") is True) == (checkpoint == "bnb4")
        index = directory / "model.safetensors.index.json"
        if checkpoint == "bf16":
            if stamp is not None:
                assert index.stat().st_mtime_ns == stamp  # reused, not written again
            stamp = index.stat().st_mtime_ns
    result = subprocess.run([sys.executable, script, "--shape", "tiny", "--dir", str(tmp_path / "bf16"), "--remove"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and not (tmp_path / "bf16").exists()


def test_big_model_refuses_a_checkpoint_the_disk_cannot_hold(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import big_model
    finally:
        sys.path.pop(0)
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(SystemExit, match=r"the llama-2-13b bf16 checkpoint needs 26\.0 GB in .*, and only 1\.0 GB "
                                         r"are free there"):
        big_model.ensure_checkpoint(tmp_path / "ckpt", "llama-2-13b", "bf16")
    assert not list((tmp_path / "ckpt").glob("*.safetensors*"))

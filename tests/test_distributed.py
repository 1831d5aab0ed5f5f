"""Two processes on localhost run a sharded QLoRA train step together with `jax.distributed` (CPU collectives
over gloo) and agree with one process on one device."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_sharding import TRAIN

import qlora_jax as qj

SCRIPT = Path(__file__).parent / "scripts" / "distributed_step.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """os.environ for the worker processes, with XLA_FLAGS minus any host device count (each worker sets its own
    devices; the flags conftest.py adds stay)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return {**os.environ, "XLA_FLAGS": " ".join(flags), **extra}


def _run_together(commands, env):
    """Starts the commands (one per process) at once and waits for all; each must exit with 0."""
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(log[-3000:] for log in logs)


def test_two_processes_train_together_and_match_one_device(tmp_path, single_device):
    out, port = tmp_path / "result.npz", _free_port()
    env = _env()
    _run_together([[sys.executable, str(SCRIPT), str(i), "2", str(port), str(out)] for i in range(2)], env)
    got = np.load(out)

    # One device: test_sharding's _loss_and_grads(_model(), _batch()) and one Trainer(_model(), TRAIN) step
    # (tests/conftest.py computes them once for this file and tests/test_sharding.py).
    loss, grads, step_loss, grad_norm, adapters = single_device
    assert abs(float(got["loss"]) - loss) <= 1e-5 * abs(loss)
    assert abs(float(got["step_loss"]) - step_loss) <= 1e-5 * abs(step_loss)
    assert abs(float(got["grad_norm"]) - grad_norm) <= 1e-5 * grad_norm
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        d = got["grad" + jax.tree_util.keystr(path)]
        assert np.max(np.abs(d - g)) <= 1e-5 * np.max(np.abs(g)), path
        keep = np.abs(g) > 1e-4 * np.abs(g).max()  # see test_sharding: Adam's first step amplifies g ~ 0
        a = np.asarray(dict(jax.tree_util.tree_leaves_with_path(adapters))[path])
        np.testing.assert_allclose(got["adapter" + jax.tree_util.keystr(path)][keep], a[keep], rtol=0,
                                   atol=1e-4 * TRAIN.lr)


@pytest.mark.slow  # ~45 s; the library's two-process step (above) runs by default
def test_finetune_command_on_two_processes(tmp_path):
    """`qlora-jax finetune --mesh ... --coordinator ... --num-processes 2 --process-id i` on two local processes
    (2 CPU devices each) trains like one process on one device; process 0 writes the adapter."""
    from test_cli_finetune import ROWS
    from test_data import finetune_files

    from qlora_jax.app.cli import main

    path, _, data = finetune_files(tmp_path, ROWS)
    args = ["finetune", "--model", str(path), "--data", str(data), "--steps", "4", "--batch-size", "4",
            "--seq-len", "32", "--rank", "4", "--lr", "1e-2", "--dropout", "0", "--block-size", "32"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0

    port = _free_port()
    env = _env(JAX_NUM_CPU_DEVICES="2")
    command = [sys.executable, "-m", "qlora_jax.app.cli", *args, "--output", str(tmp_path / "two"),
               "--mesh", "data=2,fsdp=2", "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    _run_together([[*command, "--process-id", str(i)] for i in range(2)], env)

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
    assert qj.checkpoint.latest_step(tmp_path / "two" / "checkpoints") == 4

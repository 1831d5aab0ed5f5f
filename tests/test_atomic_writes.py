"""Writers that fail halfway leave the previous output intact and nothing behind (issue 22).

Each writer (`save_peft_adapter`, `save_merged`, `qj.checkpoint.save`) writes once, then a second time with other
values in a subprocess whose writes really fail: `RLIMIT_FSIZE` below the size of one of the files written (with
`SIGXFSZ` ignored, so the write raises `OSError: File too large` instead of killing the process). The first
output must be byte-identical afterwards, no temporary directory may remain next to it, and the error must name
the file. Nothing is mocked. A checkpoint save killed by the signal (which cannot clean up) is ignored by
`latest_step` / `restore` and cleaned up by the next save; an export refuses a directory holding other files.
"""

import hashlib
import stat
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

import qlora_jax as qj
from qlora_jax import models

# The second write, run in a subprocess: `python -c SCRIPT writer target seed limit [kill]`.
SCRIPT = r"""
import resource, signal, sys
sys.path.insert(0, {tests!r})
from test_atomic_writes import build, write
writer, target, seed, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = build(seed)
# SIGXFSZ ignored (CPython's own default): a write past the limit raises OSError (EFBIG); "kill": the signal's
# default action kills the process in the middle of the write
signal.signal(signal.SIGXFSZ, signal.SIG_DFL if sys.argv[5:] == ["kill"] else signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
write(writer, model, target, step=2)
"""

# Per writer: the file size limit of the failing write (below one of its files, above the ones before it) and the
# file it names. save_merged writes config.json, a first shard (embedding and norms) under the limit, then a
# larger shard over it; the PEFT adapter's safetensors file and the checkpoint's array data exceed theirs.
LIMITS = {"peft": (3_000, "adapter_model.safetensors"), "merged": (24_000, "shard-00001.safetensors")}
CHECKPOINT_LIMIT = 3_000


def build(seed: int) -> models.CausalLM:
    """A tiny quantized CausalLM with LoRA on every projection, its values set by `seed`."""
    cfg = models.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                             num_kv_heads=1, tie_word_embeddings=True)
    model = models.CausalLM(cfg, rngs=nnx.Rngs(seed))
    model = qj.apply_qlora(model, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=4, alpha=8),
                           rngs=nnx.Rngs(seed))
    for _, layer in models.adapter_layers(model).items():  # B != 0: the merged weights depend on the adapter
        layer.lora_b[...] = jnp.full(layer.lora_b[...].shape, 0.01 * (seed + 1), layer.lora_b[...].dtype)
    return model


def write(writer: str, model: models.CausalLM, target: str | Path, step: int = 1) -> None:
    if writer == "peft":
        models.save_peft_adapter(model, target)
    elif writer == "merged":
        models.save_merged(model, target, max_shard_bytes=20_000)
    else:
        qj.checkpoint.save(target, model, step=step)


def _snapshot(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `directory`."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _second_write(writer: str, target: Path, limit: int, *extra: str) -> subprocess.CompletedProcess:
    script = SCRIPT.format(tests=str(Path(__file__).parent))
    return subprocess.run([sys.executable, "-c", script, writer, str(target), "1", str(limit), *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("writer", ["peft", "merged"])
def test_a_failed_export_leaves_the_previous_one_intact(tmp_path, writer):
    target = tmp_path / "out"
    write(writer, build(0), target)
    before = _snapshot(target)
    limit, file = LIMITS[writer]
    assert any(s > limit for s in (p.stat().st_size for p in target.iterdir())), "the limit must stop a write"

    result = _second_write(writer, target, limit)

    assert result.returncode != 0, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "File too large" in last and file in last, result.stderr[-2000:]
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind


def test_a_failed_checkpoint_save_leaves_the_previous_step_and_nothing_else(tmp_path):
    target = tmp_path / "ckpt"
    write("checkpoint", build(0), target)
    before = _snapshot(target)
    assert sorted(p.name for p in target.iterdir()) == ["1"]

    result = _second_write("checkpoint", target, CHECKPOINT_LIMIT)

    assert result.returncode != 0, result.stderr[-2000:]
    assert any(line.startswith("ValueError:") and "File too large" in line and "2.orbax-checkpoint-tmp" in line
               for line in result.stderr.splitlines()), result.stderr[-2000:]  # Orbax's error names the file
    assert sorted(p.name for p in target.iterdir()) == ["1"]  # no temporary directory of step 2
    assert _snapshot(target) == before
    assert qj.checkpoint.latest_step(target) == 1


def test_a_killed_checkpoint_save_is_ignored_and_cleaned_up_by_the_next_save(tmp_path):
    """A process killed during a save (SIGXFSZ's default action) cannot clean up: its temporary directory is not
    a checkpoint for `latest_step` / `restore`, and the next save removes it."""
    target = tmp_path / "ckpt"
    write("checkpoint", build(0), target)

    result = _second_write("checkpoint", target, CHECKPOINT_LIMIT, "kill")

    assert result.returncode < 0, result.stderr[-2000:]  # killed by the signal
    left = sorted(p.name for p in target.iterdir())
    assert len(left) == 2 and left[0] == "1" and "tmp" in left[1], left
    assert qj.checkpoint.latest_step(target) == 1
    model = build(5)
    assert qj.checkpoint.restore(target, model).step == 1
    qj.checkpoint.save(target, model, step=3)  # a later step: Orbax alone would leave step 2's temporary directory
    assert sorted(p.name for p in target.iterdir()) == ["1", "3"]
    assert qj.checkpoint.latest_step(target) == 3


@pytest.mark.parametrize("writer", ["peft", "merged"])
def test_an_export_replaces_its_previous_output_and_refuses_other_files(tmp_path, writer):
    target = tmp_path / "out"
    write(writer, build(0), target)
    first = _snapshot(target)
    (tmp_path / "plain").mkdir()  # the output directory has the permissions of a plain mkdir (umask), ...
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    (tmp_path / "plain").rmdir()
    target.chmod(0o750)
    write(writer, build(1), target)
    second = _snapshot(target)
    assert second.keys() == first.keys() and second != first
    assert stat.S_IMODE(target.stat().st_mode) == 0o750  # ... and a replaced one keeps its own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    (target / "notes.txt").write_text("mine")  # a file the writer does not write: refused, nothing deleted
    with pytest.raises(ValueError, match=rf"{target}: holds \['notes.txt'\], which this writer does not write"):
        write(writer, build(2), target)
    assert _snapshot(target) == {**second, "notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

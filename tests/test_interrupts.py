"""Real interrupts of `qlora-jax finetune`, each followed by `--resume`: the adapter and the optimizer state end
bit-identical to a run that was never interrupted.

Every run is a separate process running the command line unmodified
(`tests/scripts/finetune_observed.py`, which only adds two observers: a
stack dump on SIGUSR1 and a shared compilation cache). The tests interrupt it
at these moments and show that the moment was hit:

- SIGKILL while the first checkpoint is written, and while a later one is: the
  test polls the checkpoint directory until Orbax's temporary directory of that
  step exists, stops the process (SIGSTOP), checks that the temporary directory
  is still there and the step's final directory is not (the process cannot move
  while stopped), and kills it. With no complete checkpoint, `--resume` starts
  over with a warning.
- SIGKILL while a step computes, and SIGINT while the jitted step runs (sent
  from the test's timer, not from inside the run): a step takes ~0.4 s here; a
  SIGUSR1 sent with the signal makes `faulthandler` write the main thread's
  stack at that instant, and it shows the main thread inside
  `Trainer.train_step` (inside the compiled call); the step's metrics line was
  not yet written.
- A latest checkpoint damaged after it was written (a file inside truncated):
  `--resume` warns naming the file and uses the previous checkpoint.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_data import finetune_files

import qlora_jax as qj
from qlora_jax._src.checkpoint import MANIFEST

SCRIPT = Path(__file__).parent / "scripts" / "finetune_observed.py"
ROWS = [{"prompt": "what is two plus two", "completion": "two plus two is four"},
        {"text": "the cat sat on the mat"},
        {"prompt": "hello there", "completion": "i am fine thanks"}] * 4
STEPS = 6  # checkpoints at steps 2 and 4 (--save-every 2), and 6 at the end
TIMEOUT = 240


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The checkpoint, the data, a compilation cache shared by the runs, and the straight run's output."""
    tmp = tmp_path_factory.mktemp("interrupts")
    model, _, data = finetune_files(tmp, ROWS)
    env = {**os.environ, "QLORA_TEST_JAX_CACHE": str(tmp / "jax_cache")}
    files = {"tmp": tmp, "model": model, "data": data, "env": env}
    straight = Run(files, tmp / "straight")
    assert straight.wait() == 0, straight.stderr()
    files["straight"] = straight.out
    return files


class Run:
    """One `finetune` process; its stderr goes to a file the test reads."""

    def __init__(self, files, out, *extra):
        self.out = Path(out)
        self.log = self.out.with_name(self.out.name + f".{int(time.monotonic() * 1e6)}.stderr")
        argv = ["finetune", "--model", str(files["model"]), "--data", str(files["data"]), "--output", str(out),
                "--steps", str(STEPS), "--batch-size", "24", "--grad-accum", "2", "--seq-len", "256", "--rank", "4",
                "--alpha", "8", "--lr", "1e-2", "--save-every", "2", "--no-fit", "--targets", "q_proj", "v_proj",
                "down_proj", *extra]
        with open(self.log, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, str(SCRIPT), *argv], stdout=subprocess.DEVNULL,
                                            stderr=stderr, env=files["env"])
        self.deadline = time.monotonic() + TIMEOUT

    def stderr(self) -> str:
        return self.log.read_text()

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=max(1, self.deadline - time.monotonic()))
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait_for(self, predicate, what: str, poll: float = 0.002):
        """Polls `predicate` until it returns something true; fails if the run ends or time runs out first."""
        while not (found := predicate()):
            if self.process.poll() is not None:
                pytest.fail(f"the run ended ({self.process.returncode}) before {what}:\n{self.stderr()[-3000:]}")
            if time.monotonic() > self.deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(poll)
        return found

    def steps_logged(self) -> int:
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return sum(1 for line in lines if line.endswith("}") and '"loss"' in line)

    def stop(self) -> None:
        """SIGSTOP, and wait until the kernel reports the process stopped."""
        os.kill(self.process.pid, signal.SIGSTOP)
        stat = Path(f"/proc/{self.process.pid}/stat")
        self.wait_for(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T", "the process to stop", 0.0005)

    def stop_in_save(self, step: int) -> bool:
        """Waits for `step`'s temporary checkpoint directory and stops the process; True when the save was still
        under way once stopped (its temporary directory there, its final directory not)."""
        self.wait_for(lambda: self.temporaries(step), f"step {step}'s temporary checkpoint directory")
        self.stop()
        return bool(self.temporaries(step)) and not (self.out / "checkpoints" / str(step)).exists()

    def temporaries(self, step: int) -> list[Path]:
        checkpoints = self.out / "checkpoints"
        return [p for p in (checkpoints.iterdir() if checkpoints.is_dir() else ())
                if p.name.startswith(f"{step}.orbax-checkpoint-tmp")]

    def main_thread_stack(self, then: int | None = None) -> str:
        """Sends SIGUSR1 (and right after it `then`, if given) and returns the main thread's stack that
        faulthandler writes at the moment SIGUSR1 arrives."""
        before = self.stderr().count("(most recent call first)")
        os.kill(self.process.pid, signal.SIGUSR1)
        if then is not None:
            os.kill(self.process.pid, then)
        dump = self.wait_for(lambda: _main_thread(self.stderr(), before), "faulthandler's stack dump", 0.0005)
        return dump


def _main_thread(stderr: str, before: int) -> str | None:
    """The stack of the main thread (the one that runs finetune_observed.py's module code) in the first complete
    faulthandler dump after the first `before` thread headers, or None while it is not written yet."""
    sections = re.split(r"\n(?=(?:Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):)", stderr)
    sections = [s for s in sections if "(most recent call first)" in s.splitlines()[0]][before:]
    for section in sections:
        if f'File "{SCRIPT}"' in section and "in <module>" in section:
            return section
    return None


def _in_the_train_step(stack: str) -> bool:
    """Whether the main thread is inside `Trainer.train_step` called from the finetune loop."""
    return bool(re.search(r'qlora_jax/_src/train/trainer\.py", line \d+ in train_step', stack)) and bool(
        re.search(r'qlora_jax/app/finetune\.py", line \d+ in run_finetune', stack))


def _arrays(step_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint step (adapters, RNG state, optimizer state), read with Orbax alone."""
    out = {}
    for part in ("adapters", "rng", "optimizer"):
        tree = ocp.PyTreeCheckpointer().restore(step_dir / part)
        for path, leaf in _flatten(tree, part):
            out[path] = np.asarray(leaf)
    return out


def _flatten(tree, prefix):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}/{key}")
    else:
        yield prefix, tree


def assert_same_as_straight(out: Path, straight: Path) -> None:
    """The resumed run's adapter file, and its final checkpoint's adapters, RNG and optimizer state (Adam moments,
    counts), bit-identical to the straight run's; every step trained once (metrics.jsonl)."""
    assert ((out / "adapter" / "adapter_model.safetensors").read_bytes()
            == (straight / "adapter" / "adapter_model.safetensors").read_bytes())
    resumed, reference = _arrays(out / "checkpoints" / str(STEPS)), _arrays(straight / "checkpoints" / str(STEPS))
    assert sorted(resumed) == sorted(reference)
    assert any("/mu/" in k for k in reference) and any("rng" in k for k in reference)
    for key, value in reference.items():
        assert resumed[key].dtype == value.dtype, key
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert not [p for p in (out / "checkpoints").iterdir() if not p.name.isdigit()]  # no temporary left


def resume(files, out, *expected_warnings: str) -> str:
    run = Run(files, out, "--resume")
    assert run.wait() == 0, run.stderr()
    warnings = [line for line in run.stderr().splitlines() if line.startswith("qlora-jax finetune: warning:")]
    assert len(warnings) == len(expected_warnings), warnings
    for warning, expected in zip(warnings, expected_warnings, strict=True):
        assert re.search(expected, warning), (expected, warning)
    return run.stderr()


def stopped_in_save(files, out: Path, step: int) -> Run:
    """A run stopped (SIGSTOP) while it writes `step`'s checkpoint. Orbax's temporary directory lives ~150 ms here
    and is polled every 2 ms; a run that finished the save before it stopped is replaced by a new one (3 tries)."""
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        run = Run(files, out)
        if run.stop_in_save(step):
            return run
        run.kill()
    pytest.fail("three runs finished the save before they could be stopped")


def test_sigkill_while_the_first_checkpoint_is_written_then_sigint_while_a_step_runs(files):
    """Killed while checkpoint 2 (the first) is written: no complete checkpoint, so `--resume` starts over with a
    warning. That run gets Ctrl-C while step 3 computes: the step finishes, is saved, the run exits with 130;
    `--resume` goes on from step 3 to the straight run's result."""
    out = files["tmp"] / "killed_in_first_save"
    run = stopped_in_save(files, out, 2)
    run.kill()
    assert run.process.returncode == -signal.SIGKILL
    assert run.temporaries(2)  # what the killed write left
    assert qj.checkpoint.latest_step(out / "checkpoints") is None

    run = Run(files, out, "--resume")
    run.wait_for(lambda: (out / "checkpoints" / "2" / MANIFEST).is_file(), "checkpoint 2")
    time.sleep(0.1)  # into step 3 (steps take ~0.4 s)
    logged = run.steps_logged()
    stack = run.main_thread_stack(then=signal.SIGINT)  # the stack at the moment the two signals arrive
    assert run.wait() == 130, run.stderr()
    assert re.search(r"^qlora-jax finetune: warning: .*no complete checkpoint: starting over from step 0",
                     run.stderr(), re.MULTILINE), run.stderr()
    assert _in_the_train_step(stack), stack
    assert logged == 2
    assert f"interrupted: saved step 3 of {STEPS}" in run.stderr()
    assert qj.checkpoint.latest_step(out / "checkpoints") == 3
    resume(files, out)
    assert_same_as_straight(out, files["straight"])


def test_sigkill_while_a_later_checkpoint_is_written_then_while_a_step_computes(files):
    """Killed while checkpoint 4 is written: `--resume` continues from 2. That run is killed while step 5 computes
    (checkpoints 2 and 4 complete): `--resume` continues from 4. A copy of that killed run whose checkpoint 4 was
    damaged afterwards (one file truncated) resumes from 2, with a warning naming the file."""
    out = files["tmp"] / "killed_in_later_save"
    run = stopped_in_save(files, out, 4)
    run.kill()
    assert run.process.returncode == -signal.SIGKILL
    assert run.temporaries(4)
    assert qj.checkpoint.latest_step(out / "checkpoints") == 2

    run = Run(files, out, "--resume")
    run.wait_for(lambda: (out / "checkpoints" / "4" / MANIFEST).is_file(), "checkpoint 4")
    time.sleep(0.1)  # into step 5 (steps take ~0.4 s)
    logged = run.steps_logged()
    stack = run.main_thread_stack()
    run.process.kill()
    run.process.wait()
    assert _in_the_train_step(stack), stack
    assert logged == 4 and run.steps_logged() == 4  # step 5 had not finished
    assert qj.checkpoint.latest_step(out / "checkpoints") == 4

    damaged_run = files["tmp"] / "damaged"
    shutil.copytree(out, damaged_run)
    resume(files, out)
    assert_same_as_straight(out, files["straight"])

    file = max((p for p in (damaged_run / "checkpoints" / "4" / "optimizer").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    file.write_bytes(file.read_bytes()[:-10])
    resume(files, damaged_run, rf"skipped damaged checkpoint step 4: {re.escape(str(file))}: .* restored step 2")
    assert_same_as_straight(damaged_run, files["straight"])


@pytest.mark.parametrize("times", [1, 2])
def test_ctrl_c_while_a_checkpoint_is_written(files, times):
    """Ctrl-C during a save: the save completes and the run stops there (exit 130). A second Ctrl-C during the same
    save stops the run at once: the half-written step is not a checkpoint, the previous one is the latest."""
    out = files["tmp"] / f"ctrl_c_in_save_{times}"
    for _ in range(3):
        run = stopped_in_save(files, out, 4)
        os.kill(run.process.pid, signal.SIGINT)
        os.kill(run.process.pid, signal.SIGCONT)
        if times == 1:
            break
        run.wait_for(lambda run=run: "Ctrl-C: stopping after this step" in run.stderr(), "the first Ctrl-C's notice")
        run.stop()
        if run.temporaries(4) and not (out / "checkpoints" / "4").exists():  # still writing: the second Ctrl-C
            os.kill(run.process.pid, signal.SIGINT)
            os.kill(run.process.pid, signal.SIGCONT)
            break
        run.kill()
    else:
        pytest.fail("three runs finished the save between the two Ctrl-C")
    assert run.wait() == 130, run.stderr()
    latest = 4 if times == 1 else 2
    assert qj.checkpoint.latest_step(out / "checkpoints") == latest
    if times == 1:
        assert not run.temporaries(4)
    # After the second Ctrl-C the half-written step is never read as a checkpoint; `save` removes its temporary
    # directory as it unwinds, but an Orbax writer thread still running may leave it (seen once in CI): the next
    # save removes it (Orbax's cleanup_tmp_directories).
    if times == 1:
        assert f"interrupted: saved step 4 of {STEPS}" in run.stderr()
    # (--resume from a complete checkpoint after an interrupt: the tests above)

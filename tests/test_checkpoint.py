"""Orbax checkpoints: adapters and optimizer state round-trip exactly; an
interrupted save leaves the previous checkpoint intact; the metadata (step,
extra, data state, config) reads without a model, and a different config is
refused before anything is restored; a damaged latest checkpoint is skipped for the previous one."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qlora_jax as qj


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(128, 256, rngs=rngs)
        self.down = nnx.Linear(256, 128, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


@nnx.jit
def _step(model, optimizer, x):
    """One AdamW step on the adapters (dropout draws from the model's RNG state), compiled once for every `_run`."""
    grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)


_forward = nnx.jit(lambda model, x: model(x))
_ADAMW = optax.adamw(1e-2)  # one transformation object: it is part of `_step`'s cache key


def _run(seed=0, steps=2):
    model = qj.apply_qlora(MLP(nnx.Rngs(seed)), quant=qj.QuantConfig(),
                           lora=qj.LoraConfig(rank=4, alpha=8, dropout=0.1), rngs=nnx.Rngs(seed + 1))
    optimizer = nnx.Optimizer(model, _ADAMW, wrt=nnx.LoRAParam)
    x = jax.random.normal(jax.random.key(7), (8, 128))
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(steps):
            _step(model, optimizer, x)
    return model, optimizer


def _leaves(tree):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("include_base", [False, True])
def test_adapters_and_optimizer_round_trip(tmp_path, include_base):
    model, optimizer = _run()
    qj.checkpoint.save(tmp_path, model, optimizer, step=2, extra={"data_position": 17}, include_base=include_base)
    fresh, fresh_opt = _run(seed=5, steps=1)  # same structure, different values
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(nnx.state(fresh, nnx.LoRAParam)),
                                                          _leaves(nnx.state(model, nnx.LoRAParam)), strict=True))
    meta = qj.checkpoint.restore(tmp_path, fresh, fresh_opt)
    assert (meta.step, meta.extra, meta.include_base, meta.has_optimizer) == (2, {"data_position": 17},
                                                                             include_base, True)
    assert meta == qj.checkpoint.metadata(tmp_path)
    for kind in (nnx.LoRAParam, nnx.RngState):
        for a, b in zip(_leaves(nnx.state(fresh, kind)), _leaves(nnx.state(model, kind)), strict=True):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(nnx.state(fresh_opt)), _leaves(nnx.state(optimizer)), strict=True):
        np.testing.assert_array_equal(a, b)
    base_equal = all(np.array_equal(a, b) for a, b in zip(_leaves(nnx.state(fresh, qj.nnx.FrozenWeight)),
                                                          _leaves(nnx.state(model, qj.nnx.FrozenWeight)),
                                                          strict=True))
    assert base_equal == include_base  # the base comes back only when it was saved
    x = jnp.ones((2, 128))
    fresh.eval(), model.eval()
    if include_base:
        np.testing.assert_array_equal(_forward(fresh, x), _forward(model, x))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    model, optimizer = _run()
    qj.checkpoint.save(tmp_path, model, optimizer, step=1, extra={"ok": True})
    before = _leaves(nnx.state(model, nnx.LoRAParam))
    model.up.lora_b[...] = model.up.lora_b[...] + 1.0
    with pytest.raises(TypeError):
        qj.checkpoint.save(tmp_path, model, optimizer, step=2, extra={"bad": object()})  # fails mid-save
    assert qj.checkpoint.latest_step(tmp_path) == 1
    fresh, fresh_opt = _run(seed=3)
    meta = qj.checkpoint.restore(tmp_path, fresh, fresh_opt)
    assert (meta.step, meta.extra) == (1, {"ok": True})
    for a, b in zip(_leaves(nnx.state(fresh, nnx.LoRAParam)), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_restore_errors(tmp_path):
    model, optimizer = _run()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        qj.checkpoint.restore(tmp_path, model)
    qj.checkpoint.save(tmp_path, model, step=1)
    with pytest.raises(ValueError, match="saved without optimizer state"):
        qj.checkpoint.restore(tmp_path, model, optimizer)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        qj.checkpoint.metadata(tmp_path / "none")
    with pytest.raises(TypeError, match="config: expected a dataclass instance"):
        qj.checkpoint.save(tmp_path, model, step=2, config={"lr": 1.0})


def test_metadata_and_config_check_without_touching_the_model(tmp_path):
    model, optimizer = _run()
    config = qj.train.TrainConfig(total_steps=10)
    state = np.random.default_rng(3).bit_generator.state
    qj.checkpoint.save(tmp_path, model, optimizer, step=4, data_state=state, config=config, extra={"a": [1, 2]})
    qj.checkpoint.save(tmp_path, model, optimizer, step=6, data_state={"row": 9}, config=config)
    meta = qj.checkpoint.metadata(tmp_path, step=4)  # no model needed
    assert (meta.step, meta.extra, meta.data_state) == (4, {"a": [1, 2]}, state)
    assert qj.train.TrainConfig(**meta.config) == config
    assert qj.checkpoint.metadata(tmp_path).step == 6  # the latest
    fresh, fresh_opt = _run(seed=3)
    before = _leaves(nnx.state(fresh))
    with pytest.raises(ValueError, match=r"4: saved with a different TrainConfig.*'lr': \(0.0002, 0.001\)"):
        qj.checkpoint.restore(tmp_path, fresh, fresh_opt, step=4, config=dataclasses.replace(config, lr=1e-3))
    for a, b in zip(before, _leaves(nnx.state(fresh)), strict=True):  # refused before touching it
        np.testing.assert_array_equal(a, b)
    assert qj.checkpoint.restore(tmp_path, fresh, fresh_opt, config=config).data_state == {"row": 9}


def _data_files(step_dir):
    """The array data files of a step (Orbax's OCDBT chunks), largest first."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and "/d/" in p.as_posix()]
    return sorted(files, key=lambda p: -p.stat().st_size)


def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning_naming_the_file(tmp_path):
    """Every data file of a step, truncated by one byte, is caught by the manifest (Orbax alone restores some of
    them without an error): the previous step is restored, with a warning naming the file; the model is unchanged by
    the damaged step."""
    model, optimizer = _run(steps=1)
    qj.checkpoint.save(tmp_path / "run", model, optimizer, step=1)
    expected = _leaves(nnx.state(optimizer))
    later, later_opt = _run(steps=2)
    qj.checkpoint.save(tmp_path / "run", later, later_opt, step=2)
    files = _data_files(tmp_path / "run" / "2")
    assert len(files) >= 4
    for i, file in enumerate(files):
        run = tmp_path / f"copy{i}"
        shutil.copytree(tmp_path / "run", run)
        damaged = run / file.relative_to(tmp_path / "run")
        damaged.write_bytes(damaged.read_bytes()[:-1])
        fresh, fresh_opt = _run(seed=5, steps=1)
        warning = f"step 2: {damaged}: .* bytes, .* when saved.*restored step 1"
        with pytest.warns(qj.checkpoint.DamagedCheckpointWarning, match=warning):
            assert qj.checkpoint.restore(run, fresh, fresh_opt).step == 1
        for a, b in zip(_leaves(nnx.state(fresh_opt)), expected, strict=True):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(qj.checkpoint.DamagedCheckpoint, match=str(damaged)):
            qj.checkpoint.restore(run, fresh, fresh_opt, step=2)  # asked for by number: refused, not replaced
        with pytest.raises(qj.checkpoint.DamagedCheckpoint, match=str(damaged)):
            qj.checkpoint.metadata(run)


def test_no_intact_checkpoint_names_the_damage_and_changes_nothing(tmp_path):
    model, optimizer = _run(steps=1)
    qj.checkpoint.save(tmp_path, model, optimizer, step=1)
    (file,) = _data_files(tmp_path / "1")[:1]
    file.write_bytes(b"\0" * file.stat().st_size)  # same size, other contents
    fresh, fresh_opt = _run(seed=5, steps=1)
    before = _leaves(nnx.state(fresh_opt))
    with pytest.raises(FileNotFoundError, match=f"no intact checkpoint; step 1: {file}: contents changed"):
        qj.checkpoint.restore(tmp_path, fresh, fresh_opt)
    for a, b in zip(_leaves(nnx.state(fresh_opt)), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_saving_a_step_again_replaces_it(tmp_path):
    """A run resumed from step 1 past a damaged step 2 writes step 2 again: the new one replaces the old."""
    model, optimizer = _run(steps=1)
    qj.checkpoint.save(tmp_path, model, optimizer, step=2)
    file = _data_files(tmp_path / "2")[0]
    file.write_bytes(file.read_bytes()[:-1])
    later, later_opt = _run(steps=2)
    qj.checkpoint.save(tmp_path, later, later_opt, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]  # no temporary or replaced directory left
    fresh, fresh_opt = _run(seed=5, steps=1)
    qj.checkpoint.restore(tmp_path, fresh, fresh_opt)
    for a, b in zip(_leaves(nnx.state(fresh_opt)), _leaves(nnx.state(later_opt)), strict=True):
        np.testing.assert_array_equal(a, b)

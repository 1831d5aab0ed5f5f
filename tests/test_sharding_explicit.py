"""Meshes as JAX makes them today: `jax.make_mesh` gives Explicit axes (sharding in the array types) since JAX 0.7.
`qj.shard_model`, the train step and evaluation work on meshes with Explicit and with Auto axes, with no mesh
context and inside `jax.set_mesh`, for FSDP, tensor parallelism and both: loss, gradient norm and updated adapters
equal to one device (tests/test_sharding.py's reference), every array left where it was."""

import contextlib

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from test_sharding import MESHES, TRAIN, _assert_close, _at, _batch, _model

import qlora_jax as qj


def _mesh(axes, devices, kind):
    types = (AxisType.Explicit if kind == "explicit" else AxisType.Auto,) * len(axes)
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=types, devices=devices)


# Explicit axes with each strategy, two without a mesh context and one inside `jax.set_mesh`; Auto axes inside
# `jax.set_mesh` (Auto axes without a context: tests/test_sharding.py, whose `qj.make_mesh` makes Auto meshes).
CASES = [(*MESHES[0], "explicit", "none"), (*MESHES[1], "explicit", "set_mesh"), (*MESHES[2], "explicit", "none"),
         (*MESHES[0], "auto", "set_mesh")]


@pytest.mark.parametrize("axes,strategy,kind,context", CASES, ids=["-".join(c[1:]) for c in CASES])
def test_train_step_on_explicit_and_auto_meshes_matches_one_device(cpu_devices, single_device, axes, strategy, kind,
                                                                    context):
    _, ref_grads, ref_step_loss, ref_grad_norm, ref_adapters = single_device
    mesh = _mesh(axes, cpu_devices, kind)
    assert mesh.axis_types == ((AxisType.Explicit if kind == "explicit" else AxisType.Auto),) * len(axes)
    trainer = qj.train.Trainer(_model(), TRAIN)
    qj.shard_model(trainer.model, mesh, strategy, optimizer=trainer.optimizer)
    before = {p: a.sharding for p, a in jax.tree_util.tree_leaves_with_path(nnx.state(trainer.model))}
    batch = qj.shard_batch(_batch(), mesh)
    with jax.set_mesh(mesh) if context == "set_mesh" else contextlib.nullcontext():
        metrics = trainer.train_step(batch)
        evaluated = qj.train.evaluate(trainer.model, [batch])
    assert abs(float(metrics["loss"]) - ref_step_loss) <= 1e-5 * abs(ref_step_loss)
    assert abs(float(metrics["grad_norm"]) - ref_grad_norm) <= 1e-5 * ref_grad_norm
    # The updated adapters, where the reference gradient is not rounding noise (as in tests/test_sharding.py).
    for path, a in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(trainer.model, nnx.LoRAParam))):
        g = np.abs(np.asarray(_at(ref_grads, path)))
        keep = g > 1e-4 * g.max()
        np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(_at(ref_adapters, path))[keep], rtol=0,
                                   atol=1e-4 * TRAIN.lr)
    moved = [p for p, a in jax.tree_util.tree_leaves_with_path(nnx.state(trainer.model))
             if not a.sharding.is_equivalent_to(before[p], a.ndim)]
    assert moved == []
    # Evaluation after the step equals one device's evaluation of the reference adapters.
    reference = _model()
    nnx.update(reference, jax.tree.map(np.asarray, nnx.state(trainer.model, nnx.LoRAParam)))
    expected = qj.train.evaluate(reference, [_batch()])
    assert abs(evaluated["loss"] - expected["loss"]) <= 1e-5 * expected["loss"]


@pytest.mark.parametrize("axes,strategy", MESHES[:2], ids=[s for _, s in MESHES[:2]])
def test_adapter_gradients_on_an_explicit_mesh_match_one_device(cpu_devices, single_device, axes, strategy):
    """The adapters' gradients themselves: one `qj.train.train_step` with SGD at learning rate 1 moves each adapter
    by minus its gradient; on an Explicit mesh that move equals one device's gradient (tests/test_sharding.py's
    reference, the same loss normalization) within 1e-5 of its largest entry."""
    ref_loss, ref_grads, *_ = single_device
    mesh = _mesh(axes, cpu_devices, "explicit")
    model = _model()
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.LoRAParam)
    qj.shard_model(model, mesh, strategy, optimizer=optimizer)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    metrics = qj.train.train_step(model, optimizer, qj.shard_batch(_batch(), mesh))
    assert abs(float(metrics["loss"]) - ref_loss) <= 1e-5 * abs(ref_loss)
    after = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    grads = jax.tree.map(lambda b, a: b - np.asarray(a), before, after)
    _assert_close(grads, ref_grads)

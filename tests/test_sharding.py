"""Sharded QLoRA models on 8 CPU devices: the same loss, gradients and update as on one device; each device
holds its share of the packed codes and scales; checkpoints move between meshes; bad meshes are named."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import qlora_jax as qj
from qlora_jax._src.models.config import ModelConfig
from qlora_jax._src.models.llama import CausalLM

CONFIG = ModelConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8,
                     num_kv_heads=4, max_position_embeddings=64)
TRAIN = qj.train.TrainConfig(total_steps=10, lr=1e-2, warmup_ratio=0.0, max_grad_norm=1.0)
# Pure data parallelism ({"data": 8}) is not a case of its own here: the gradient all-reduce over a data axis is
# checked leaf by leaf on the (data 2, tensor 4) mesh below and across two processes on (data 2, fsdp 2) in
# tests/test_distributed.py, and `finetune --mesh data=8` must match one device in tests/test_cli_finetune.py.
MESHES = [({"fsdp": 8}, "fsdp"), ({"data": 2, "tensor": 4}, "tp"), ({"fsdp": 2, "tensor": 4}, "fsdp+tp")]


def _model(config=CONFIG):
    model = qj.apply_qlora(CausalLM(config, rngs=nnx.Rngs(0)), quant=qj.QuantConfig(double_quant=True),
                           lora=qj.LoraConfig(rank=8, alpha=16), rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.LoRAParam)  # non-zero B, so that A has gradients too
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    return model


def _batch(n=8, seq=32):
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (n, seq + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((n, seq), np.float32)}


@nnx.jit
def _loss_and_grads(model, batch):
    def loss_fn(model):
        loss, weight = qj.train.masked_cross_entropy(model(batch["input_ids"]), batch["targets"], batch["weights"])
        return loss / weight

    return nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)


def _assert_close(got, want, rtol=1e-5):
    """Each array within rtol of the largest magnitude of its reference (float32)."""
    for path, a in jax.tree_util.tree_leaves_with_path(got):
        b = _at(want, path)
        scale = float(jnp.max(jnp.abs(b)))
        assert scale > 0, path
        assert float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b)))) <= rtol * scale, path


def _at(tree, path):
    return dict(jax.tree_util.tree_leaves_with_path(tree))[path]


def single_device_reference():
    """Loss and adapter gradients of `_model()` on `_batch()`, and the loss, gradient norm and adapters of one
    `Trainer` step, on one device. tests/conftest.py computes it once a session (`single_device` fixture) for the
    meshes here and the two processes in tests/test_distributed.py."""
    model = _model()
    loss, grads = _loss_and_grads(model, _batch())
    trainer = qj.train.Trainer(_model(), TRAIN)
    metrics = trainer.train_step(_batch())
    return float(loss), nnx.to_pure_dict(grads), float(metrics["loss"]), float(metrics["grad_norm"]), nnx.to_pure_dict(
        nnx.state(trainer.model, nnx.LoRAParam))


def test_remat_step_keeps_every_array_where_it_was(cpu_devices):
    """With `remat=True` too, the layers hand back only the variables they change: after a sharded step the
    frozen weights, norms and nested scales keep their shardings (NNX's default handed the whole layer state
    back, resharded)."""
    config = ModelConfig(vocab_size=128, hidden_size=512, intermediate_size=512, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=64)
    model = qj.apply_qlora(CausalLM(config, remat=True, rngs=nnx.Rngs(0)), quant=qj.QuantConfig(double_quant=True),
                           lora=qj.LoraConfig(rank=8, alpha=16), rngs=nnx.Rngs(1))
    mesh = qj.make_mesh({"fsdp": 8}, cpu_devices)
    trainer = qj.train.Trainer(model, TRAIN)
    qj.shard_model(trainer.model, mesh, "fsdp", optimizer=trainer.optimizer)
    before = {p: a.sharding for p, a in jax.tree_util.tree_leaves_with_path(nnx.state(trainer.model))}
    ids = np.random.default_rng(0).integers(0, 128, (8, 17)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((8, 16), np.float32)}
    assert np.isfinite(float(trainer.train_step(qj.shard_batch(batch, mesh))["loss"]))
    moved = [jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_leaves_with_path(nnx.state(trainer.model))
             if not a.sharding.is_equivalent_to(before[p], a.ndim)]
    assert moved == []


@pytest.mark.parametrize("axes,strategy",
                         [pytest.param(*m, marks=pytest.mark.slow) if m[1] == "tp" else m for m in MESHES],
                         ids=[f"{'x'.join(map(str, a.values()))}-{s}" for a, s in MESHES])
def test_sharded_step_matches_one_device(cpu_devices, single_device, axes, strategy):
    ref_loss, ref_grads, ref_step_loss, ref_grad_norm, ref_adapters = single_device
    mesh = qj.make_mesh(axes, cpu_devices)
    model = qj.shard_model(_model(), mesh, strategy)
    loss, grads = _loss_and_grads(model, qj.shard_batch(_batch(), mesh))
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    _assert_close(nnx.to_pure_dict(grads), ref_grads)

    trainer = qj.train.Trainer(_model(), TRAIN)
    qj.shard_model(trainer.model, mesh, strategy, optimizer=trainer.optimizer)
    before = {p: a.sharding for p, a in jax.tree_util.tree_leaves_with_path(nnx.state(trainer.model))}
    metrics = trainer.train_step(qj.shard_batch(_batch(), mesh))
    assert abs(float(metrics["loss"]) - ref_step_loss) <= 1e-5 * abs(ref_step_loss)
    assert abs(float(metrics["grad_norm"]) - ref_grad_norm) <= 1e-5 * ref_grad_norm
    # Adam's first update is lr * g / (|g| + eps): where g is near 0 its sign is rounding noise, so the updated
    # adapters are compared where the reference gradient is not (|g| > 1e-4 max|g|).
    for path, a in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(trainer.model, nnx.LoRAParam))):
        g = np.abs(np.asarray(_at(ref_grads, path)))
        keep = g > 1e-4 * g.max()
        assert keep.mean() > 0.99, path
        np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(_at(ref_adapters, path))[keep], rtol=0,
                                   atol=1e-4 * TRAIN.lr)
    moved = [p for p, a in jax.tree_util.tree_leaves_with_path(nnx.state(trainer.model))
             if not a.sharding.is_equivalent_to(before[p], a.ndim)]
    assert moved == []  # the update keeps every array where it was
    adapters = {tuple(str(k) for k in path): v.get_value()
                for path, v in nnx.to_flat_state(nnx.state(trainer.model, nnx.LoRAParam))}
    checked = 0
    for path, v in nnx.to_flat_state(nnx.state(trainer.optimizer)):
        names = tuple(str(k) for k in path)
        adapter = next((adapters[names[i:]] for i in range(len(names)) if names[i:] in adapters), None)
        if adapter is not None:  # Adam's moments follow their adapter
            assert v.get_value().sharding.is_equivalent_to(adapter.sharding, adapter.ndim), names
            checked += 1
    assert checked == 2 * len(adapters)


def _per_device_bytes(array):
    return [shard.data.nbytes for shard in array.addressable_shards]


def test_fsdp_gives_each_device_an_eighth_of_codes_and_scales(cpu_devices):
    mesh = qj.make_mesh({"fsdp": 8}, cpu_devices)
    model = qj.shard_model(_model(), mesh, "fsdp")
    kernels = jax.tree.leaves(nnx.state(model, qj.nnx.QuantizedWeight),
                              is_leaf=lambda x: isinstance(x, qj.QuantizedArray))
    assert len(kernels) == 7
    for q in kernels:
        for array in (q.codes, q.absmax):
            per_device = _per_device_bytes(array)
            assert len(per_device) == 8 and set(per_device) == {array.nbytes // 8}
            assert {shard.device for shard in array.addressable_shards} == set(cpu_devices)
        block_elems = q.block_size // 2  # packed bytes per block: a block never straddles two devices
        assert (q.codes.addressable_shards[0].data.shape[-1] % block_elems == 0
                or q.codes.addressable_shards[0].data.shape[-2] < q.codes.shape[-2])
        assert q.nested_absmax.sharding.is_fully_replicated  # 1/16384 of the weights
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):  # adapters follow the embed axis
        layer, factor = str(path[-2]), str(path[-1])
        split = (factor == "lora_a") == (layer not in ("o_proj", "down_proj"))
        x = v.get_value()
        assert set(_per_device_bytes(x)) == {x.nbytes // 8 if split else x.nbytes}, path


def test_tensor_parallel_splits_columns_and_rows(cpu_devices):
    mesh = qj.make_mesh({"data": 2, "tensor": 4}, cpu_devices)
    model = qj.shard_model(_model(), mesh, "tp")
    attn, mlp = model.layers.self_attn, model.layers.mlp
    for layer in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):  # columns: output axis
        q = layer.kernel.get_value()
        assert q.codes.sharding.spec == P(None, "tensor", None) and q.absmax.sharding.spec == P(None, "tensor", None)
        assert layer.lora_b.get_value().sharding.spec == P(None, None, "tensor")
        assert layer.lora_a.get_value().sharding.is_fully_replicated
    for layer in (attn.o_proj, mlp.down_proj):  # rows: input axis, whole blocks
        q = layer.kernel.get_value()
        assert q.codes.sharding.spec == P(None, None, "tensor") and q.absmax.sharding.spec == P(None, None, "tensor")
        assert q.absmax.addressable_shards[0].data.shape[-1] * 4 == q.absmax.shape[-1]
        assert layer.lora_a.get_value().sharding.spec == P(None, "tensor", None)
    assert model.lm_head.kernel.get_value().sharding.spec == P(None, "tensor")
    assert model.embed_tokens.embedding.get_value().sharding.spec == P("tensor", None)
    assert model.norm.weight.get_value().sharding.is_fully_replicated


def test_checkpoint_saved_on_one_mesh_restores_on_another(cpu_devices, tmp_path):
    source = qj.make_mesh({"fsdp": 8}, cpu_devices)
    trainer = qj.train.Trainer(_model(), TRAIN)
    qj.shard_model(trainer.model, source, "fsdp", optimizer=trainer.optimizer)
    trainer.train_step(qj.shard_batch(_batch(), source))
    trainer.save(tmp_path)
    saved = nnx.to_pure_dict(nnx.state(trainer.model, nnx.LoRAParam))
    saved_opt = [np.asarray(x) for x in jax.tree.leaves(nnx.state(trainer.optimizer))]

    target = qj.make_mesh({"data": 2, "tensor": 4}, cpu_devices)
    fresh = qj.train.Trainer(_model(), TRAIN)
    qj.shard_model(fresh.model, target, "tp", optimizer=fresh.optimizer)
    fresh.restore(tmp_path)
    restored = nnx.state(fresh.model, nnx.LoRAParam)
    for path, array in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(restored)):
        np.testing.assert_array_equal(np.asarray(array), np.asarray(_at(saved, path)))
        assert array.sharding.mesh.shape == target.shape
    assert fresh.model.layers.mlp.up_proj.lora_b.get_value().sharding.spec == P(None, None, "tensor")
    for a, b in zip(jax.tree.leaves(nnx.state(fresh.optimizer)), saved_opt, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    fresh.train_step(qj.shard_batch(_batch(), target))  # and training goes on on the new mesh


def test_a_mesh_axis_that_does_not_divide_a_layer_splits_another_axis_or_keeps_it_whole(cpu_devices, caplog):
    """hidden 128 = 2 blocks of 64: fsdp=8 cannot split the packed input axis of q/k/v/gate/up (blocks stay whole on
    one device). Those kernels are split on their output axis instead (down_proj's "embed" axis is its output,
    split as asked; the adapters have no blocks and split as asked); a dimension nothing divides stays whole.
    Logged by name, never refused; the sharded step equals one device."""
    small = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=1, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)
    mesh = qj.make_mesh({"fsdp": 8}, cpu_devices)
    with caplog.at_level(logging.WARNING, logger="qlora_jax._src.sharding"):
        specs = qj.partition_specs(nnx.eval_shape(lambda: _model(small)), mesh, "fsdp")
    layer = specs["layers"]
    assert layer["self_attn"]["q_proj"]["kernel"].get_value().codes == P(None, "fsdp", None)  # [layer, out, in/2]
    assert layer["self_attn"]["k_proj"]["kernel"].get_value().codes == P(None, "fsdp", None)  # out 64 = 8 x 8
    assert layer["mlp"]["down_proj"]["kernel"].get_value().codes == P(None, "fsdp", None)  # out 128 as asked
    assert layer["self_attn"]["q_proj"]["lora_a"].get_value() == P(None, "fsdp", None)  # [layer, in 128, r]
    assert ("layers/self_attn/q_proj/kernel: input axis (2 blocks of 64) not split over 'fsdp' of size 8; split on "
            "its output axis (128) instead") in caplog.text
    assert "layers/mlp/down_proj/kernel" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_jax._src.sharding"):  # 64 k/v outputs over 3 devices
        specs = qj.partition_specs(nnx.eval_shape(lambda: _model(small)), qj.make_mesh({"tensor": 3},
                                   cpu_devices[:3]), {"heads": "tensor"})
    assert specs["layers"]["self_attn"]["k_proj"]["kernel"].get_value().codes == P(None, None, None)
    assert "layers/self_attn/k_proj/kernel: output axis (size 64) not split over 'tensor' of size 3" in caplog.text

    model, reference = _model(small), _model(small)
    batch = _batch()
    batch["input_ids"] %= small.vocab_size
    batch["targets"] %= small.vocab_size
    ref_loss, ref_grads = _loss_and_grads(reference, batch)
    loss, grads = _loss_and_grads(qj.shard_model(model, mesh, "fsdp"), qj.shard_batch(batch, mesh))
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    _assert_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))


def test_bad_meshes_and_batches_are_named(cpu_devices):
    model = nnx.eval_shape(lambda: _model(ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=512,
                                                      num_layers=1, num_heads=4, num_kv_heads=2)))
    with pytest.raises(ValueError, match="multiply to 6, but there are 8 devices"):
        qj.make_mesh({"data": 2, "tensor": 3}, cpu_devices)
    with pytest.raises(ValueError, match="expected name=size"):
        qj.make_mesh("data:8", cpu_devices)
    with pytest.raises(ValueError, match="'experts'"):
        qj.shard_model(model, qj.make_mesh({"data": 8}, cpu_devices), {"mlp": "experts"})
    with pytest.raises(ValueError, match=r"batch\['input_ids'\]: batch size 4 is not divisible by the "
                                         r"data-parallel size 8"):
        qj.shard_batch(_batch(4), qj.make_mesh({"data": 8}, cpu_devices))


def test_the_rules_are_the_models_and_a_model_without_them_is_named(cpu_devices):
    assert CausalLM.logical_axes is qj.models.LLAMA_AXES  # the Llama family's names sit beside the model

    class Mlp(nnx.Module):  # a model of one's own: no `logical_axes`
        def __init__(self, rngs):
            self.up = nnx.Linear(128, 256, rngs=rngs)

    mesh = qj.make_mesh({"fsdp": 8}, cpu_devices)
    with pytest.raises(ValueError, match=r"axes: Mlp has no `logical_axes`; pass"):
        qj.shard_model(Mlp(nnx.Rngs(0)), mesh, "fsdp")
    specs = qj.partition_specs(Mlp(nnx.Rngs(0)), mesh, "fsdp", axes={"up": ("embed", "mlp")})
    assert specs["up"]["kernel"].get_value() == P("fsdp", None)  # nnx.Linear kernel [in, out]: "embed" is the input

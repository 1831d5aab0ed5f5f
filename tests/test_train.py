"""`qlora_jax.train`: schedules, clipping, exact gradient accumulation, adapters-only updates and exact resume.

Runs killed or interrupted for real, then resumed bit-identically, are in
tests/test_interrupts.py (through `qlora-jax finetune`, whose loop is the
Trainer's).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qlora_jax as qj

TrainConfig = qj.train.TrainConfig


# ----------------------------------------------------------------------------- a tiny LM for the unit tests


class TinyLM(nnx.Module):
    """Embedding, one linear layer (QLoRA after apply_qlora) and an output head."""

    def __init__(self, rngs, vocab=32, width=64):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.proj = nnx.Linear(width, width, rngs=rngs)
        self.lm_head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, input_ids, *, positions=None, segment_ids=None):
        h = self.embed(input_ids)
        return self.lm_head(h + jnp.tanh(self.proj(h)))


# One config (and one compiled step) for the tiny tests that use a Trainer.
TINY_CONFIG = TrainConfig(total_steps=30, lr=3e-2, warmup_ratio=0.1, schedule="linear")


def _tiny(dropout=0.0, seed=0):
    model = qj.apply_qlora(TinyLM(nnx.Rngs(seed)), quant=qj.QuantConfig(),
                           lora=qj.LoraConfig(rank=4, alpha=8, dropout=dropout), rngs=nnx.Rngs(seed + 1))
    return model


def _tiny_batch(seed=0, rows=4, seq=8, vocab=32):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, seq), dtype=np.int32)
    weights = (rng.random((rows, seq)) < 0.7).astype(np.float32)
    weights[: rows // 2, : seq - 2] = 0.0  # the first micro-batch has far fewer loss tokens than the second
    return {"input_ids": ids, "targets": np.roll(ids, -1, axis=1), "weights": weights}


def _leaves(module, kind):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(nnx.state(module, kind))]


def _reference_loss(model, batch):
    """`Σ w·ce / Σ w`, written independently of the library."""
    logits = model(jnp.asarray(batch["input_ids"]))
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0]
    w = jnp.asarray(batch["weights"])
    return jnp.sum(w * ce) / jnp.sum(w)


def test_grad_accum_gives_the_update_of_the_whole_batch():
    batch = _tiny_batch()
    runs = {}
    for grad_accum in (1, 2):
        model = _tiny(dropout=0.1)
        model.eval()  # the same (no) dropout masks for the whole batch and its halves
        config = TrainConfig(total_steps=10, lr=1e-2, grad_accum=grad_accum)
        optimizer = nnx.Optimizer(model, qj.train.make_optimizer(config), wrt=nnx.LoRAParam)
        metrics = [qj.train.train_step(model, optimizer, batch, micro_batches=grad_accum) for _ in range(3)]
        runs[grad_accum] = (model, optimizer, metrics)
    schedule = qj.train.make_schedule(config)
    for count, (m1, m2) in enumerate(zip(runs[1][2], runs[2][2], strict=True)):
        for key in ("loss", "grad_norm", "lr", "tokens"):
            np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-6, err_msg=key)
        assert float(m1["lr"]) == float(schedule(count))  # the schedule at the update's count, read from the state
    for a, b in zip(_leaves(runs[1][0], nnx.LoRAParam), _leaves(runs[2][0], nnx.LoRAParam), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(nnx.state(runs[1][1])), jax.tree.leaves(nnx.state(runs[2][1])), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-6)
    # The batch is built so that the mean of the two micro-batch means is not the token mean.
    fresh = _tiny(dropout=0.1)
    fresh.eval()
    halves = [{k: v[i * 2:(i + 1) * 2] for k, v in batch.items()} for i in range(2)]
    reference_loss = nnx.jit(_reference_loss)
    mean_of_means = np.mean([float(reference_loss(fresh, h)) for h in halves])
    token_mean = float(reference_loss(fresh, batch))
    assert abs(mean_of_means - token_mean) > 1e-2
    np.testing.assert_allclose(float(runs[2][2][0]["loss"]), token_mean, rtol=1e-6)


def test_step_metrics_match_an_independent_computation():
    model = _tiny()
    batch = _tiny_batch(seed=1)
    config = TrainConfig(total_steps=10, lr=1e-2, warmup_ratio=0.2, max_grad_norm=1e-4)
    grads = nnx.jit(nnx.grad(_reference_loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model, batch)
    norm = math.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)))
    loss = float(nnx.jit(_reference_loss)(model, batch))
    optimizer = nnx.Optimizer(model, qj.train.make_optimizer(config), wrt=nnx.LoRAParam)
    m = [qj.train.train_step(model, optimizer, batch) for _ in range(3)]
    np.testing.assert_allclose(float(m[0]["loss"]), loss, rtol=1e-6)
    np.testing.assert_allclose(float(m[0]["grad_norm"]), norm, rtol=1e-5)  # before clipping (norm >> 1e-4)
    assert norm > 100 * config.max_grad_norm
    assert [float(x["lr"]) for x in m] == pytest.approx([0.0, 5e-3, 1e-2])  # 2 warmup steps, as transformers
    assert float(m[0]["tokens"]) == float(batch["weights"].sum())


def test_train_step_takes_any_optax_transformation():
    """No config: plain SGD updates as by hand and reports no `lr`; an injected learning rate is reported."""
    batch = _tiny_batch(seed=2)
    model = _tiny()
    grads = nnx.jit(nnx.grad(_reference_loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model, batch)
    want = [np.asarray(p) - 0.5 * np.asarray(g) for p, g in zip(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)),
                                                                jax.tree.leaves(grads), strict=True)]
    metrics = qj.train.train_step(model, nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.LoRAParam), batch)
    assert sorted(metrics) == ["grad_norm", "loss", "tokens"]
    for a, b in zip(want, _leaves(model, nnx.LoRAParam), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    schedule = optax.linear_schedule(1e-3, 4e-3, transition_steps=3)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=schedule)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    with jax.numpy_dtype_promotion("standard"):
        lrs = [float(qj.train.train_step(model, optimizer, batch)["lr"]) for _ in range(3)]
        assert lrs == pytest.approx([float(schedule(i)) for i in range(3)])


def test_equal_configs_give_one_optimizer_and_one_compiled_step():
    """`make_optimizer` caches by config (no registry): a new optimizer of an equal config reuses the step."""
    from qlora_jax._src.train.step import _train_step

    config = TrainConfig(total_steps=7, lr=1e-3)
    assert qj.train.make_optimizer(config) is qj.train.make_optimizer(TrainConfig(total_steps=7, lr=1e-3))
    assert qj.train.make_optimizer(config) is not qj.train.make_optimizer(TrainConfig(total_steps=7, lr=2e-3))
    batch = _tiny_batch(seed=4)
    model = _tiny()
    qj.train.train_step(model, nnx.Optimizer(model, qj.train.make_optimizer(config), wrt=nnx.LoRAParam), batch)
    compiled = _train_step.jitted_fn._cache_size()
    equal = TrainConfig(total_steps=7, lr=1e-3)
    qj.train.train_step(model, nnx.Optimizer(model, qj.train.make_optimizer(equal), wrt=nnx.LoRAParam), batch)
    assert _train_step.jitted_fn._cache_size() == compiled


def test_only_lora_params_change_and_packed_codes_stay_bit_identical():
    model = _tiny(dropout=0.1)
    base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # embeddings, biases, head (LoRAParam is a Param)
    before = {kind: _leaves(model, kind) for kind in (qj.nnx.QuantizedWeight, base, nnx.LoRAParam)}
    trainer = qj.train.Trainer(model, TINY_CONFIG)
    for _ in range(3):
        trainer.train_step(_tiny_batch())
    assert before[qj.nnx.QuantizedWeight] and before[base]
    for kind in (qj.nnx.QuantizedWeight, base):  # packed codes, scales, embeddings, head: untouched
        for a, b in zip(before[kind], _leaves(model, kind), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert all(not np.array_equal(a, b) for a, b in zip(before[nnx.LoRAParam], _leaves(model, nnx.LoRAParam),
                                                       strict=True))
    assert trainer.step == 3


def test_trainer_wrt_param_trains_every_param_of_a_float_model(tmp_path):
    model = TinyLM(nnx.Rngs(0))  # no adapters: full training
    before = _leaves(model, nnx.Param)
    trainer = qj.train.Trainer(model, TINY_CONFIG, wrt=nnx.Param)
    batch = _tiny_batch()
    first = float(trainer.train_step(batch)["loss"])
    for _ in range(4):
        last = float(trainer.train_step(batch)["loss"])
    after = _leaves(model, nnx.Param)
    assert len(before) == len(after) == 5  # the embedding, two kernels and two biases
    assert all(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert last < first and trainer.step == 5
    # The optimizer holds moments for every Param, not only adapters.
    mu = [x for path, x in nnx.to_flat_state(nnx.state(trainer.optimizer)) if "mu" in map(str, path)]
    assert sorted(x.shape for x in mu) == sorted(x.shape for x in after)
    # A checkpoint holds what the trainer trains: every Param here.
    trainer.save(tmp_path)
    fresh = qj.train.Trainer(TinyLM(nnx.Rngs(1)), TINY_CONFIG, wrt=nnx.Param)
    fresh.restore(tmp_path)
    assert fresh.step == 5
    for a, b in zip(after, _leaves(fresh.model, nnx.Param), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loss_decreases_and_evaluate_leaves_the_model_alone():
    model = _tiny(dropout=0.1)
    trainer = qj.train.Trainer(model, TINY_CONFIG)
    ids = np.tile(np.arange(8, dtype=np.int32), (4, 1)) + np.arange(4, dtype=np.int32)[:, None]
    batch = {"input_ids": ids, "targets": (ids * 5 + 3) % 32, "weights": np.ones((4, 8), np.float32)}
    rng_before = _leaves(model, nnx.RngState)
    first = trainer.evaluate([batch])
    assert trainer.evaluate([batch, batch]) == dict(first, tokens=2 * first["tokens"])  # no dropout: deterministic
    for a, b in zip(rng_before, _leaves(model, nnx.RngState), strict=True):  # no key drawn
        np.testing.assert_array_equal(a, b)
    assert model.proj.deterministic is False  # the mode is unchanged
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(30)]
    last = trainer.evaluate([batch])
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert last["perplexity"] == pytest.approx(math.exp(last["loss"]))


def test_trainer_step_walks_the_graph_once_and_matches_train_step(monkeypatch, tmp_path):
    """`Trainer.train_step` binds the step to its model once (no graph walk per call) and updates exactly as
    `qj.train.train_step` does: dropout masks, RNG counts, adapters and moments; `model.eval()` is seen, and
    after `restore` the bound step reads the restored state without being bound or compiled again."""
    batch = _tiny_batch()
    model = _tiny(dropout=0.3)
    trainer = qj.train.Trainer(model, TINY_CONFIG)
    reference = _tiny(dropout=0.3)  # the same model, stepped by the function
    nnx.reseed(reference, dropout=TINY_CONFIG.seed, policy="match_shape")  # as Trainer does
    optimizer = nnx.Optimizer(reference, qj.train.make_optimizer(TINY_CONFIG), wrt=nnx.LoRAParam)
    walks = []
    flatten = nnx.graphlib.flatten
    monkeypatch.setattr(nnx.graphlib, "flatten", lambda *a, **k: walks.append(1) or flatten(*a, **k))

    def both():
        walks.clear()
        got = trainer.train_step(batch)
        mine = len(walks)
        want = qj.train.train_step(reference, optimizer, batch, micro_batches=TINY_CONFIG.grad_accum,
                                   loss_chunk=TINY_CONFIG.loss_chunk)
        assert float(got["loss"]) == float(want["loss"]) and float(got["grad_norm"]) == float(want["grad_norm"])
        for kind in (nnx.LoRAParam, nnx.RngState):
            for a, b in zip(_leaves(model, kind), _leaves(reference, kind), strict=True):
                np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree.leaves(nnx.state(trainer.optimizer)), jax.tree.leaves(nnx.state(optimizer)),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        return mine

    assert both() > 0  # the first call binds (and compiles)
    assert [both() for _ in range(3)] == [0, 0, 0]  # later calls do not walk the graphs
    rngs = _leaves(model, nnx.RngState)
    model.eval(), reference.eval()  # no dropout: the trainer binds again and draws no key
    assert both() > 0
    for a, b in zip(rngs, _leaves(model, nnx.RngState), strict=True):
        np.testing.assert_array_equal(a, b)
    model.train(), reference.train()
    both()
    assert trainer.step == 6
    trainer.save(tmp_path / "ckpt")
    after_save = trainer.train_step(batch)
    trainer.restore(tmp_path / "ckpt")
    assert trainer.step == 6
    walks.clear()
    compiles = trainer._step.jitted_fn._cache_size()
    again = trainer.train_step(batch)  # the same state and dropout keys as the step after saving
    assert walks == [] and trainer._step.jitted_fn._cache_size() == compiles
    assert float(again["loss"]) == float(after_save["loss"]) and trainer.step == 7


# ----------------------------------------------------------------------------- optimizer and schedules


def _transformers_lr(kind, step, lr, warmup, total):
    """`transformers.get_{constant,linear,cosine}_schedule_with_warmup`'s formulas, for step <= total."""
    if step < warmup:
        return lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "constant":
        return lr
    if kind == "linear":
        return lr * max(0.0, (total - step) / max(1, total - warmup))
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("total,ratio", [(100, 0.03), (37, 0.1), (10, 0.0), (5, 1.0)])
def test_schedules_match_transformers(kind, total, ratio):
    config = TrainConfig(total_steps=total, lr=3e-4, schedule=kind, warmup_ratio=ratio)
    warmup = math.ceil(ratio * total)
    assert config.warmup_steps == warmup
    schedule = qj.train.make_schedule(config)
    steps = np.arange(total + 1)
    got = np.asarray(jax.vmap(schedule)(jnp.asarray(steps, jnp.int32)))
    assert got.dtype == np.float32
    want = [_transformers_lr(kind, int(s), 3e-4, warmup, total) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
    after = float(schedule(jnp.asarray(total + 7)))  # past the end: decays stay at 0
    assert after == pytest.approx(3e-4 if kind == "constant" else 0.0, rel=1e-6, abs=1e-10)
    if kind == "cosine" and 0 < warmup < total:
        optax_cosine = optax.warmup_cosine_decay_schedule(0.0, 3e-4, warmup, total, end_value=0.0)
        with jax.numpy_dtype_promotion("standard"):
            want = [float(optax_cosine(s)) for s in steps]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)


def test_clipping_applies_at_max_grad_norm():
    g1, g2 = {"w": jnp.asarray([3.0, 4.0])}, {"w": jnp.asarray([0.03, -0.01])}  # norms 5 (clipped) and ~0.03

    def run(tx, grads):
        params = {"w": jnp.zeros(2)}
        state = tx.init(params)
        with jax.numpy_dtype_promotion("standard"):
            for g in grads:
                updates, state = tx.update(g, state, params)
                params = optax.apply_updates(params, updates)
        return np.asarray(params["w"])

    config = TrainConfig(total_steps=10, lr=0.1, warmup_ratio=0.0, max_grad_norm=0.5)
    ours = run(qj.train.make_optimizer(config), [g1, g2])
    adamw = optax.adamw(0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    clipped_by_hand = run(adamw, [{"w": g1["w"] * (0.5 / 5.0)}, g2])
    np.testing.assert_allclose(ours, clipped_by_hand, rtol=1e-6)
    unclipped = run(adamw, [g1, g2])
    assert np.abs(unclipped - ours).max() > 1e-3  # clipping is visible after the second step
    no_clip = dict(config.to_dict(), max_grad_norm=None)
    np.testing.assert_allclose(run(qj.train.make_optimizer(TrainConfig(**no_clip)), [g1, g2]), unclipped, rtol=1e-6)


def test_optimizer_works_under_strict_dtype_promotion():
    assert jax.config.jax_numpy_dtype_promotion == "strict"  # conftest.py
    tx = qj.train.make_optimizer(TrainConfig(total_steps=3, weight_decay=0.1))
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)  # optax.adamw alone raises here
    assert updates["w"].dtype == jnp.float32


# ----------------------------------------------------------------------------- checkpoints and errors


def test_restore_refuses_a_different_config_and_round_trips_the_data_state(tmp_path):
    model = _tiny(dropout=0.1)
    config = TINY_CONFIG
    trainer = qj.train.Trainer(model, config)
    trainer.train_step(_tiny_batch())
    state = np.random.default_rng(3).bit_generator.state
    trainer.save(tmp_path, data_state=state)
    other = qj.train.Trainer(_tiny(dropout=0.1, seed=5), dataclasses.replace(config, lr=2e-2))
    before = _leaves(other.model, nnx.LoRAParam)
    with pytest.raises(ValueError, match=r"different TrainConfig.*'lr': \(0.03, 0.02\)"):
        other.restore(tmp_path)
    for a, b in zip(before, _leaves(other.model, nnx.LoRAParam), strict=True):  # refused before touching it
        np.testing.assert_array_equal(a, b)
    same = qj.train.Trainer(_tiny(dropout=0.1, seed=5), config)
    assert same.restore(tmp_path) == state
    assert same.step == 1
    for a, b in zip(_leaves(model, nnx.LoRAParam), _leaves(same.model, nnx.LoRAParam), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError):
        qj.checkpoint.restore(tmp_path / "empty", model, trainer.optimizer, config=config)


@pytest.mark.parametrize("field,value", [
    ("total_steps", 0), ("total_steps", 2.5), ("lr", 0.0), ("lr", float("nan")), ("schedule", "exponential"),
    ("warmup_ratio", 1.5), ("max_grad_norm", 0.0), ("max_grad_norm", -1.0), ("weight_decay", -0.1),
    ("b1", 1.0), ("b2", -0.1), ("eps", 0.0), ("grad_accum", 0), ("grad_accum", True), ("seed", -1),
])
def test_bad_config_names_the_field(field, value):
    kwargs = {"total_steps": 10, field: value}
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**kwargs)


def test_config_is_frozen_keyword_only_and_hashable():
    config = TrainConfig(total_steps=10)
    assert (config.lr, config.schedule, config.warmup_ratio, config.max_grad_norm, config.weight_decay,
            config.b1, config.b2, config.eps, config.grad_accum) == (2e-4, "constant", 0.03, 0.3, 0.0, 0.9, 0.999,
                                                                    1e-8, 1)
    assert hash(config) == hash(TrainConfig(total_steps=10))
    with pytest.raises(AttributeError):
        config.lr = 1.0
    with pytest.raises(TypeError):
        TrainConfig(10)
    with pytest.raises(TypeError):
        TrainConfig()


def test_bad_batches_and_models_raise_clear_errors():
    model = _tiny()
    config = TrainConfig(total_steps=5, grad_accum=3)
    optimizer = nnx.Optimizer(model, qj.train.make_optimizer(config), wrt=nnx.LoRAParam)
    batch = _tiny_batch()
    with pytest.raises(ValueError, match=r"missing \['weights'\]"):
        qj.train.train_step(model, optimizer, {k: v for k, v in batch.items() if k != "weights"})
    with pytest.raises(ValueError, match=r"unknown keys \['labels'\]"):
        qj.train.train_step(model, optimizer, dict(batch, labels=batch["targets"]))
    with pytest.raises(ValueError, match=r"batch\['targets'\]: shape \(4, 7\)"):
        qj.train.train_step(model, optimizer, dict(batch, targets=batch["targets"][:, :7]))
    with pytest.raises(ValueError, match="4 rows cannot be split into micro_batches=3"):
        qj.train.train_step(model, optimizer, batch, micro_batches=3)
    for bad in (0, 1.0, True):
        with pytest.raises(ValueError, match="micro_batches: must be an integer >= 1"):
            qj.train.train_step(model, optimizer, batch, micro_batches=bad)
    with pytest.raises(ValueError, match="4 rows cannot be split into TrainConfig.grad_accum=3"):
        qj.train.Trainer(model, config).train_step(batch)
    with pytest.raises(TypeError, match="config: expected a TrainConfig"):
        qj.train.Trainer(model, {"lr": 1e-3})
    with pytest.raises(ValueError, match="no nnx.LoRAParam"):
        qj.train.Trainer(TinyLM(nnx.Rngs(0)), config)
    with pytest.raises(ValueError, match="batches is empty"):
        qj.train.evaluate(model, [])
    with pytest.raises(ValueError, match="no token with a non-zero weight"):
        qj.train.evaluate(model, [dict(batch, weights=np.zeros_like(batch["weights"]))])

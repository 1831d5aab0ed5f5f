"""Linen layers, `convert_params` + `qlora_interceptor`, and the optax mask, each against an independent reference.

(1) a fresh adapter (B = 0) leaves the outputs bit-identical (quantized base
recomputed with `qmatmul`, and the original float model with quant=None);
(2) unmodified Linen models (an MLP, a transformer block, a scanned stack)
converted and trained with `masked(optax.adamw(...))`: the adapters train,
nothing else moves, and the optimizer state holds 2 x M float32 moments; (3)
scaling and dropout placement as a real PEFT LoRA layer; (4) bad input raises
errors that name the thing.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qlora_jax as qj
from qlora_jax.linen import (
    FROZEN,
    LoraConfig,
    QLoRADense,
    QLoRADenseGeneral,
    QuantConfig,
    convert_params,
    dense_layers,
    lora_mask,
    masked,
    qlora_interceptor,
)

D, HIDDEN, VOCAB = 64, 128, 97


class TinyMLP(nn.Module):
    """Plain nn.Dense layers; its source knows nothing of QLoRA."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(HIDDEN, name="up")(x)
        x = x + nn.Dense(D, name="down")(jax.nn.gelu(h))
        return nn.Dense(8, name="head")(x)


class GatedMLP(nn.Module):
    @nn.compact
    def __call__(self, h):
        gate, up = nn.Dense(HIDDEN, name="gate_proj")(h), nn.Dense(HIDDEN, name="up_proj")(h)
        return nn.Dense(D, name="down_proj")(jax.nn.silu(gate) * up)


class TinyTransformer(nn.Module):
    """Embedding, one pre-norm block (2-head causal attention, gated MLP), LM head; plain nn.Dense."""

    head_name: str = "lm_head"

    @nn.compact
    def __call__(self, tokens):  # [batch, seq] -> [batch, seq, vocab]
        x = nn.Embed(VOCAB, D, name="embed")(tokens)  # [b, s, d]
        h = nn.LayerNorm(name="norm1")(x)
        b, s, _ = h.shape
        q, k, v = (nn.Dense(D, use_bias=False, name=n)(h).reshape(b, s, 2, D // 2)
                   for n in ("q_proj", "k_proj", "v_proj"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / np.sqrt(D // 2))  # [b, heads, s, s]
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -1e9)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, s, D)
        x = x + nn.Dense(D, name="o_proj")(attn)
        x = x + GatedMLP(name="mlp")(nn.LayerNorm(name="norm2")(x))
        return nn.Dense(VOCAB, name=self.head_name)(x)


QUANTIZED = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]


# Inputs and params come from numpy: eager jax.random calls and jitted inits compile a program per shape,
# which would dominate this file's run time.


def _tokens(seed=0, shape=(2, 12)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * np.float32(scale))


def _random_params(model, *args, seed=0):
    """Params of `model` with random values (kernels ~ N(0, 1/fan_in), LayerNorm scales ~ 1)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        x = rng.standard_normal(s.shape).astype(np.float32)
        if len(s.shape) >= 2:
            return jnp.asarray(x / np.float32(np.sqrt(s.shape[-2])))
        return jnp.asarray(x * np.float32(0.1) + np.float32(path[-1].key == "scale"))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _at(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _run(model, variables, *args, quant, lora, deterministic=None, rngs=None):
    with nn.intercept_methods(qlora_interceptor(quant=quant, lora=lora, deterministic=deterministic)):
        return model.apply(variables, *args, rngs=rngs)


def _jitted(model, *, quant, lora, deterministic=None):
    """`run(variables, x, dropout_key)`: the model under the interceptor, jitted (the interceptor is entered
    inside the traced function, where it acts)."""

    @jax.jit
    def run(variables, x, key):
        return _run(model, variables, x, quant=quant, lora=lora, deterministic=deterministic, rngs={"dropout": key})

    return run


@pytest.fixture(scope="module")
def transformer():
    model, tokens = TinyTransformer(), _tokens()
    return model, tokens, _random_params(model, tokens)


def _leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


# -- (1) a fresh adapter changes nothing -------------------------------------------------------


def test_fresh_adapter_is_bit_identical_to_the_quantized_model(transformer):
    model, tokens, params = transformer
    quant, lora = QuantConfig(), LoraConfig(rank=4, dropout=0.1)
    qvars, qrep = convert_params(params, quant=quant, lora=None)
    lvars, rep = convert_params(params, quant=quant, lora=lora, rng=jax.random.key(1))
    # Every Dense but the head is quantized, with the same codes either way; "all-linear" adapts them all.
    assert sorted(qrep.paths) == sorted(rep.paths) == sorted(QUANTIZED)
    assert [r.layer for r in qrep.layers] == ["QuantDense"] * 7 and [r.layer for r in rep.layers] == ["QLoRADense"] * 7
    assert ("lm_head", "output head (named 'lm_head')") in rep.skipped and "kernel" in lvars["params"]["lm_head"]
    for a, b in zip(_leaves(qvars[FROZEN]), _leaves(lvars[FROZEN]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "kernel" in params["q_proj"]  # the input tree is not modified
    # B = 0: bit-identical logits, with dropout active on the adapter input.
    quantized = _jitted(model, quant=quant, lora=None)(qvars, tokens, jax.random.key(2))
    qlora = _jitted(model, quant=quant, lora=lora, deterministic=False)(lvars, tokens, jax.random.key(2))
    np.testing.assert_array_equal(qlora, quantized)

    # Independent reference: the original model (no interceptor) with each kernel replaced by its dequantization.
    reference = jax.tree.map(lambda x: x, params)
    for path in QUANTIZED:
        _at(reference, path)["kernel"] = qj.dequantize(_at(qvars[FROZEN], path)["kernel"], jnp.float32)
    apply = jax.jit(model.apply)
    ref = apply({"params": reference}, tokens)
    np.testing.assert_allclose(quantized, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    assert not np.allclose(apply({"params": params}, tokens), ref, atol=1e-3)  # quantization changed it


@pytest.mark.parametrize("targets, adapted", [
    (("q_proj", "v_proj"), {"q_proj", "v_proj"}),
    (r"mlp/.*_proj", {"mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"}),
    (r"(q|o)_proj|mlp/down_proj", {"q_proj", "o_proj", "mlp/down_proj"}),
])
def test_targets_select_layers_and_the_rest_is_quantized_only(transformer, targets, adapted):
    model, tokens, params = transformer
    variables, rep = convert_params(params, quant=QuantConfig(), lora=LoraConfig(rank=4, targets=targets),
                                    rng=jax.random.key(1))
    assert sorted(rep.paths) == sorted(QUANTIZED)
    assert {r.path for r in rep.layers if r.layer == "QLoRADense"} == adapted
    assert {p for p in QUANTIZED if "lora_a" in _at(variables["params"], p)} == adapted
    assert all("kernel" not in _at(variables["params"], p) for p in QUANTIZED)


def test_fresh_adapter_mlp_is_bit_identical_to_qmatmul_by_hand():
    model, x = TinyMLP(), _normal(3, (4, D))
    params = _random_params(model, x)
    quant, lora = QuantConfig(fmt="nf4", block_size=64), LoraConfig(rank=4, alpha=8)
    variables, report = convert_params(params, quant=quant, lora=lora, rng=jax.random.key(1))
    assert sorted(report.paths) == ["down", "up"] and report.skipped == (("head", "output head (named 'head')"),)
    q = {name: variables[FROZEN][name]["kernel"] for name in ("up", "down")}
    for name in q:  # the same codes and scales as quantizing the kernel directly
        for a, b in zip(_leaves(q[name]), _leaves(qj.quantize(params[name]["kernel"], "nf4", 64, True)), strict=True):
            np.testing.assert_array_equal(a, b)

    @jax.jit
    def by_hand(x, q, p):
        h = qj.qmatmul(x, q["up"]) + p["up"]["bias"][None]
        y = x + (qj.qmatmul(jax.nn.gelu(h), q["down"]) + p["down"]["bias"][None])
        return y @ p["head"]["kernel"] + p["head"]["bias"][None]

    ours = _jitted(model, quant=quant, lora=lora)(variables, x, jax.random.key(0))
    np.testing.assert_array_equal(ours, by_hand(x, q, params))


@pytest.mark.parametrize("head, reason", [("output", "named 'output'"),
                                          ("proj_out", "out=97 is an embedding's vocabulary size")])
def test_output_head_is_left_alone_unless_targeted(head, reason):
    params = _random_params(TinyTransformer(head_name=head), _tokens())
    _, report = convert_params(params, quant=QuantConfig(), lora=LoraConfig(rank=2), rng=jax.random.key(1))
    assert head not in report.paths and report.skipped == ((head, f"output head ({reason})"),)
    _, report = convert_params(params, quant=None, lora=LoraConfig(rank=2, targets=[head]), rng=jax.random.key(1))
    assert report.paths == (head,) and report.skipped == ()


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "down_proj")])
def test_fresh_float_lora_is_bit_identical_to_the_original_model(transformer, targets):
    model, tokens, params = transformer
    expected = model.apply({"params": params}, tokens)
    lora = LoraConfig(rank=4, targets=targets)
    variables, report = convert_params(params, quant=None, lora=lora, rng=jax.random.key(1))
    assert all(r.layer == "QLoRADense" and not r.quantized for r in report.layers)
    assert all(r.bytes_after == r.bytes_before + 4 * r.lora_params for r in report.layers)
    assert variables[FROZEN]["q_proj"]["kernel"] is params["q_proj"]["kernel"]  # moved as is, not copied
    if targets != "all-linear":  # the others stay float kernels in params
        assert "kernel" in variables["params"]["k_proj"] and "lora_a" in variables["params"]["mlp"]["down_proj"]
    np.testing.assert_array_equal(_run(model, variables, tokens, quant=None, lora=lora), expected)  # eager


@pytest.mark.parametrize("general", [False, True])
def test_layers_draw_the_same_weights_as_flax_and_match_a_reference(general):
    x = _normal(3, (2, 3, 4, 64))
    if general:  # contracts the last two axes: kernel (4, 64, 4, 16)
        flax_layer, n_in, features = nn.DenseGeneral((4, 16), axis=(-2, -1)), 2, (4, 16)
        make = lambda **kw: QLoRADenseGeneral((4, 16), axis=(-2, -1), **kw)  # noqa: E731
    else:
        flax_layer, n_in, features = nn.Dense(D), 1, (D,)
        make = lambda **kw: QLoRADense(D, **kw)  # noqa: E731
    lora = LoraConfig(rank=4, alpha=8, dropout=0.1)
    float_layer = make(quant=None, lora=lora, deterministic=False)
    layer = make(quant=QuantConfig(), lora=lora)
    layer16 = make(quant=QuantConfig(compute_dtype=jnp.bfloat16), lora=lora)  # same variables, bfloat16 matmuls

    @jax.jit
    def init_all(key, x):  # one program instead of three
        return flax_layer.init(key, x)["params"], float_layer.init(key, x), layer.init(key, x, deterministic=True)

    @jax.jit
    def apply_all(expected, fvars, qvars, x, key):
        return (flax_layer.apply({"params": expected}, x), float_layer.apply(fvars, x, rngs={"dropout": key}),
                layer.apply(qvars, x, deterministic=True), layer16.apply(qvars, x, deterministic=True))

    expected, fvars, variables = init_all(jax.random.key(0), x)
    # quant=None: the same kernel and bias as the flax layer, and the same output (fresh adapter, dropout on).
    np.testing.assert_array_equal(fvars[FROZEN]["kernel"], expected["kernel"])
    np.testing.assert_array_equal(fvars["params"]["bias"], expected["bias"])
    # Quantized: the kernel quantized along its input axes; the output against a float64 reference.
    q = variables[FROZEN]["kernel"]
    own = qj.quantize(expected["kernel"], "nf4", 64, True, contract_axes=tuple(range(n_in)))
    for a, b in zip(_leaves(q), _leaves(own), strict=True):
        np.testing.assert_array_equal(a, b)
    params = dict(variables["params"], lora_b=_normal(4, variables["params"]["lora_b"].shape))
    y_flax, y_float, y, y16 = apply_all(expected, fvars, {"params": params, FROZEN: variables[FROZEN]}, x,
                                   jax.random.key(1))
    np.testing.assert_array_equal(y_float, y_flax)
    lead = x.shape[: x.ndim - n_in]
    x64 = np.asarray(x, np.float64).reshape(*lead, -1)  # [..., in]: the contracted axes are trailing
    w = np.asarray(qj.dequantize(q, jnp.float32), np.float64).reshape(x64.shape[-1], -1)
    assert params["lora_a"].shape == (*x.shape[x.ndim - n_in:], 4) and params["lora_b"].shape == (4, *features)
    a, b = (np.asarray(params[n], np.float64).reshape(s) for n, s in (("lora_a", (-1, 4)), ("lora_b", (4, -1))))
    ref = (x64 @ w + np.asarray(params["bias"]).reshape(-1) + x64 @ a @ b * 2.0).reshape(*lead, *features)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), ref, rtol=0.05, atol=0.05 * np.abs(ref).max())


# -- (2) training the adapters of unmodified models -------------------------------------------------


def _mlp_loss(y, batch):
    return jnp.mean((y - batch[1]) ** 2)


def _lm_loss(logits, batch):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))


@pytest.mark.parametrize("which", ["mlp", "transformer"])
def test_masked_adamw_trains_adapters_only(transformer, which):
    if which == "mlp":
        model, loss_of = TinyMLP(), _mlp_loss
        batch = (_normal(1, (16, D)), _normal(2, (16, 8)))
        inputs = batch[0]
        params = _random_params(model, inputs)
    else:
        model, _, params = transformer
        loss_of, batch = _lm_loss, _tokens(1, (4, 16))
        inputs = batch[:, :-1]
    quant, lora = QuantConfig(), LoraConfig(rank=4, alpha=8, dropout=0.05)
    variables, report = convert_params(params, quant=quant, lora=lora, rng=jax.random.key(1))
    params, frozen = variables["params"], variables[FROZEN]
    packed = _leaves(frozen)
    mask = lora_mask(params)
    base_before = [np.asarray(p) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if not m]
    lora_before = [np.asarray(p) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m]
    assert len(lora_before) == 2 * len(report.layers)
    tx = masked(optax.adamw(1e-2), params)

    def loss_fn(params, frozen, key):
        with nn.intercept_methods(qlora_interceptor(quant=quant, lora=lora, deterministic=False)):
            out = model.apply({"params": params, FROZEN: frozen}, inputs, rngs={"dropout": key})
        return loss_of(out, batch)

    @jax.jit
    def step(params, frozen, opt_state, key):  # frozen: an argument, not a constant baked into the program
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, key)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction computes float ** int32
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(params)
    losses = []
    for i in range(6):
        params, opt_state, loss = step(params, frozen, opt_state, jax.random.key(10 + i))
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    for a, b in zip(packed, _leaves(frozen), strict=True):
        np.testing.assert_array_equal(a, b)  # codes and scales bit-identical
    base_after = [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if not m]
    lora_after = [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m]
    for a, b in zip(base_before, base_after, strict=True):
        np.testing.assert_array_equal(a, b)  # biases, norms, embedding, head: untouched
    assert all(not np.array_equal(a, b) for a, b in zip(lora_before, lora_after, strict=True))
    # Optimizer state: two float32 moments per adapter element, plus integer counts; nothing for base weights.
    leaves = jax.tree.leaves(opt_state)
    floats = [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert all(leaf.dtype == jnp.float32 for leaf in floats)
    assert sum(leaf.size for leaf in floats) == 2 * report.lora_params
    assert all(jnp.issubdtype(leaf.dtype, jnp.integer) and leaf.size == 1 for leaf in leaves
               if not jnp.issubdtype(leaf.dtype, jnp.floating))


def test_optax_masked_alone_allocates_nothing_but_does_not_freeze():
    """Why `masked` partitions: `optax.masked` keeps no state for masked-out leaves (empty MaskedNodes), but
    passes their raw gradient through as the update; `masked` zeroes it."""
    params = {"fc": {"bias": jnp.zeros(4), "lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 4))}}
    grads = jax.tree.map(jnp.ones_like, params)
    with jax.numpy_dtype_promotion("standard"):
        plain = optax.masked(optax.adamw(0.1), lora_mask(params))
        state = plain.init(params)
        assert sum(leaf.size for leaf in jax.tree.leaves(state) if leaf.dtype == jnp.float32) == 2 * (16 + 8)
        updates, _ = plain.update(grads, state, params)
        assert float(updates["fc"]["bias"][0]) == 1.0  # the raw gradient, not frozen
        ours = masked(optax.adamw(0.1), params)
        updates, _ = ours.update(grads, ours.init(params), params)
        lazy = masked(optax.adamw(0.1))  # mask taken from the tree at init / update
        lazy_updates, _ = lazy.update(grads, lazy.init(params), params)
    assert not np.asarray(updates["fc"]["bias"]).any() and np.asarray(updates["fc"]["lora_a"]).all()
    for a, b in zip(_leaves(updates), _leaves(lazy_updates), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mask_works_on_an_nnx_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(D, D, rngs=rngs)
            self.head = nnx.Linear(D, 4, rngs=rngs)

    model = qj.apply_qlora(Net(nnx.Rngs(0)), quant=QuantConfig(), lora=LoraConfig(rank=4), rngs=nnx.Rngs(1))
    report = qj.qlora_report(model)
    state = nnx.state(model, nnx.Param)
    assert jax.tree.leaves(lora_mask(state)) == [False, True, True, False, False]  # fc/bias, fc/lora_*, head/*
    tx = masked(optax.adamw(1e-2), state)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(state)
    assert sum(leaf.size for leaf in jax.tree.leaves(opt_state) if leaf.dtype == jnp.float32) == 2 * report.lora_params


class ScannedStack(nn.Module):
    """Three blocks (a DenseGeneral q projection and a Dense) stacked by nn.scan; "frozen" is scanned too."""

    collections: tuple = ("params", FROZEN)

    @nn.compact
    def __call__(self, x):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                h = nn.DenseGeneral((2, D // 2), name="q")(x)  # [b, 2, d/2]
                return jnp.tanh(nn.Dense(D, name="fc")(h.reshape(*h.shape[:-2], D))), None

        stack = nn.scan(Block, variable_axes={c: 0 for c in self.collections}, split_rngs={"params": True}, length=3)
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(8, name="head")(x)


def test_scanned_stack_and_dense_general_found_by_tracing():
    model, x = ScannedStack(), _normal(3, (4, D))
    layers = dense_layers(model, x)
    assert [(d.path, d.kind, d.kernel_shape, d.stack_shape) for d in layers] == [
        ("blocks/q", "DenseGeneral", (3, D, 2, D // 2), (3,)), ("blocks/fc", "Dense", (3, D, D), (3,)),
        ("head", "Dense", (D, 8), ())]
    params = _random_params(model, x)
    lora = LoraConfig(rank=4, alpha=8)
    variables, report = convert_params(params, quant=QuantConfig(), lora=lora, rng=jax.random.key(1), layers=layers)
    assert report.paths == ("blocks/q", "blocks/fc") and report.lora_params == 2 * 3 * (D * 4 + 4 * D)
    fz, p = variables[FROZEN]["blocks"], variables["params"]["blocks"]
    assert fz["q"]["kernel"].stack_shape == (3,) and p["q"]["lora_a"].shape == (3, D, 4)
    assert p["q"]["lora_b"].shape == (3, 4, 2, D // 2)  # [*stack, r, *features]
    p["fc"]["lora_b"] = _normal(2, p["fc"]["lora_b"].shape, 0.1)
    y = _jitted(model, quant=QuantConfig(), lora=lora)(variables, x, jax.random.key(0))
    h = np.asarray(x, np.float64)  # per-layer reference, each layer quantized on its own
    for i in range(3):
        own = {n: qj.quantize(params["blocks"][n]["kernel"][i], "nf4", 64, True,
                              contract_axes=(0,)) for n in ("q", "fc")}
        wq, wf = (np.asarray(qj.dequantize(own[n], jnp.float32), np.float64).reshape(D, D) for n in ("q", "fc"))
        bq, bf = (np.asarray(params["blocks"][n]["bias"][i], np.float64).reshape(D) for n in ("q", "fc"))
        a, b = np.asarray(p["fc"]["lora_a"][i], np.float64), np.asarray(p["fc"]["lora_b"][i], np.float64)
        g = h @ wq + bq
        h = np.tanh(g @ wf + bf + g @ a @ b * 2.0)
    expected = h @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(params["head"]["bias"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # Without "frozen" in variable_axes the scanned layers cannot see their kernels: a clear error.
    with pytest.raises(ValueError, match=r"blocks/q: this DenseGeneral has no kernel, neither in 'params' nor in "
                                         r"'frozen'.*listed in variable_axes"):
        _run(ScannedStack(collections=("params",)), variables, x, quant=QuantConfig(), lora=lora)


# -- (3) PEFT semantics -------------------------------------------------------------------------


def _peft_linear(in_features, out_features, **lora_kwargs):
    """A tiny torch module with one Linear `fc`, wrapped by PEFT; returns (peft model, its LoraLayer)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(in_features, out_features)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(target_modules=["fc"], **lora_kwargs))
    return model, model.base_model.model.fc


class OneDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, name="fc")(x)


def _ours_from_peft(layer, lora, how):
    """`(apply(x, deterministic, key), variables)` running PEFT's base weight, bias, A and B in our Linen code:
    `how="interceptor"` converts an unmodified nn.Dense, `how="layer"` uses QLoRADense(quant=None)."""
    w = layer.base_layer.weight.detach().numpy()  # [out, in]
    a, b = (getattr(layer, n)["default"].weight.detach().numpy().T for n in ("lora_A", "lora_B"))
    params = {"fc": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(layer.base_layer.bias.detach().numpy())}}
    if how == "interceptor":
        variables, _ = convert_params(params, quant=None, lora=lora, rng=jax.random.key(1))
        variables["params"]["fc"].update(lora_a=jnp.asarray(a), lora_b=jnp.asarray(b))

        def apply(x, deterministic, key):
            return _run(OneDense(w.shape[0]), variables, x, quant=None, lora=lora, deterministic=deterministic,
                        rngs={"dropout": key})
    else:
        variables = {"params": {"bias": params["fc"]["bias"], "lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)},
                     FROZEN: {"kernel": params["fc"]["kernel"]}}
        layer = QLoRADense(w.shape[0], quant=None, lora=lora)

        def apply(x, deterministic, key):
            return layer.apply(variables, x, deterministic=deterministic, rngs={"dropout": key})
    return apply


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("how", ["interceptor", "layer"])
def test_eval_output_and_scaling_match_peft(rslora, how):
    torch = pytest.importorskip("torch")
    peft_model, layer = _peft_linear(64, 48, r=8, lora_alpha=16, lora_dropout=0.2, use_rslora=rslora)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    peft_model.eval()
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(x)).numpy()
    lora = LoraConfig(rank=8, alpha=16, dropout=0.2, targets=["fc"], rslora=rslora)
    assert lora.scale == layer.scaling["default"] == (16 / np.sqrt(8) if rslora else 2.0)
    apply = _ours_from_peft(layer, lora, how)
    np.testing.assert_allclose(apply(jnp.asarray(x), True, jax.random.key(0)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["interceptor", "layer"])
def test_dropout_applies_to_the_adapter_input_only(how):
    """With A = B = I (in = r = out), `y - base(x) = s * dropout(x)`: every element is 0 or s * x / keep,
    in our layer and in PEFT's; deterministic gives exactly s * x."""
    torch = pytest.importorskip("torch")
    n, rate, alpha = 8, 0.5, 16
    peft_model, layer = _peft_linear(n, n, r=n, lora_alpha=alpha, lora_dropout=rate)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(n))
        layer.lora_B["default"].weight.copy_(torch.eye(n))
    apply = _ours_from_peft(layer, LoraConfig(rank=n, alpha=alpha, dropout=rate, targets=["fc"]), how)
    rng = np.random.default_rng(0)
    x = (rng.uniform(0.5, 1.5, (64, n)) * rng.choice([-1, 1], (64, n))).astype(np.float32)
    w, b = layer.base_layer.weight.detach().numpy().astype(np.float64), layer.base_layer.bias.detach().numpy()
    base = x.astype(np.float64) @ w.T + b
    scale = alpha / n
    peft_model.train()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(x)).numpy() - base
    train1 = np.asarray(apply(jnp.asarray(x), False, jax.random.key(0))) - base
    train2 = np.asarray(apply(jnp.asarray(x), False, jax.random.key(1))) - base
    for delta in (theirs, train1, train2):
        dropped = np.abs(delta) < 1e-5
        kept = np.abs(delta - scale * x / (1 - rate)) < 1e-5
        assert np.all(dropped | kept)
        assert 0.3 < dropped.mean() < 0.7  # about `rate` of the adapter input is dropped
    assert not np.array_equal(np.abs(train1) < 1e-5, np.abs(train2) < 1e-5)  # the mask follows the rng
    np.testing.assert_allclose(np.asarray(apply(jnp.asarray(x), True, jax.random.key(0))) - base, scale * x,
                               atol=1e-5)


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_adapter_init_follows_peft(init):
    n_in, rank = 1024, 32
    params = {"fc": {"kernel": jnp.zeros((n_in, 16))}}
    variables, _ = convert_params(params, quant=None, lora=LoraConfig(rank=rank, init=init), rng=jax.random.key(0))
    a, b = (np.asarray(variables["params"]["fc"][n]) for n in ("lora_a", "lora_b"))
    assert a.shape == (n_in, rank) and a.dtype == np.float32 and not b.any() and b.shape == (rank, 16)
    if init == "default":  # U(-1/sqrt(in), 1/sqrt(in))
        assert 0.99 / np.sqrt(n_in) < np.abs(a).max() <= 1 / np.sqrt(n_in)
        expected_std = 1 / np.sqrt(n_in) / np.sqrt(3)
    else:  # N(0, (1/r)^2)
        expected_std = 1 / rank
    assert abs(a.std() / expected_std - 1) < 0.02


# -- (4) bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), r"LoraConfig.rank: must be a positive integer, got 0"),
    (dict(rank=-2), r"LoraConfig.rank: must be a positive integer, got -2"),
    (dict(alpha=0), r"LoraConfig.alpha: must be a positive number, got 0"),
    (dict(alpha=-1.0), r"LoraConfig.alpha"),
    (dict(dropout=1.0), r"LoraConfig.dropout: must lie in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"LoraConfig.dropout"),
])
def test_bad_lora_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


class WithOddLayer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D, name="embed")(tokens)
        x = nn.Dense(D, name="fc")(x)
        return nn.Dense(D, name="odd")(jnp.concatenate([x, x[..., :36]], axis=-1))  # kernel (100, 64)


@pytest.fixture(scope="module")
def odd_params():
    return _random_params(WithOddLayer(), _tokens())


@pytest.mark.parametrize("targets, match", [
    (["nope"], r"no layer is named 'nope'.*available Dense paths: fc, odd"),
    (r"blocks/.*", r"regex 'blocks/\.\*' matches no layer path.*available Dense paths: fc, odd"),
    (["embed"], r"embed is not a Dense layer \(its params: embedding\).*available Dense paths: fc, odd"),
])
def test_targets_that_match_no_dense_layer_list_the_available_ones(odd_params, targets, match):
    with pytest.raises(ValueError, match=match):
        convert_params(odd_params, quant=None, lora=LoraConfig(targets=targets), rng=jax.random.key(1))


def test_unaligned_kernels_are_quantized_in_flat_layout(odd_params):
    """Input size 100 with blocks of 64: blocks cross rows, as bitsandbytes stores them (more in
    tests/test_unaligned_shapes.py)."""
    variables, report = convert_params(odd_params, quant=QuantConfig(), lora=LoraConfig(targets=["fc", "odd"]),
                                       rng=jax.random.key(1))
    assert report.paths == ("fc", "odd")
    q = variables["frozen"]["odd"]["kernel"]
    assert not q.row_layout and q.codes.shape == (100 * 64 // 2,)
    shapes = jax.eval_shape(QLoRADense(64).init, jax.random.key(0), jnp.ones((1, 100)))
    assert shapes["frozen"]["kernel"].shape == (100, 64)


def test_bad_arguments(odd_params):
    with pytest.raises(ValueError, match=r"quant and lora are both None"):
        convert_params(odd_params, quant=None, lora=None)
    with pytest.raises(TypeError, match=r"rng: a PRNG key is needed"):
        convert_params(odd_params, quant=None, lora=LoraConfig())
    with pytest.raises(TypeError, match=r"quant: expected a QuantConfig"):
        convert_params(odd_params, quant={"fmt": "nf4"}, lora=None)
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        convert_params({"params": odd_params}, quant=None, lora=LoraConfig(), rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"LoraConfig.dropout=0.1 needs deterministic=True"):
        qlora_interceptor(quant=None, lora=LoraConfig(dropout=0.1))
    with pytest.raises(TypeError, match=r"QLoRADense: lora must be a LoraConfig or None"):
        jax.eval_shape(QLoRADense(8, lora={"rank": 4}).init, jax.random.key(0), jnp.ones((1, 64)))
    with pytest.raises(ValueError, match=r'"deterministic" must be passed'):
        jax.eval_shape(QLoRADense(8, lora=LoraConfig(dropout=0.1)).init, jax.random.key(0), jnp.ones((1, 64)))


def test_unsupported_dense_layers_are_refused_as_targets_and_by_the_interceptor():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(D, name="fc")(x)
            return nn.Dense(D, dot_general=jax.lax.dot_general, name="custom")(x)

    model, x = Custom(), jnp.ones((2, D))
    layers = dense_layers(model, x)
    assert [d.unsupported for d in layers] == [None, "it has a custom dot_general"]
    params = _random_params(model, x)
    with pytest.raises(ValueError, match=r"custom cannot be converted: it has a custom dot_general"):
        convert_params(params, quant=None, lora=LoraConfig(targets=["custom"]), rng=jax.random.key(1), layers=layers)
    variables, report = convert_params(params, quant=QuantConfig(), lora=LoraConfig(), rng=jax.random.key(1),
                                       layers=layers)
    assert report.paths == ("fc",) and ("custom", "it has a custom dot_general") in report.skipped
    # Found from the params alone, the custom layer is converted; running it is refused with its path.
    variables, _ = convert_params(params, quant=QuantConfig(), lora=None)
    with pytest.raises(ValueError, match=r"custom: its kernel is in the 'frozen' collection, but qlora_interceptor "
                                         r"cannot compute it: it has a custom dot_general"):
        jax.eval_shape(lambda: _run(model, variables, x, quant=QuantConfig(), lora=None))  # raised while tracing

"""NNX layers and `apply_qlora`: each property checked against an independent reference.

(1) a fresh adapter (B = 0) leaves the outputs bit-identical (quantized base,
and the original float model with quant=None); (2) `nnx.Optimizer(...,
wrt=nnx.LoRAParam)` trains the adapters only; (3) init, scaling and dropout
placement as PEFT; (4) the compiled gradient step of a scanned stack keeps no
dequantized weights; (5) bad input raises errors that name the thing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qlora_jax as qj
from qlora_jax._src.config import LoraConfig, QuantConfig
from qlora_jax._src.nn import FrozenWeight, QLoRALinear, QuantizedWeight, QuantLinear, lora_delta
from qlora_jax._src.surgery import apply_qlora, qlora_report

D, HIDDEN, VOCAB = 64, 128, 97


class TinyMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, D, rngs=rngs)
        self.head = nnx.Linear(D, 8, rngs=rngs)

    def __call__(self, x):
        return self.head(x + self.down(jax.nn.gelu(self.up(x))))


class TinyTransformer(nnx.Module):
    """Embedding, one pre-norm block (2-head causal attention, gated MLP), LM head."""

    def __init__(self, rngs: nnx.Rngs, head_name: str = "lm_head"):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.norm1 = nnx.LayerNorm(D, rngs=rngs)
        self.q_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(D, D, rngs=rngs)
        self.norm2 = nnx.LayerNorm(D, rngs=rngs)
        self.mlp = nnx.Dict(gate_proj=nnx.Linear(D, HIDDEN, rngs=rngs), up_proj=nnx.Linear(D, HIDDEN, rngs=rngs),
                            down_proj=nnx.Linear(HIDDEN, D, rngs=rngs))
        self.head_name = head_name
        setattr(self, head_name, nnx.Linear(D, VOCAB, rngs=rngs))

    def __call__(self, tokens):  # [batch, seq] -> [batch, seq, vocab]
        x = self.embed(tokens)  # [b, s, d]
        h = self.norm1(x)
        b, s, _ = h.shape
        q, k, v = (p(h).reshape(b, s, 2, D // 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / np.sqrt(D // 2))  # [b, heads, s, s]
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -1e9)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, s, D)
        x = x + self.o_proj(attn)
        h = self.norm2(x)
        x = x + self.mlp["down_proj"](jax.nn.silu(self.mlp["gate_proj"](h)) * self.mlp["up_proj"](h))
        return getattr(self, self.head_name)(x)


def _tokens(seed=0, shape=(2, 12)):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


# Params that are not adapters: biases, norms, embeddings, heads.
_BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def _kernels(model, variable_type):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, variable_type))]


def _at(model, path):
    """The submodule at a '/'-joined path."""
    for key in path.split("/"):
        model = model[key] if isinstance(model, nnx.Dict) else getattr(model, key)
    return model


# -- (1) a fresh adapter changes nothing -------------------------------------------------


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj"), r"mlp/.*_proj"])
def test_fresh_adapter_is_bit_identical_to_the_quantized_model(targets):
    base = TinyTransformer(nnx.Rngs(0))
    tokens = _tokens()
    quantized = apply_qlora(nnx.clone(base), quant=QuantConfig(), lora=None)
    qrep = qlora_report(quantized)
    qlora = apply_qlora(nnx.clone(base), quant=QuantConfig(), lora=LoraConfig(rank=4, dropout=0.1,
                                                                             targets=targets), rngs=nnx.Rngs(1))
    rep = qlora_report(qlora)
    # Every Linear but the head is quantized either way, with the same codes.
    expected_quantized = ["k_proj", "mlp/down_proj", "mlp/gate_proj", "mlp/up_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(qrep.paths) == sorted(rep.paths) == expected_quantized
    assert [r.layer for r in qrep.layers] == ["QuantLinear"] * 7
    adapted = {r.path for r in rep.layers if r.layer == "QLoRALinear"}
    assert adapted == {"all-linear": set(expected_quantized), ("q_proj", "v_proj"): {"q_proj", "v_proj"},
                       r"mlp/.*_proj": {"mlp/down_proj", "mlp/gate_proj", "mlp/up_proj"}}[targets]
    assert type(qlora.lm_head) is nnx.Linear and ("lm_head", "output head (named 'lm_head')") in rep.skipped
    for a, b in zip(_kernels(quantized, QuantizedWeight), _kernels(qlora, QuantizedWeight), strict=True):
        np.testing.assert_array_equal(a, b)
    # B = 0: bit-identical logits, with dropout active (train mode) on the adapter input.
    qlora.train()
    np.testing.assert_array_equal(qlora(tokens), quantized(tokens))

    # Independent reference: the original float model with each kernel replaced by its dequantization.
    reference = nnx.clone(base)
    for path in expected_quantized:
        _at(reference, path).kernel[...] = qj.dequantize(_at(quantized, path).kernel.get_value(), jnp.float32)
    ref = reference(tokens)
    np.testing.assert_allclose(quantized(tokens), ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    assert not np.allclose(base(tokens), ref, atol=1e-3)  # quantization really changed the weights


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "down_proj")])
def test_fresh_float_lora_is_bit_identical_to_the_original_model(targets):
    base = TinyTransformer(nnx.Rngs(0))
    tokens = _tokens()
    expected = base(tokens)
    model = apply_qlora(base, quant=None, lora=LoraConfig(rank=4, targets=targets), rngs=nnx.Rngs(1))
    report = qlora_report(model)
    assert model is base  # in place
    assert all(r.layer == "QLoRALinear" and not r.quantized for r in report.layers)
    assert all(r.bytes_after == r.bytes_before + 4 * r.lora_params for r in report.layers)
    if targets != "all-linear":  # the others stay float nnx.Linear, and the report says why
        assert type(model.k_proj) is nnx.Linear and type(model.mlp["down_proj"]) is QLoRALinear
        assert ("k_proj", "float Linear, not a LoRA target") in report.skipped
        assert report.paths == ("mlp/down_proj", "q_proj")
    assert qlora_report(nnx.clone(model)) == report  # read from the model alone
    assert isinstance(model.q_proj.kernel, FrozenWeight) and not isinstance(model.q_proj.kernel, nnx.Param)
    np.testing.assert_array_equal(model(tokens), expected)


def test_qlora_layer_matches_quant_layer_and_reference():
    kernel = jax.random.normal(jax.random.key(0), (128, 32)) * 0.1
    bias = jax.random.normal(jax.random.key(1), (32,))
    q = qj.quantize(kernel, "nf4", 64, double_quant=True)
    x = jax.random.normal(jax.random.key(2), (3, 5, 128))
    layer = QLoRALinear(q, bias, lora=LoraConfig(rank=4, alpha=8, dropout=0.5), rngs=nnx.Rngs(0))
    base = QuantLinear(q, bias)
    np.testing.assert_array_equal(layer(x), base(x))  # dropout active, B = 0
    ref = np.asarray(x, np.float64) @ np.asarray(qj.dequantize(q), np.float64) + np.asarray(bias, np.float64)
    np.testing.assert_allclose(base(x), ref, rtol=1e-5, atol=1e-5)
    # A nonzero B: y = base + (x A B) * alpha / r.
    layer.lora_b[...] = jax.random.normal(jax.random.key(3), (4, 32))
    layer.eval()
    a, b = np.asarray(layer.lora_a[...], np.float64), np.asarray(layer.lora_b[...], np.float64)
    np.testing.assert_allclose(layer(x), ref + np.asarray(x, np.float64) @ a @ b * 2.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora_delta(x, layer.lora_a[...], layer.lora_b[...], 2.0),
                               np.asarray(x, np.float64) @ a @ b * 2.0, rtol=1e-5, atol=1e-5)
    # Compute dtype: bfloat16 in, bfloat16 out, float32 adapters.
    y16 = QLoRALinear(q, bias, lora=LoraConfig(rank=4, alpha=8), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x)
    assert y16.dtype == jnp.bfloat16 and layer.lora_a[...].dtype == jnp.float32


def test_output_head_detection():
    # Named heads.
    for name in ("lm_head", "head", "output"):
        rep = qlora_report(apply_qlora(TinyTransformer(nnx.Rngs(0), head_name=name), quant=QuantConfig(),
                                       lora=LoraConfig(rank=2), rngs=nnx.Rngs(1)))
        assert name not in rep.paths and rep.skipped[0][0] == name
    # Unnamed: the Linear whose output size is the embedding's vocabulary size.
    rep = qlora_report(apply_qlora(TinyTransformer(nnx.Rngs(0), head_name="unembed"), quant=QuantConfig(),
                                   lora=LoraConfig(rank=2), rngs=nnx.Rngs(1)))
    assert "unembed" not in rep.paths and rep.skipped == (
        ("unembed", f"output head (out={VOCAB} is an embedding's vocabulary size)"),)
    # An explicitly targeted head gets an adapter (and is quantized with it).
    model = apply_qlora(TinyMLP(nnx.Rngs(0)), quant=QuantConfig(), lora=LoraConfig(rank=2, targets=["head"]),
                        rngs=nnx.Rngs(1))
    rep = qlora_report(model)
    assert type(model.head) is QLoRALinear and type(model.up) is QuantLinear and rep.skipped == ()
    # Once converted, nothing is left for "all-linear".
    with pytest.raises(ValueError, match=r"'all-linear' matches no layer"):
        apply_qlora(model, quant=QuantConfig(), lora=LoraConfig(rank=2), rngs=nnx.Rngs(1))


class WithOtherKernels(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.conv = nnx.Conv(D, D, kernel_size=(3,), rngs=rngs)
        self.lora = nnx.LoRALinear(D, D, lora_rank=2, rngs=rngs)


def test_unsupported_layer_types_are_reported_and_refused_as_targets():
    model = apply_qlora(WithOtherKernels(nnx.Rngs(0)), quant=QuantConfig(), lora=LoraConfig(rank=2),
                        rngs=nnx.Rngs(1))
    rep = qlora_report(model)
    assert rep.paths == ("fc",) and type(model.conv) is nnx.Conv
    assert set(rep.skipped) == {("conv", "Conv is not supported"),
                                ("lora", "LoRALinear is not supported")}
    with pytest.raises(ValueError, match=r"conv is a Conv, which apply_qlora does not support"):
        apply_qlora(WithOtherKernels(nnx.Rngs(0)), quant=None, lora=LoraConfig(targets=["conv"]),
                    rngs=nnx.Rngs(1))


# -- (2) training touches the adapters only ---------------------------------------------


def _mlp_loss(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def _lm_loss(model, batch):
    logits = model(batch[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))


@pytest.mark.parametrize("which", ["mlp", "transformer"])
def test_optimizer_trains_adapters_only(which):
    if which == "mlp":
        model, loss_fn = TinyMLP(nnx.Rngs(0)), _mlp_loss
        batch = (jax.random.normal(jax.random.key(1), (16, D)), jax.random.normal(jax.random.key(2), (16, 8)))
    else:
        model, loss_fn = TinyTransformer(nnx.Rngs(0)), _lm_loss
        batch = _tokens(1, (4, 16))
    model = apply_qlora(model, quant=QuantConfig(), lora=LoraConfig(rank=4, alpha=8, dropout=0.05),
                        rngs=nnx.Rngs(1))
    report = qlora_report(model)
    model.train()
    packed = _kernels(model, QuantizedWeight)
    params = _kernels(model, _BASE_PARAMS)
    lora_before = _kernels(model, nnx.LoRAParam)
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt, batch):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
        opt.update(model, grads)
        return loss

    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction computes float ** int32
        losses = [float(step(model, opt, batch)) for _ in range(6)]
    assert losses[-1] < losses[0], losses
    for a, b in zip(packed, _kernels(model, QuantizedWeight), strict=True):
        np.testing.assert_array_equal(a, b)  # codes and scales bit-identical
    lora_after = _kernels(model, nnx.LoRAParam)
    assert len(lora_after) == 2 * len(report.layers)
    assert all(not np.array_equal(a, b) for a, b in zip(lora_before, lora_after, strict=True))
    for a, b in zip(params, _kernels(model, _BASE_PARAMS), strict=True):
        np.testing.assert_array_equal(a, b)  # biases, norms, embedding, head: untouched
    # Optimizer state: two float32 moments per adapter element, plus integer counts; nothing for base weights.
    leaves = jax.tree.leaves(nnx.state(opt))
    floats = [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert all(leaf.dtype == jnp.float32 for leaf in floats)
    assert sum(leaf.size for leaf in floats) == 2 * report.lora_params
    assert all(jnp.issubdtype(leaf.dtype, jnp.integer) and leaf.size == 1 for leaf in leaves
               if not jnp.issubdtype(leaf.dtype, jnp.floating))


# -- (3) PEFT semantics --------------------------------------------------------------------


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


class OneLinear(nnx.Module):
    def __init__(self, in_features, out_features, rngs):
        self.fc = nnx.Linear(in_features, out_features, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


def _ours_from_peft(layer, rank, alpha, dropout, rslora):
    """Our float-LoRA layer (quant=None) holding the PEFT layer's base weight, bias, A and B."""
    w = layer.base_layer.weight.detach().numpy()  # [out, in]
    model = OneLinear(w.shape[1], w.shape[0], nnx.Rngs(0))
    model.fc.kernel[...] = jnp.asarray(w.T)
    model.fc.bias[...] = jnp.asarray(layer.base_layer.bias.detach().numpy())
    model = apply_qlora(model, quant=None, lora=LoraConfig(rank=rank, alpha=alpha, dropout=dropout,
                                                           targets=["fc"], rslora=rslora), rngs=nnx.Rngs(1))
    model.fc.lora_a[...] = jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T)
    model.fc.lora_b[...] = jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T)
    return model


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_init_statistics_match_peft(init):
    n_in, rank = 1024, 32
    _, layer = _peft_linear(n_in, 16, r=rank, lora_alpha=rank, init_lora_weights=True if init == "default" else init)
    theirs = layer.lora_A["default"].weight.detach().numpy().T  # [in, r]
    assert not layer.lora_B["default"].weight.detach().numpy().any()
    ours = QLoRALinear(jnp.zeros((n_in, 16)), lora=LoraConfig(rank=rank, alpha=rank, init=init), rngs=nnx.Rngs(0))
    a = np.asarray(ours.lora_a[...])
    assert a.shape == theirs.shape and not np.asarray(ours.lora_b[...]).any()
    if init == "default":  # U(-1/sqrt(in), 1/sqrt(in)): std bound / sqrt(3)
        bound = 1 / np.sqrt(n_in)
        for sample in (a, theirs):
            assert np.abs(sample).max() <= bound and np.abs(sample).max() > 0.99 * bound
        expected_std = bound / np.sqrt(3)
    else:  # N(0, (1/r)^2)
        expected_std = 1 / rank
    for sample in (a, theirs):
        assert abs(sample.std() / expected_std - 1) < 0.02 and abs(sample.mean()) < 0.02 * expected_std
    assert abs(a.std() / theirs.std() - 1) < 0.03


@pytest.mark.parametrize("rslora", [False, True])
def test_eval_output_matches_peft(rslora):
    torch = pytest.importorskip("torch")
    peft_model, layer = _peft_linear(64, 48, r=8, lora_alpha=16, lora_dropout=0.2, use_rslora=rslora)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    peft_model.eval()
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(x)).numpy()
    ours = _ours_from_peft(layer, 8, 16, 0.2, rslora)
    assert ours.fc.scale == layer.scaling["default"] == (16 / np.sqrt(8) if rslora else 2.0)
    ours.eval()
    np.testing.assert_allclose(ours(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_dropout_applies_to_the_adapter_input_only():
    """With A = B = I (in = r = out), `y - base(x) = s * dropout(x)`: every element is 0 or
    s * x / keep, in our layer and in PEFT's; eval mode gives exactly s * x."""
    torch = pytest.importorskip("torch")
    n, rate, alpha = 8, 0.5, 16
    peft_model, layer = _peft_linear(n, n, r=n, lora_alpha=alpha, lora_dropout=rate)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(n))
        layer.lora_B["default"].weight.copy_(torch.eye(n))
    ours = _ours_from_peft(layer, n, alpha, rate, False)
    rng = np.random.default_rng(0)
    x = (rng.uniform(0.5, 1.5, (64, n)) * rng.choice([-1, 1], (64, n))).astype(np.float32)
    w, b = layer.base_layer.weight.detach().numpy().astype(np.float64), layer.base_layer.bias.detach().numpy()
    base = x.astype(np.float64) @ w.T + b
    scale = alpha / n
    peft_model.train()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(x)).numpy() - base
    ours.train()
    train1, train2 = np.asarray(ours(jnp.asarray(x))) - base, np.asarray(ours(jnp.asarray(x))) - base
    for delta in (theirs, train1, train2):
        dropped = np.abs(delta) < 1e-5
        kept = np.abs(delta - scale * x / (1 - rate)) < 1e-5
        assert np.all(dropped | kept)
        assert 0.3 < dropped.mean() < 0.7  # about `rate` of the adapter input is dropped
    assert not np.array_equal(np.abs(train1) < 1e-5, np.abs(train2) < 1e-5)  # a fresh mask on each call
    ours.eval()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))) - base, scale * x, atol=1e-5)
    forced = np.asarray(ours.fc(jnp.asarray(x), deterministic=False)) - base  # the call argument wins
    assert (np.abs(forced) < 1e-5).any()


# -- (4) stacked layers under nnx.scan / nnx.remat ------------------------------------------


class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.fc = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.fc(x))


class ScannedStack(nnx.Module):
    """`n` blocks created by `nnx.vmap` (kernels [n, d, d]) and applied with `nnx.scan`, optionally rematerialized."""

    def __init__(self, n, d, rngs, remat=False):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(d, rngs)

        self.blocks = create(rngs)
        self.remat = remat

    def __call__(self, x):
        def body(x, block):
            return block(x)

        body = nnx.remat(body) if self.remat else body
        return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)


def _split_grad_fn(model):
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora, rest, x):
        return jnp.sum(nnx.merge(graphdef, lora, rest, copy=True)(x))

    return jax.jit(jax.grad(loss)), lora, rest


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_stack_matches_per_layer_reference(remat):
    n, d, rank = 3, 128, 4
    model = ScannedStack(n, d, nnx.Rngs(0), remat=remat)
    kernels, biases = np.asarray(model.blocks.fc.kernel[...]), np.asarray(model.blocks.fc.bias[...])
    model = apply_qlora(model, quant=QuantConfig(), lora=LoraConfig(rank=rank, alpha=8, dropout=0.1),
                        rngs=nnx.Rngs(1))
    report = qlora_report(model)
    assert report.layers[0].kernel_shape == (n, d, d) and report.layers[0].lora_params == n * 2 * d * rank
    fc = model.blocks.fc
    q = fc.kernel.get_value()
    assert q.stack_shape == (n,) and fc.lora_a.shape == (n, d, rank) and fc.rngs.key.shape == (n,)
    assert "QuantizedArray(nf4, shape=(128, 128), block_size=64, double_quant" in str(model)  # printable
    for i in range(n):  # each layer's slice is exactly that layer quantized on its own
        own = qj.quantize(jnp.asarray(kernels[i]), "nf4", 64, double_quant=True)
        for a, b in zip(jax.tree.leaves(jax.tree.map(lambda leaf, i=i: leaf[i], q)), jax.tree.leaves(own),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    fc.lora_b[...] = jax.random.normal(jax.random.key(2), (n, rank, d)) * 0.1
    x = jax.random.normal(jax.random.key(3), (4, d))
    model.eval()
    h = np.asarray(x, np.float64)
    a, b = np.asarray(fc.lora_a[...], np.float64), np.asarray(fc.lora_b[...], np.float64)
    for i in range(n):
        w = np.asarray(qj.dequantize(jax.tree.map(lambda leaf, i=i: leaf[i], q)), np.float64)
        h = np.tanh(h @ w + biases[i] + h @ a[i] @ b[i] * 2.0)
    np.testing.assert_allclose(model(x), h, rtol=1e-5, atol=1e-5)
    grad_fn, lora, rest = _split_grad_fn(model)
    grads = grad_fn(lora, rest, x)
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grads))
    model.train()  # dropout with per-layer keys inside the scan
    assert not np.allclose(model(x), h, atol=1e-4)


def naive_scan_temporaries(fc, x) -> int:
    """Compiled temporaries of the gradient of a scan over `fc`'s stacked layers computed as `x @ dequantize(q)`
    plus the adapter: the baseline that keeps every layer's dequantized weight for the backward pass."""
    def naive(ab, q, x):
        def body(h, layer):
            ql, a, b = layer
            return jnp.tanh(h @ qj.dequantize(ql, jnp.float32) + (h @ a) @ b * 8.0), None

        return jnp.sum(jax.lax.scan(body, x, (q, *ab))[0])

    return jax.jit(jax.grad(naive)).lower((fc.lora_a[...], fc.lora_b[...]), fc.kernel.get_value(), x) \
        .compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("d", [1024, 1000], ids=["aligned", "flat-layout"])
def test_scanned_gradient_step_keeps_no_dequantized_weights(d):
    """8 scanned d x d QLoRA layers (rank 4): the compiled gradient step's temporaries stay below 4 float32
    weights; the same scan over `x @ dequantize(q)` keeps every layer's weight. d = 1000 (15.6 blocks of 64) puts
    the kernels in flat layout (blocks across rows), d = 1024 in rows of whole blocks."""
    n = 8
    model = apply_qlora(ScannedStack(n, d, nnx.Rngs(0)), quant=QuantConfig(), lora=LoraConfig(rank=4),
                        rngs=nnx.Rngs(1))
    assert model.blocks.fc.kernel.get_value().row_layout == (d % 64 == 0)
    x = jnp.ones((8, d))
    grad_fn, lora, rest = _split_grad_fn(model)
    ours = grad_fn.lower(lora, rest, x).compile().memory_analysis().temp_size_in_bytes
    weight_bytes = d * d * 4
    fc = model.blocks.fc

    naive_bytes = naive_scan_temporaries(fc, x)
    assert naive_bytes > n * weight_bytes, naive_bytes  # the baseline really keeps the weights
    assert ours < 4 * weight_bytes, (ours, naive_bytes)


# -- (5) bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(fmt="nf5"), r"QuantConfig.fmt: unknown format 'nf5'"),
    (dict(block_size=48), r"QuantConfig.block_size: 48 is not one of"),
    (dict(double_quant="yes"), r"QuantConfig.double_quant"),
    (dict(compute_dtype=jnp.int32), r"QuantConfig.compute_dtype"),
])
def test_bad_quant_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), r"LoraConfig.rank: must be a positive integer, got 0"),
    (dict(rank=2.5), r"LoraConfig.rank"),
    (dict(alpha=0), r"LoraConfig.alpha: must be a positive number, got 0"),
    (dict(alpha=-1.0), r"LoraConfig.alpha"),
    (dict(dropout=1.0), r"LoraConfig.dropout: must lie in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"LoraConfig.dropout"),
    (dict(init="pissa_niter_0"), r"LoraConfig.init: unknown init .pissa_niter_0."),
    (dict(targets=[]), r"LoraConfig.targets"),
    (dict(targets="q_proj("), r"LoraConfig.targets: 'q_proj\(' is not a valid regular expression"),
])
def test_bad_lora_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_configs_are_frozen_hashable_and_keyword_only():
    cfg = LoraConfig(targets=["q_proj", "v_proj"])
    assert cfg.targets == ("q_proj", "v_proj") and hash(cfg) == hash(LoraConfig(targets=("q_proj", "v_proj")))
    assert QuantConfig(compute_dtype=jnp.bfloat16).compute_dtype == np.dtype(jnp.bfloat16)
    with pytest.raises(AttributeError):
        cfg.rank = 4
    with pytest.raises(TypeError):
        QuantConfig("nf4")


class WithOddLayer(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.odd = nnx.Linear(100, D, rngs=rngs)


_AVAILABLE = r"available layer paths \(nnx.Linear, LinearGeneral, Einsum\): fc, odd"


@pytest.mark.parametrize("targets, match", [
    (["nope"], r"no layer is named 'nope'.*" + _AVAILABLE),
    (r"blocks/.*", r"regex 'blocks/\.\*' matches no layer path.*" + _AVAILABLE),
    (["embed"], r"embed is a Embed, which apply_qlora does not support.*" + _AVAILABLE),
])
def test_unknown_or_unsupported_targets_list_the_available_layers(targets, match):
    model = WithOddLayer(nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        apply_qlora(model, quant=None, lora=LoraConfig(targets=targets), rngs=nnx.Rngs(1))
    assert type(model.fc) is nnx.Linear  # nothing was changed


def test_unaligned_layer_is_quantized_in_flat_layout():
    """Input size 100 with blocks of 64: blocks cross rows, as bitsandbytes stores them (more in
    tests/test_unaligned_shapes.py)."""
    model = WithOddLayer(nnx.Rngs(0))
    kernel = model.odd.kernel[...]
    model = apply_qlora(model, quant=QuantConfig(), lora=LoraConfig(targets=["fc", "odd"]), rngs=nnx.Rngs(1))
    assert qlora_report(model).paths == ("fc", "odd")
    q = model.odd.kernel.get_value()
    assert not q.row_layout and q.codes.shape == (100 * D // 2,)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(qj.quantize(kernel, "nf4", 64, double_quant=True)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


class Shared(nnx.Module):
    def __init__(self, rngs, tie_kernel=False):
        self.a = nnx.Linear(D, D, rngs=rngs)
        self.b = self.a  # the same layer under two names
        self.c = nnx.Linear(D, D, rngs=rngs)
        if tie_kernel:
            self.c.kernel = self.a.kernel  # tied weights

    def __call__(self, x):
        return self.c(self.b(self.a(x)))


def test_shared_layers_stay_shared_and_tied_weights_are_refused():
    model = apply_qlora(Shared(nnx.Rngs(0)), quant=QuantConfig(), lora=LoraConfig(rank=2), rngs=nnx.Rngs(1))
    report = qlora_report(model)
    assert report.paths == ("a", "c") and type(model.a) is QLoRALinear and model.b is model.a
    model = Shared(nnx.Rngs(0), tie_kernel=True)
    with pytest.raises(ValueError, match=r"a: its kernel is shared with c/kernel \(tied weights\)"):
        apply_qlora(model, quant=QuantConfig(), lora=LoraConfig(rank=2), rngs=nnx.Rngs(1))
    assert type(model.a) is nnx.Linear


def test_bad_arguments():
    model = TinyMLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"quant and lora are both None"):
        apply_qlora(model, quant=None, lora=None)
    with pytest.raises(TypeError, match=r"rngs: an nnx.Rngs is needed"):
        apply_qlora(model, quant=QuantConfig(), lora=LoraConfig())
    with pytest.raises(TypeError, match=r"quant: expected a QuantConfig"):
        apply_qlora(model, quant={"fmt": "nf4"}, lora=None)
    q = qj.quantize(jnp.ones((64, 8)), "nf4")
    with pytest.raises(ValueError, match=r"bias: shape \(7,\), expected \(8,\)"):
        QuantLinear(q, jnp.zeros(7))
    with pytest.raises(TypeError, match=r"lora: expected a LoraConfig, got dict"):
        QLoRALinear(q, lora={"rank": 4, "alpha": 8}, rngs=nnx.Rngs(0))
    stacked = QuantLinear(jax.tree.map(lambda *a: jnp.stack(a), q, q))
    with pytest.raises(ValueError, match=r"QuantLinear: the kernel has stack dimensions \(2,\); call the layer "
                                         r"inside nnx.scan"):
        stacked(jnp.ones((2, 64)))
    with pytest.raises(ValueError, match=r"lora_delta: shapes do not chain"):
        lora_delta(jnp.ones((2, 64)), jnp.ones((32, 4)), jnp.ones((4, 8)), 1.0)

"""Weights multiplied inside modules qlora_jax does not know (issue 26).

A model written here in the style of JAX model libraries: its attention projections are small modules of its own,
each one `nnx.Param` `w` applied as `jnp.einsum("BTD,DNH->BTNH", x, self.w.value)` (the spec in the code, not in an
attribute), its MLP `nnx.Linear`. With `apply_qlora(..., targets="all-linear", trace=...)`:

1. every projection weight is quantized (100% of them, by parameter count), its adapter lives at the parameter's
   path (`.../q_proj/w/lora_a`), and the report lists what stays in float (embedding, output head) with why;
2. the logits equal those of the float model whose projection weights are the exact dequantization of the packed
   codes plus `s · A ⊗ B` (random B), decoded here by an independent float64 NumPy NF4 decoder (the NF4 table and
   bitsandbytes' signed dynamic map written out below, double-quantized absmax);
3. AdamW steps lower the loss and move the adapters only (packed bases and every other weight bit-identical);
4. targets by name (`q_proj`) and regex reach such modules; without `trace`, "all-linear" warns and the report
   says which weights it could not place; a registered module needs no trace;
5. the compiled gradient step of 8 scanned einsum-module layers keeps no dequantized weight (as for `nnx.Linear`);
6. Linen: a module calling `jnp.einsum` on a `self.param`, through `convert_params` and `qlora_interceptor`.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qlora_jax as qj
from qlora_jax.nnx import QLoRAProduct, QuantizedWeight, qlora_report

D, N, H, F, V = 64, 4, 16, 128, 128  # embed, heads, head_dim, MLP hidden, vocabulary
B, T = 2, 8
LAYERS = 1
RANK, ALPHA = 4, 8
QUANT = qj.QuantConfig()  # NF4, block 64, double quantization
LORA = qj.LoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear")
# Written against flax's own `.value`, which flax 0.12 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning")

# -- the model ------------------------------------------------------------------------------------------------


def _normal(rngs, shape, fan_in):
    return nnx.initializers.normal(fan_in ** -0.5)(rngs.params(), shape)


class HeadsProjection(nnx.Module):
    """One weight [embed, heads, head_dim], multiplied in the module's own code."""

    def __init__(self, rngs):
        self.w = nnx.Param(_normal(rngs, (D, N, H), D))

    def __call__(self, x):
        return jnp.einsum("BTD,DNH->BTNH", x, self.w.value)


class OutputProjection(nnx.Module):
    """One weight [heads, head_dim, embed]; the weight first in the spec."""

    def __init__(self, rngs):
        self.w = nnx.Param(_normal(rngs, (N, H, D), N * H))

    def __call__(self, x):
        return jnp.einsum("NHD,BTNH->BTD", self.w.value, x)


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.q_proj, self.k_proj, self.v_proj = (HeadsProjection(rngs) for _ in range(3))
        self.o_proj = OutputProjection(rngs)

    def __call__(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, N, H]
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.float32(np.sqrt(H))
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        probs = jax.nn.softmax(jnp.where(causal, logits, np.float32(-1e9)), axis=-1)
        return self.o_proj(jnp.einsum("BNTS,BSNH->BTNH", probs, v))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attn_norm, self.mlp_norm = nnx.RMSNorm(D, rngs=rngs), nnx.RMSNorm(D, rngs=rngs)
        self.attn = Attention(rngs)
        self.up = nnx.Linear(D, F, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(F, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class TinyLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


PROJECTIONS = [f"layers/{i}/{name}" for i in range(LAYERS) for name in (
    "attn/k_proj/w", "attn/o_proj/w", "attn/q_proj/w", "attn/v_proj/w", "down", "up")]


def _tokens(seed):
    return jax.random.randint(jax.random.key(seed), (B, T + 1), 0, V)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _at(node, path):
    for key in path.split("/"):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def _host(tree):
    return [np.array(leaf) for leaf in jax.tree.leaves(tree)]


# -- an independent NumPy NF4 decoder (float64) -----------------------------------------------------------------

NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])  # the QLoRA paper's NF4 levels, as bitsandbytes stores them


def _dynamic_map() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed=True)`: for exponents 10^-6 .. 10^0, the midpoints of 2^i + 1
    points in [0.1, 1] (both signs), plus 0 and 1, sorted: the codes of the double-quantized absmax."""
    data = [0.0, 1.0]
    for i in range(7):
        bounds = np.linspace(0.1, 1.0, 2 ** i + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        data += [float(np.float32(10.0 ** (i - 6)) * m) * s for m in means for s in (1, -1)]
    return np.sort(np.asarray(data, np.float64))


def numpy_nf4_decode(q: qj.QuantizedArray) -> np.ndarray:
    """The float64 kernel from the packed codes and scales of one (unstacked) NF4 kernel: codes in bitsandbytes'
    order (the kernel with its contracted axes last, row-major; first element in the high nibble), one absmax per
    block of `block_size` consecutive codes, double-quantized as `map[code] * nested_absmax[i // 256] + offset`."""
    assert q.fmt == "nf4" and not q.stack_shape
    packed = np.asarray(q.codes).reshape(-1)
    codes = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[: int(np.prod(q.shape))]
    absmax = np.asarray(q.absmax).reshape(-1)
    if q.double_quant:
        nested = np.asarray(q.nested_absmax, np.float64).reshape(-1)
        absmax = _dynamic_map()[absmax] * nested[np.arange(absmax.size) // 256] + float(q.nested_offset)
    flat = NF4[codes] * np.repeat(absmax.astype(np.float64), q.block_size)[: codes.size]
    others = [i for i in range(len(q.shape)) if i not in q.contract_axes]
    stored = flat.reshape(*(q.shape[i] for i in others), *(q.shape[a] for a in q.contract_axes))
    return np.transpose(stored, np.argsort((*others, *q.contract_axes)))


def _adapter_update(layer, scale: float) -> np.ndarray:
    """`s · A ⊗ B` in kernel order, float64 (A [*in, r], B [r, *out]; in = the kernel's contracted axes)."""
    a, b = np.asarray(layer.lora_a[...], np.float64), np.asarray(layer.lora_b[...], np.float64)
    delta = np.tensordot(a, b, axes=1) * scale  # [*in, *out]
    contract = tuple(layer.contract_axes) if hasattr(layer, "contract_axes") else (0,)
    others = [i for i in range(delta.ndim) if i not in contract]
    return np.transpose(delta, np.argsort((*contract, *others)))


# -- (1)-(3): quantized, exact, trained -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_model():
    return TinyLM(nnx.Rngs(0))


def test_einsum_modules_are_quantized_exact_and_train_their_adapters_only(float_model):
    tokens = _tokens(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing multiplied is left out: no warning
        model = qj.apply_qlora(nnx.clone(float_model), quant=QUANT, lora=LORA, rngs=nnx.Rngs(1),
                               trace=(tokens[:, :-1],))

    # (1) Every projection weight quantized, adapters at the parameter's path, the report says what stays float.
    report = qlora_report(model)
    assert sorted(report.paths) == PROJECTIONS and all(row.quantized for row in report.layers)
    projection_params = sum(np.size(_at(float_model, p if p.endswith("/w") else p + "/kernel").get_value())
                            for p in PROJECTIONS)
    assert report.base_params == projection_params  # 100% of the projection weights
    for i in range(LAYERS):
        assert type(model.layers[i].attn.q_proj.w) is QLoRAProduct and type(model.layers[i].up).__name__ == \
            "QLoRALinear"
    lora_paths = sorted("/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    assert lora_paths == sorted(f"{p}/lora_{x}" for p in PROJECTIONS for x in "ab")
    assert "layers/0/attn/q_proj/w/kernel" in {"/".join(map(str, k)) for k, _ in
                                                  nnx.to_flat_state(nnx.state(model, QuantizedWeight))}
    assert [(p.path, p.shape) for p in report.float_params] == [("embed/embedding", (V, D)),
                                                               ("lm_head/kernel", (D, V))]
    assert report.float_params[0].reason == "embedding" and "output head" in report.float_params[1].reason
    assert report.model_params == projection_params + 2 * V * D + (2 * LAYERS + 1) * D
    assert "left in float: embed/embedding (128, 64)" in str(report)

    # (2) Logits = the float model with the NumPy-decoded kernels plus the adapters' update (random B).
    key = jax.random.key(7)
    for i, path in enumerate(PROJECTIONS):
        layer = _at(model, path)
        layer.lora_b[...] = jax.random.normal(jax.random.fold_in(key, i), layer.lora_b.shape) * 0.05
    reference = nnx.clone(float_model)
    for path in PROJECTIONS:
        layer = _at(model, path)
        kernel = numpy_nf4_decode(layer.kernel.get_value()) + _adapter_update(layer, ALPHA / RANK)
        original = _at(reference, path if path.endswith("/w") else path + "/kernel")
        err = np.abs(kernel - _adapter_update(layer, ALPHA / RANK) - np.asarray(original.get_value())).max()
        assert err <= 0.153 * np.abs(np.asarray(original.get_value())).max()  # within NF4 rounding of the original
        original.set_value(jnp.asarray(kernel, jnp.float32))
    got = _forward(model, tokens[:, :-1])
    want = _forward(reference, tokens[:, :-1])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-5)

    # (2b) merge_lora puts the merged weight back as the module's nnx.Param (same reference); unmerge_lora undoes it.
    merged, original = nnx.clone(model), nnx.clone(model)
    qj.merge_lora(merged)
    assert type(merged.layers[0].attn.q_proj.w) is nnx.Param and merged.layers[0].attn.q_proj.w.shape == (D, N, H)
    np.testing.assert_allclose(np.asarray(_forward(merged, tokens[:, :-1])), np.asarray(want), rtol=1e-5, atol=2e-5)
    rows = {row.path: row for row in qj.merge_report(merged, original).layers}
    assert sorted(rows) == PROJECTIONS and rows["layers/0/attn/q_proj/w"].merged == "Param"
    qj.unmerge_lora(merged, original)
    assert type(merged.layers[0].attn.q_proj.w) is QLoRAProduct
    np.testing.assert_array_equal(np.asarray(_forward(merged, tokens[:, :-1])), np.asarray(got))

    # (3) AdamW moves the adapters and nothing else.
    bases = _host(nnx.state(model, QuantizedWeight))
    frozen_floats = _host(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    adapters = _host(nnx.state(model, nnx.LoRAParam))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, tokens)
        optimizer.update(model, grads)
        return loss

    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction computes float ** int32
        losses = [float(step(model, optimizer, tokens)) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.1, losses
    after = _host(nnx.state(model, nnx.LoRAParam))
    assert all(not np.array_equal(a, b) for a, b in zip(adapters, after, strict=True))
    for what, before, now in (("packed bases", bases, _host(nnx.state(model, QuantizedWeight))),
                              ("float weights", frozen_floats,
                               _host(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))):
        assert len(before) == len(now) > 0
        assert all(np.array_equal(a, b) for a, b in zip(before, now, strict=True)), what


# -- (4) targets by name, the warning without trace, registration -------------------------------------------------


def test_targets_by_name_warning_without_trace_and_registration(float_model):
    tokens = _tokens(1)[:, :-1]
    by_name = qj.apply_qlora(nnx.clone(float_model), quant=QUANT, lora=qj.LoraConfig(rank=RANK, targets=("q_proj",)),
                             rngs=nnx.Rngs(1), trace=(tokens,))
    kinds = {p: type(_at(by_name, p)).__name__ for p in PROJECTIONS}
    assert kinds["layers/0/attn/q_proj/w"] == "QLoRAProduct" and kinds["layers/0/attn/v_proj/w"] == "QuantProduct"
    assert kinds["layers/0/up"] == "QuantLinear"
    by_regex = qj.apply_qlora(nnx.clone(float_model), quant=None, lora=qj.LoraConfig(rank=RANK,
                              targets=r"layers/\d+/attn/[qv]_proj/w"), rngs=nnx.Rngs(1), trace=(tokens,))
    assert sorted(qlora_report(by_regex).paths) == [f"layers/{i}/attn/{n}_proj/w" for i in range(LAYERS)
                                                    for n in "qv"]
    assert type(by_regex.layers[0].attn.q_proj.w.kernel).__name__ == "FrozenWeight"  # plain LoRA: float, frozen
    left = {p.path: p.reason for p in qlora_report(by_regex).float_params}
    assert left["layers/0/attn/k_proj/w"] == "multiplied as 'BTD,DNH->BTNH', excluded by targets"

    # Without trace the spec written in the code cannot be known: "all-linear" warns, the report says so.
    with pytest.warns(UserWarning, match=r"multiplied weights stay in float: layers/0/attn/k_proj/w \(unknown whether"):
        untraced = qj.apply_qlora(nnx.clone(float_model), quant=QUANT, lora=LORA, rngs=nnx.Rngs(1))
    report = qlora_report(untraced)
    assert sorted(report.paths) == [p for p in PROJECTIONS if not p.endswith("/w")]
    reasons = {p.path: p.reason for p in report.float_params}
    assert set(reasons) == {"embed/embedding", "lm_head/kernel"} | {p for p in PROJECTIONS if p.endswith("/w")}
    assert reasons["layers/0/attn/o_proj/w"].startswith("unknown whether multiplied: a parameter of OutputProjection")

    # A registered module needs no trace; a module holding one weight and its spec as a string attribute neither.
    class Registered(HeadsProjection):
        pass

    class WithSpec(nnx.Module):
        def __init__(self, rngs):
            self.spec = "btd,dnh->btnh"
            self.kernel = nnx.Param(_normal(rngs, (D, N, H), D))

        def __call__(self, x):
            return jnp.einsum(self.spec, x, self.kernel[...])

    qj.register_linear(Registered, "w", "BTD,DNH->BTNH")
    model = nnx.clone(float_model)
    model.layers[0].attn.q_proj = Registered(nnx.Rngs(3))
    model.layers[0].attn.k_proj = WithSpec(nnx.Rngs(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qj.apply_qlora(model, quant=QUANT, lora=LORA, rngs=nnx.Rngs(1))
    paths = qlora_report(model).paths
    assert "layers/0/attn/q_proj/w" in paths and "layers/0/attn/k_proj/kernel" in paths
    assert "layers/0/attn/v_proj/w" in str(caught[0].message) and "layers/0/attn/q_proj/w" not in str(
        caught[0].message)


# -- (5) packed-only backward -------------------------------------------------------------------------------------


class _Proj(nnx.Module):
    def __init__(self, d, rngs):
        self.w = nnx.Param(_normal(rngs, (d, 8, d // 8), d))

    def __call__(self, x):
        return jnp.einsum("BD,DNH->BNH", x, self.w.value).reshape(x.shape)


class _Scanned(nnx.Module):
    def __init__(self, n, d, rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return _Proj(d, rngs)

        self.blocks = create(rngs)

    def __call__(self, x):
        return nnx.scan(lambda h, block: jnp.tanh(block(h)), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)


def test_scanned_einsum_modules_keep_no_dequantized_weight_for_backward():
    """8 scanned einsum modules, d x d weights (as [d, 8, d/8]): the compiled gradient step's temporaries stay
    below 4 float32 weights, while the same scan over `einsum(x, dequantize(q))` keeps every layer's weight."""
    n, d = 8, 512
    x = jnp.ones((8, d))
    model = qj.apply_qlora(_Scanned(n, d, nnx.Rngs(0)), quant=QUANT, lora=qj.LoraConfig(rank=4), rngs=nnx.Rngs(1),
                           trace=(x,))
    layer = model.blocks.w
    assert type(layer) is QLoRAProduct and layer.kernel.get_value().stack_shape == (n,)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora, rest, x):
        return jnp.sum(nnx.merge(graphdef, lora, rest, copy=True)(x))

    ours = jax.jit(jax.grad(loss)).lower(lora, rest, x).compile().memory_analysis().temp_size_in_bytes

    def naive(ab, q, x):
        def body(h, layer):
            ql, a, b = layer
            w = qj.dequantize(ql, jnp.float32)
            return jnp.tanh((jnp.einsum("BD,DNH->BNH", h, w) + jnp.einsum("BD,DR,RNH->BNH", h, a, b)).reshape(
                h.shape)), None

        return jnp.sum(jax.lax.scan(body, x, (q, *ab))[0])

    naive_bytes = jax.jit(jax.grad(naive)).lower((layer.lora_a[...], layer.lora_b[...]), layer.kernel.get_value(),
                                                  x).compile().memory_analysis().temp_size_in_bytes
    weight_bytes = d * d * 4
    assert naive_bytes > n * weight_bytes, naive_bytes  # the baseline really keeps the weights
    assert ours < 4 * weight_bytes, (ours, naive_bytes)


# -- (6) Linen ----------------------------------------------------------------------------------------------------


def test_linen_einsum_modules_through_convert_params_and_the_interceptor():
    """A Linen model whose attention projections call `jnp.einsum` on a `self.param`: `product_params` finds them,
    `convert_params` quantizes them (kernel in "frozen" at the parameter's path, adapter under
    `params/<path>/<param>/`), and under `qlora_interceptor` the logits equal the float model's with the
    NumPy-decoded kernels plus `s · A ⊗ B` (random B); a gradient step moves the adapters and lowers the loss."""
    import flax.linen as nn

    from qlora_jax.linen import FROZEN, convert_params, dense_layers, lora_mask, product_params, qlora_interceptor

    class Projection(nn.Module):
        spec: str
        shape: tuple[int, ...]

        @nn.compact
        def __call__(self, x):
            return jnp.einsum(self.spec, x, self.param("w", nn.initializers.normal(0.125), self.shape))

    class LinenLM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(V, D, name="embed")(tokens)
            h = nn.RMSNorm(name="norm")(x)
            v = Projection("BTD,DNH->BTNH", (D, N, H), name="v_proj")(h)  # attention of one token to itself
            x = x + Projection("BTNH,NHD->BTD", (N, H, D), name="o_proj")(v)
            x = x + nn.Dense(D, use_bias=False, name="down")(jax.nn.gelu(nn.Dense(F, use_bias=False, name="up")(x)))
            return nn.Dense(V, use_bias=False, name="lm_head")(x)

    model = LinenLM()
    tokens = _tokens(2)
    inputs = tokens[:, :-1]
    float_params = model.init(jax.random.key(0), inputs)["params"]
    products = product_params(model, inputs)
    assert [(p.name, p.spec) for p in products] == [("v_proj/w", "BTD,DNH->BTNH"), ("o_proj/w", "BTNH,NHD->BTD")]
    variables, report = convert_params(float_params, quant=QUANT, lora=LORA, rng=jax.random.key(1),
                                       layers=dense_layers(model, inputs), products=products)
    assert sorted(report.paths) == ["down", "o_proj/w", "up", "v_proj/w"] and all(r.quantized for r in report.layers)
    params, frozen = variables["params"], variables[FROZEN]
    assert sorted(params["v_proj"]["w"]) == ["lora_a", "lora_b"] and "w" in frozen["o_proj"]
    interceptor = qlora_interceptor(quant=QUANT, lora=LORA, deterministic=True)

    def logits(params, frozen, tokens):
        with nn.intercept_methods(interceptor):
            return model.apply({"params": params, FROZEN: frozen}, tokens)

    # Random B; the reference: float params with the decoded kernels plus the update, no interceptor.
    reference = jax.tree.map(lambda x: x, float_params)
    for i, (path, param) in enumerate((("v_proj", "w"), ("o_proj", "w"), ("up", "kernel"), ("down", "kernel"))):
        node = params[path][param] if param == "w" else params[path]
        node["lora_b"] = jax.random.normal(jax.random.key(20 + i), node["lora_b"].shape) * 0.05
        a, b = np.asarray(node["lora_a"], np.float64), np.asarray(node["lora_b"], np.float64)
        q = frozen[path][param]
        reference[path][param] = jnp.asarray(numpy_nf4_decode(q) + np.tensordot(a, b, axes=1) * (ALPHA / RANK),
                                             jnp.float32)
    got = jax.jit(logits)(params, frozen, inputs)
    want = jax.jit(model.apply)({"params": reference}, inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-5)

    mask = lora_mask(params)

    def loss(params):
        out = logits(params, frozen, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(out, tokens[:, 1:]).mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value, grads = value_and_grad(params)
    stepped = jax.tree.map(lambda p, g, m: p - 0.5 * g if m else p, params, grads, mask)  # adapters only
    assert float(value_and_grad(stepped)[0]) < float(value)
    adapter_grads = [g for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask), strict=True) if m]
    assert len(adapter_grads) == 8 and all(np.abs(np.asarray(g)).sum() > 0 for g in adapter_grads)

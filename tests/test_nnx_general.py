"""`nnx.LinearGeneral` and `nnx.Einsum` kernels: QuantLinearGeneral / QLoRALinearGeneral,
QuantEinsum / QLoRAEinsum, and `apply_qlora` over them.

(1) a fresh adapter is bit-identical to the quantized base, and with quant=None to
the original Flax layer; (2) outputs with a nonzero adapter match a float64 NumPy
reference written per layer by hand; (3) an attention block (LinearGeneral q/k/v
with heads, Einsum output projection) trains its adapters only; (4) layers stacked
by nnx.vmap under nnx.scan; (5) errors name the layer, shape or field.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qlora_jax as qj
from qlora_jax._src.config import LoraConfig, QuantConfig
from qlora_jax._src.nn import (
    QLoRAEinsum,
    QLoRALinearGeneral,
    QuantEinsum,
    QuantizedWeight,
    QuantLinearGeneral,
    lora_delta,
    lora_einsum,
)
from qlora_jax._src.surgery import apply_qlora, qlora_report

D, H, HD = 64, 4, 16


class Zoo(nnx.Module):
    """One of each kernel layout: N-D outputs, N-D inputs, non-trailing input axes, einsum batch letters."""

    def __init__(self, rngs: nnx.Rngs):
        self.split_heads = nnx.LinearGeneral(D, (H, HD), rngs=rngs)  # [..., D] -> [..., H, HD]
        self.join_heads = nnx.LinearGeneral((H, HD), D, axis=(-2, -1), rngs=rngs)  # [..., H, HD] -> [..., D]
        self.middle = nnx.LinearGeneral((2, 32), (3, 8), axis=(1, -1), use_bias=False, rngs=rngs)
        self.proj = nnx.Einsum("...d,dnh->...nh", (D, H, HD), (H, HD), rngs=rngs)
        self.out = nnx.Einsum("bsnh,nhd->bsd", (H, HD, D), (D,), rngs=rngs)
        self.per_head = nnx.Einsum("bnd,ndh->bnh", (H, D, HD), (H * HD,), rngs=rngs)  # n: a batch letter


# Per layer: its input shape, and the float64 NumPy reference `y(x, kernel, bias)` written independently.
CASES = {
    "split_heads": ((2, 3, D), lambda x, w, b: np.tensordot(x, w, axes=([2], [0])) + b),
    "join_heads": ((2, 3, H, HD), lambda x, w, b: np.tensordot(x, w, axes=([2, 3], [0, 1])) + b),
    "middle": ((2, 2, 5, 32), lambda x, w, b: np.tensordot(x, w, axes=([1, 3], [0, 1]))),
    "proj": ((2, 3, D), lambda x, w, b: np.einsum("bsd,dnh->bsnh", x, w) + b),
    "out": ((2, 3, H, HD), lambda x, w, b: np.einsum("bsnh,nhd->bsd", x, w) + b),
    "per_head": ((5, H, D), lambda x, w, b: np.einsum("bnd,ndh->bnh", x, w) + b.reshape(H, HD)),
}
# ΔW = A ⊗ B in kernel order, by hand: A [*input axes, r], B [r, *output axes].
DELTAS = {
    "split_heads": "dr,rnh->dnh",
    "join_heads": "nhr,rd->nhd",
    "middle": "abr,rce->abce",
    "proj": "dr,rnh->dnh",
    "out": "nhr,rd->nhd",
    "per_head": "dr,rnh->ndh",
}


def _x(name, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(CASES[name][0]), jnp.float32)


def _np(a):
    return np.asarray(a, np.float64)


@pytest.fixture(scope="module")
def zoo():
    """A fresh `Zoo` each time (cloned; built once, under jit, which is faster than eager init)."""
    base = nnx.jit(lambda: Zoo(nnx.Rngs(0)))()
    return lambda: nnx.clone(base)


@nnx.jit
def _run_all(model, xs):
    """Every layer of a Zoo on its input, in one compiled program."""
    return {name: getattr(model, name)(xs[name]) for name in CASES}


# -- (1) a fresh adapter changes nothing -------------------------------------------------


def test_fresh_adapter_is_bit_identical_to_the_quantized_base(zoo):
    quantized = apply_qlora(zoo(), quant=QuantConfig(), lora=None)
    qrep = qlora_report(quantized)
    qlora = apply_qlora(zoo(), quant=QuantConfig(), lora=LoraConfig(rank=4, dropout=0.1), rngs=nnx.Rngs(1))
    rep = qlora_report(qlora)
    assert qrep.paths == rep.paths == tuple(sorted(CASES))
    kinds = {r.path: r.layer for r in rep.layers}
    assert kinds == {"join_heads": "QLoRALinearGeneral", "middle": "QLoRALinearGeneral", "out": "QLoRAEinsum",
                     "per_head": "QLoRAEinsum", "proj": "QLoRAEinsum", "split_heads": "QLoRALinearGeneral"}
    assert {r.path: r.layer for r in qrep.layers}["out"] == "QuantEinsum"
    assert {r.path: r.kernel_shape for r in rep.layers}["middle"] == (2, 32, 3, 8)
    qlora.train()  # dropout active on the adapter input
    xs = {name: _x(name) for name in CASES}
    ours, theirs = _run_all(qlora, xs), _run_all(quantized, xs)
    for name in CASES:
        q = getattr(qlora, name).kernel.get_value()
        np.testing.assert_array_equal(q.codes, getattr(quantized, name).kernel.get_value().codes)
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_fresh_float_lora_is_bit_identical_to_the_original_layers(zoo):
    base = zoo()
    xs = {name: _x(name) for name in CASES}
    expected = _run_all(base, xs)
    model = apply_qlora(base, quant=None, lora=LoraConfig(rank=4), rngs=nnx.Rngs(1))
    report = qlora_report(model)
    assert model is base and len(report.layers) == len(CASES) and not any(r.quantized for r in report.layers)
    ours = _run_all(model, xs)
    for name in CASES:
        assert type(getattr(model, name)) in (QLoRALinearGeneral, QLoRAEinsum)
        np.testing.assert_array_equal(ours[name], expected[name], err_msg=name)
    for name in ("middle", "per_head"):  # eagerly too
        np.testing.assert_array_equal(getattr(model, name)(xs[name]), expected[name], err_msg=name)


# -- (2) numerics against an independent float64 reference -------------------------------------


def test_outputs_match_a_float64_reference_with_a_nonzero_adapter(zoo):
    model = apply_qlora(zoo(), quant=QuantConfig(), lora=LoraConfig(rank=4, alpha=8, dropout=0.2),
                        rngs=nnx.Rngs(1))
    model.eval()
    xs = {name: _x(name, seed=i) for i, name in enumerate(CASES)}
    for i, name in enumerate(CASES):
        layer = getattr(model, name)
        layer.lora_b[...] = jax.random.normal(jax.random.key(10 + i), layer.lora_b.shape) * 0.1
    outputs = _run_all(model, xs)
    for name in CASES:
        layer, x = getattr(model, name), xs[name]
        w = _np(qj.dequantize(layer.kernel.get_value(), jnp.float32))
        delta = np.einsum(DELTAS[name], _np(layer.lora_a[...]), _np(layer.lora_b[...]))
        assert delta.shape == w.shape
        bias = _np(layer.bias[...]) if layer.bias is not None else 0.0
        ref = CASES[name][1](_np(x), w + 2.0 * delta, bias)  # s = alpha / rank = 2
        y = outputs[name]
        assert y.shape == ref.shape and y.dtype == jnp.float32, name
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=name)
        assert np.abs(ref - CASES[name][1](_np(x), w, bias)).max() > 1e-2  # the adapter really contributes
    name = "middle"  # eagerly too (non-trailing input axes: the general qdot_general path)
    np.testing.assert_allclose(getattr(model, name)(xs[name]), outputs[name], rtol=1e-5, atol=1e-5)


def test_lora_einsum_is_lora_delta_for_a_matrix_kernel():
    x, a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(3, 5, 32), (32, 4), (4, 8)]))
    np.testing.assert_allclose(lora_einsum("...i,io->...o", x, a, b, 0.5), lora_delta(x, a, b, 0.5),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"lora_einsum: factors a \(32, 4\), b \(4, 8\) do not fit the kernel "
                                         r"'nhd' .* a \[\*in, r\] with in = axes 'nh'"):
        lora_einsum("bsnh,nhd->bsd", jnp.ones((1, 2, 4, 8)), a, b, 1.0)


def test_bfloat16_compute_dtype_and_the_quantized_layout():
    kernel = jax.random.normal(jax.random.key(0), (H, HD, D))
    q = qj.quantize(kernel, "nf4", 64, double_quant=True, contract_axes=(0, 1))
    layer = QLoRAEinsum("bsnh,nhd->bsd", q, jnp.zeros(D), lora=LoraConfig(rank=4, alpha=8), dtype=jnp.bfloat16,
                        rngs=nnx.Rngs(0))
    assert layer.contract_axes == (0, 1) and layer.lora_a.shape == (H, HD, 4) and layer.lora_b.shape == (4, D)
    y = layer(jnp.ones((2, 3, H, HD)))
    assert y.dtype == jnp.bfloat16 and layer.lora_a[...].dtype == jnp.float32
    # Blocks run along the flattened input axes (n, h): the codes are those of the [in, out] matrix.
    flat = qj.quantize(kernel.reshape(H * HD, D), "nf4", 64, double_quant=True)
    np.testing.assert_array_equal(q.codes, flat.codes)


# -- (3) training an attention block -----------------------------------------------------------


class Attention(nnx.Module):
    """Pre-norm causal self-attention: q/k/v `LinearGeneral` D -> (heads, head_dim), output `Einsum`."""

    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.q = nnx.LinearGeneral(D, (H, HD), use_bias=False, rngs=rngs)
        self.k = nnx.LinearGeneral(D, (H, HD), use_bias=False, rngs=rngs)
        self.v = nnx.LinearGeneral(D, (H, HD), rngs=rngs)
        self.o = nnx.Einsum("bsnh,nhd->bsd", (H, HD, D), (D,), rngs=rngs)
        self.head = nnx.Linear(D, 8, rngs=rngs)

    def __call__(self, x):  # [b, s, D] -> [b, s, 8]
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)  # [b, s, H, HD]
        s = x.shape[1]
        scores = jnp.einsum("bqnh,bknh->bnqk", q, k) * (1.0 / np.sqrt(HD))  # [b, H, s, s]
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -1e9)
        attn = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(scores, axis=-1), v)  # [b, s, H, HD]
        return self.head(x + self.o(attn))


def test_attention_block_trains_adapters_only():
    model = nnx.jit(lambda: Attention(nnx.Rngs(0)))()
    model = apply_qlora(model, quant=QuantConfig(), lora=LoraConfig(rank=4, alpha=8), rngs=nnx.Rngs(1))
    report = qlora_report(model)
    assert report.paths == ("k", "o", "q", "v") and ("head", "output head (named 'head')") in report.skipped
    assert type(model.q) is QLoRALinearGeneral and type(model.o) is QLoRAEinsum
    x = jax.random.normal(jax.random.key(2), (4, 6, D))
    y = jax.random.normal(jax.random.key(3), (4, 6, 8))
    packed = [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, QuantizedWeight))]
    others = [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))]
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
        return loss

    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction computes float ** int32
        losses = [float(step(model, opt, x, y)) for _ in range(8)]
    assert losses[-1] < losses[0], losses
    for a, b in zip(packed, jax.tree.leaves(nnx.state(model, QuantizedWeight)), strict=True):
        np.testing.assert_array_equal(a, b)
    leaves = jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    for a, b in zip(others, leaves, strict=True):
        np.testing.assert_array_equal(a, b)  # biases, norm, head untouched
    assert all(np.abs(np.asarray(b)).max() > 0 for b in (model.q.lora_b[...], model.o.lora_b[...]))
    floats = [leaf for leaf in jax.tree.leaves(nnx.state(opt)) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert report.lora_params == 4 * 2 * 4 * D  # 4 layers, A and B of 4 x 64 elements each (H * HD = D)
    assert sum(leaf.size for leaf in floats) == 2 * report.lora_params  # two moments per adapter element


# -- (4) stacked layers --------------------------------------------------------------------------


class Block(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.LinearGeneral(D, (H, HD), rngs=rngs)
        self.down = nnx.Einsum("bnh,nhd->bd", (H, HD, D), (D,), rngs=rngs)

    def __call__(self, x):
        return x + self.down(jnp.tanh(self.up(x)))


class Stack(nnx.Module):
    def __init__(self, n, rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs)

        self.blocks = create(rngs)

    def __call__(self, x):
        return nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)


def test_stacked_general_and_einsum_layers_under_scan():
    n = 3
    model = nnx.jit(lambda: Stack(n, nnx.Rngs(0)))()
    biases = {k: _np(getattr(model.blocks, k).bias[...]) for k in ("up", "down")}
    model = apply_qlora(model, quant=QuantConfig(), lora=LoraConfig(rank=2, alpha=4), rngs=nnx.Rngs(1))
    report = qlora_report(model)
    assert {r.path: r.kernel_shape for r in report.layers} == {"blocks/up": (n, D, H, HD),
                                                               "blocks/down": (n, H, HD, D)}
    up, down = model.blocks.up, model.blocks.down
    assert up.kernel.get_value().stack_shape == (n,) and down.lora_a.shape == (n, H, HD, 2)
    for layer in (up, down):
        layer.lora_b[...] = jax.random.normal(jax.random.key(5), layer.lora_b.shape) * 0.1
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, D)), jnp.float32)
    h = _np(x)
    w_up = _np(qj.dequantize(up.kernel.get_value(), jnp.float32))  # [n, D, H, HD]: stack dims dequantize too
    w_down = _np(qj.dequantize(down.kernel.get_value(), jnp.float32))
    for i in range(n):
        wu = w_up[i] + 2.0 * np.einsum("dr,rnh->dnh", _np(up.lora_a[...])[i], _np(up.lora_b[...])[i])
        wd = w_down[i] + 2.0 * np.einsum("nhr,rd->nhd", _np(down.lora_a[...])[i], _np(down.lora_b[...])[i])
        u = np.tanh(np.einsum("bd,dnh->bnh", h, wu) + biases["up"][i])
        h = h + np.einsum("bnh,nhd->bd", u, wd) + biases["down"][i]
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), h, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"QLoRALinearGeneral: the kernel has stack dimensions \(3,\)"):
        up(x)


# -- (5) errors --------------------------------------------------------------------------------


class Odd(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.batched = nnx.LinearGeneral(D, D, batch_axis={0: 2}, rngs=rngs)
        self.custom = nnx.Einsum("bd,dh->bh", (D, D), einsum_op=lambda *a, **k: jnp.einsum(*a, **k), rngs=rngs)
        self.narrow = nnx.LinearGeneral((2, 16), D, axis=(-2, -1), rngs=rngs)


def test_unsupported_configurations_are_skipped_or_refused_by_name():
    base = nnx.jit(lambda: Odd(nnx.Rngs(0)))()
    model = apply_qlora(nnx.clone(base), quant=None, lora=LoraConfig(rank=2), rngs=nnx.Rngs(1))
    report = qlora_report(model)
    assert report.paths == ("fc", "narrow") and type(model.batched) is nnx.LinearGeneral
    skipped = dict(report.skipped)
    assert skipped["batched"] == ("LinearGeneral cannot be replaced: it has batch_axis {0: 2}, which is not "
                                  "supported (its kernel carries the batch axes)")
    assert skipped["custom"] == "Einsum cannot be replaced: it has a custom einsum_op"
    with pytest.raises(ValueError, match=r"batched: this nnx.LinearGeneral cannot be replaced because it has "
                                         r"batch_axis \{0: 2\}"):
        apply_qlora(nnx.clone(base), quant=None, lora=LoraConfig(targets=["batched"]), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"custom: this nnx.Einsum cannot be replaced because it has a custom "
                                         r"einsum_op"):
        apply_qlora(nnx.clone(base), quant=None, lora=LoraConfig(targets="cus.*"), rngs=nnx.Rngs(1))
    # input size 32 with blocks of 64: flat layout (tests/test_unaligned_shapes.py), as with blocks of 32 in rows
    for block_size, row_layout in ((64, False), (32, True)):
        model = apply_qlora(nnx.clone(base), quant=QuantConfig(block_size=block_size), lora=None)
        assert qlora_report(model).paths == ("fc", "narrow")
        assert model.narrow.kernel.get_value().row_layout == row_layout


def test_layer_constructors_name_the_bad_argument():
    q = qj.quantize(jnp.ones((D, H, HD)), "nf4")  # contract_axes (0,)
    with pytest.raises(ValueError, match=r"kernel: a QuantizedArray of a kernel \(\*in, \*out\) with contract_axes "
                                         r"\(0, 1\) is needed for axis=\(-2, -1\)"):
        QuantLinearGeneral(q, axis=(-2, -1))
    with pytest.raises(ValueError, match=r"bias: shape \(64,\), expected \(4, 16\)"):
        QuantLinearGeneral(q, jnp.zeros(D))
    with pytest.raises(ValueError, match=r"out_features: \(64,\) does not match the kernel's output axes"):
        QuantLinearGeneral(q, out_features=D)
    with pytest.raises(ValueError, match=r"QuantLinearGeneral: input shape \(2, 32\) has sizes \(32,\) on axis "
                                         r"\(-1,\), expected in_features \(64,\)"):
        QuantLinearGeneral(q)(jnp.ones((2, 32)))
    with pytest.raises(ValueError, match=r"kernel: 'bsnh,nhd->bsd' needs a QuantizedArray of a 3-D kernel with "
                                         r"contract_axes \(0, 1\)"):
        QuantEinsum("bsnh,nhd->bsd", q)
    with pytest.raises(ValueError, match=r"einsum_str: the layer cannot be computed because its einsum_str "
                                         r"'...d,...dh->...h' puts '...' on the kernel"):
        QuantEinsum("...d,...dh->...h", jnp.ones((D, HD)))
    with pytest.raises(ValueError, match=r"bias: shape \(3,\) does not fit 'bd,dh->bh'"):
        QuantEinsum("bd,dh->bh", jnp.ones((D, HD)), jnp.zeros(3))
    layer = QuantEinsum("bd,dh->bh", jnp.ones((D, HD)))
    with pytest.raises(ValueError, match=r"einsum_str: 'bh,dh->bd' does not sum kernel axes \(0,\)"):
        layer(jnp.ones((2, HD)), "bh,dh->bd")
    assert layer(jnp.ones((2, D)), "xd,dh->xh").shape == (2, HD)  # another spec, same kernel axes: fine
    with pytest.raises(TypeError, match=r"lora: expected a LoraConfig, got dict"):
        QLoRALinearGeneral(q, lora={"rank": 4}, rngs=nnx.Rngs(0))

"""qmatmul: the "xla" path against the float32 reference (values and grad w.r.t. x),
and the memory property: no dequantized weight is kept for the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj

# Tolerances of the "xla" path against the reference, relative to max |reference|.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int8"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_xla_path_matches_reference_values_and_grad(fmt, dtype, double_quant):
    q = qj.quantize(jax.random.normal(jax.random.key(0), (192, 128)) * 0.05, fmt, 64, double_quant)
    x = jax.random.normal(jax.random.key(1), (2, 3, 192)).astype(dtype)

    def loss(x, path):
        return jnp.sum(jnp.tanh(qj.qmatmul(x, q, path=path).astype(jnp.float32)))

    for jit in (False, True):
        fn = jax.jit(qj.qmatmul, static_argnames="path") if jit else qj.qmatmul
        got, ref = fn(x, q, path="xla"), fn(x, q, path="reference")
        assert got.shape == (2, 3, 128) and got.dtype == dtype
        scale = float(jnp.abs(ref.astype(jnp.float32)).max())
        np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), atol=TOLERANCE[dtype] * scale)
    g = jax.grad(loss)(x, "xla")
    g_ref = jax.grad(loss)(x, "reference")
    assert g.dtype == dtype
    scale = float(jnp.abs(g_ref.astype(jnp.float32)).max())
    np.testing.assert_allclose(g.astype(np.float32), g_ref.astype(np.float32), atol=TOLERANCE[dtype] * scale)


def test_reference_is_a_float64_matmul_of_the_dequantized_kernel():
    kernel = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    q = qj.quantize(kernel, "nf4", 64)
    x = np.random.default_rng(1).standard_normal((5, 128)).astype(np.float32)
    expected = x.astype(np.float64) @ np.asarray(qj.dequantize(q)).astype(np.float64)
    np.testing.assert_allclose(qj.qmatmul(jnp.asarray(x), q, path="reference"), expected, rtol=1e-5, atol=1e-5)


def test_quantized_kernel_gets_a_zero_cotangent():
    q = qj.quantize(jax.random.normal(jax.random.key(0), (128, 64)), "nf4", 64, double_quant=True)
    x = jnp.ones((4, 128))
    _, vjp = jax.vjp(lambda x, q: qj.qmatmul(x, q), x, q)
    _, q_bar = vjp(jnp.ones((4, 64)))
    assert q_bar.codes.dtype == jax.dtypes.float0
    assert not np.any(np.asarray(q_bar.nested_absmax)) and not np.any(np.asarray(q_bar.nested_offset))


def _mlp_grad_temp_bytes(matmul, qs, x):
    def loss(x, qs):
        h = x
        for q in qs:
            h = jnp.tanh(matmul(h, q))
        return jnp.sum(h)

    return jax.jit(jax.grad(loss)).lower(x, qs).compile().memory_analysis().temp_size_in_bytes


def test_backward_keeps_no_dequantized_weight():
    """Four 1024 x 1024 layers: plain autodiff of x @ dequantize(q) keeps each
    dequantized float32 weight (4 MiB) for the backward pass; with qmatmul only one
    layer's dequantized weight is live at a time (the "xla" path materialises it
    per layer), so the temporaries stay below 1.5 weights."""
    qs = [qj.quantize(jax.random.normal(jax.random.key(i), (1024, 1024)), "nf4", 64, True) for i in range(4)]
    x = jnp.ones((8, 1024))
    ours = _mlp_grad_temp_bytes(qj.qmatmul, qs, x)
    naive = _mlp_grad_temp_bytes(lambda h, q: h @ qj.dequantize(q, jnp.float32), qs, x)
    weight_bytes = 1024 * 1024 * 4
    assert naive >= 3 * weight_bytes, naive  # the baseline really keeps the weights
    assert ours < 1.5 * weight_bytes, (ours, naive)


def test_bad_input_names_the_argument():
    q = qj.quantize(jnp.ones((128, 64)), "nf4")
    with pytest.raises(ValueError, match=r"x: last axis \(100,\) does not match the kernel's input size 128"):
        qj.qmatmul(jnp.ones((2, 100)), q)
    with pytest.raises(ValueError, match=r"path: unknown path 'pallas'"):
        qj.qmatmul(jnp.ones((2, 128)), q, path="pallas")
    with pytest.raises(ValueError, match=r"q: has stack dimensions \(2,\)"):
        qj.qmatmul(jnp.ones((2, 128)), jax.tree.map(lambda *a: jnp.stack(a), q, q))
    with pytest.raises(ValueError, match=r"q: qmatmul takes a 2-D kernel"):
        qj.qmatmul(jnp.ones((2, 4)), qj.quantize(jnp.ones((4, 8, 64)), "nf4", 32, contract_axes=(2,)))

"""The merged product `x @ (W + s·A@B)` used by `QLoRALinear` in float32 without dropout
(`qlora_jax/_src/ops/merged.py`), against float64 NumPy and against the separate adapter path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlora_jax as qj
from qlora_jax._src.nn import linear as linear_module
from qlora_jax._src.ops.merged import can_merge, lora_matmul
from qlora_jax.nnx import LoraConfig, QLoRALinear

SCALE = 1.5


def _operands(n_in: int, n_out: int, rank: int = 4, tokens: tuple[int, ...] = (4, 32)):
    k = jax.random.split(jax.random.key(0), 5)
    w = jax.random.normal(k[0], (n_in, n_out), jnp.float32) * 0.1
    x = jax.random.normal(k[1], (*tokens, n_in), jnp.float32)
    a = jax.random.normal(k[2], (n_in, rank), jnp.float32) * 0.2
    b = jax.random.normal(k[3], (rank, n_out), jnp.float32) * 0.2
    r = jax.random.normal(k[4], (*tokens, n_out), jnp.float32)  # the loss is sum(y * r)
    return w, x, a, b, r


# nf4 [128, 64]: packed row layout, dequantized with permuted columns on CPU; [96, 64]: flat layout
# (96 is not a multiple of the block); int8: 8-bit codes; None: a float32 kernel (plain LoRA).
@pytest.mark.parametrize("fmt, n_in", [("nf4", 128), ("nf4", 96), ("fp4", 128), ("int8", 128), (None, 128)])
def test_values_and_gradients_match_float64(fmt, n_in):
    w, x, a, b, r = _operands(n_in, 64)
    kernel = w if fmt is None else qj.quantize(w, fmt, block_size=64, double_quant=fmt == "nf4")
    w64 = np.asarray(w if fmt is None else qj.dequantize(kernel, jnp.float32), np.float64)
    x64, a64, b64, r64 = (np.asarray(t, np.float64) for t in (x, a, b, r))
    merged = w64 + SCALE * a64 @ b64
    expected = x64 @ merged
    got = lora_matmul(x, kernel, a, b, SCALE)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())

    def loss(x, a, b):
        return jnp.sum(lora_matmul(x, kernel, a, b, SCALE) * r)

    gx, ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, a, b)
    x2, r2 = x64.reshape(-1, n_in), r64.reshape(-1, 64)
    want = {"x": (r64 @ merged.T), "a": SCALE * x2.T @ (r2 @ b64.T), "b": SCALE * (x2 @ a64).T @ r2}
    for name, g in (("x", gx), ("a", ga), ("b", gb)):
        np.testing.assert_allclose(g, want[name], rtol=0, atol=2e-5 * np.abs(want[name]).max(), err_msg=name)


@pytest.mark.parametrize("quantized", [True, False])
def test_layer_merged_equals_separate_adapter(quantized, monkeypatch):
    """QLoRALinear in float32 without dropout takes the merged product; forcing the separate
    path gives the same outputs and gradients (to float32 rounding)."""
    w, x, _, _, r = _operands(128, 64)
    kernel = qj.quantize(w, "nf4", block_size=64, double_quant=True) if quantized else w
    layer = QLoRALinear(kernel, jnp.linspace(-1, 1, 64), lora=LoraConfig(rank=4, alpha=6), rngs=nnx.Rngs(0))
    layer.lora_b[...] = jax.random.normal(jax.random.key(7), layer.lora_b.shape) * 0.3
    assert can_merge(x, layer.kernel.get_value())

    graphdef, lora, rest = nnx.split(layer, nnx.LoRAParam, ...)

    def run():
        def loss(lora, x):
            return jnp.sum(nnx.merge(graphdef, lora, rest)(x) * r)

        value, (g_lora, g_x) = jax.value_and_grad(loss, argnums=(0, 1))(lora, x)
        return value, g_x, g_lora["lora_a"][...], g_lora["lora_b"][...], layer(x)

    merged = run()
    calls = []
    real = linear_module.lora_matmul
    monkeypatch.setattr(linear_module, "lora_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    run()
    assert calls, "the float32, dropout-free layer did not take the merged product"
    monkeypatch.setattr(linear_module, "can_merge", lambda x, k: False)
    separate = run()
    for name, m, s in zip(("loss", "grad x", "grad A", "grad B", "y"), merged, separate, strict=True):
        np.testing.assert_allclose(m, s, rtol=1e-5, atol=1e-5 * float(np.abs(np.asarray(s)).max()), err_msg=name)


def test_dropout_and_half_precision_keep_the_separate_adapter(monkeypatch):
    w, x, _, _, _ = _operands(128, 64)
    q = qj.quantize(w, "nf4", block_size=64)
    calls = []
    real = linear_module.lora_matmul
    monkeypatch.setattr(linear_module, "lora_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = QLoRALinear(q, lora=LoraConfig(rank=4, alpha=8, dropout=0.1), rngs=nnx.Rngs(0))
    layer(x)  # training mode, dropout active: the adapter input differs from x
    assert not calls
    layer(x, deterministic=True)  # no dropout: merged
    assert len(calls) == 1
    half = QLoRALinear(q, lora=LoraConfig(rank=4, alpha=8), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    half(x)  # bfloat16 would round the adapter's update away in W + s·A@B
    assert len(calls) == 1
    assert not can_merge(x.astype(jnp.bfloat16), q)
    assert not can_merge(x, jax.tree.map(lambda leaf: leaf[None], q))  # stacked: one layer at a time
    assert not can_merge(x[:1, :8], q)  # 8 tokens: forming A @ B would cost more than the thin products
    layer(x[:1, :8], deterministic=True)
    assert len(calls) == 1


def test_bad_factors_are_named():
    w, x, a, b, _ = _operands(128, 64)
    with pytest.raises(ValueError, match=r"lora_matmul: factors a \(128, 4\), b \(3, 64\) do not fit"):
        lora_matmul(x, w, a, b[:3], SCALE)
    with pytest.raises(ValueError, match=r"lora_matmul: cannot merge x \(4, 32, 128\) bfloat16"):
        lora_matmul(x.astype(jnp.bfloat16), w, a, b, SCALE)

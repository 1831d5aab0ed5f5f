"""`merge_lora` / `unmerge_lora` / `merge_report`, and `merged_kernel`, the merge they share with `save_merged`.

(1) the merged model is a plain Flax model (no QuantizedWeight / FrozenWeight /
LoRAParam) that computes the QLoRA model's outputs, checked against the QLoRA
model and a float64 NumPy reference; the merged kernels equal PEFT's merge
`W + s·(B@A)` computed in float64 NumPy to float32 rounding, and `save_merged`'s
tensors equal `merge_lora`'s kernels bit for bit; (2) `requantize` quantizes the
merged kernels on request only and `merge_report` gives an error equal to an
independent NumPy computation; (3) `unmerge_lora` restores the original packed
codes bit for bit and the outputs exactly; (4) stacked and shared layers;
(5) errors.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlora_jax as qj
from qlora_jax import models
from qlora_jax._src.config import LoraConfig, QuantConfig
from qlora_jax._src.nn import FrozenWeight, QuantizedWeight
from qlora_jax._src.surgery import MergeReport, apply_qlora, merge_lora, merge_report, unmerge_lora
from qlora_jax._src.surgery.merge import merged_kernel

D, H, HD = 64, 4, 32


class Net(nnx.Module):
    """Linear -> LinearGeneral (heads) -> Einsum (join heads) -> Linear head; `up_alias` shares `up`."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.heads = nnx.LinearGeneral(2 * D, (H, HD), rngs=rngs)
        self.out = nnx.Einsum("bnh,nhd->bd", (H, HD, D), (D,), rngs=rngs)
        self.head = nnx.Linear(D, 8, rngs=rngs)
        self.up_alias = self.up

    def __call__(self, x):  # [b, D] -> [b, 8]
        h = jnp.tanh(self.heads(jax.nn.relu(self.up(x))))  # [b, H, HD]
        return self.head(x + self.out(h))


def _np(a):
    return np.asarray(a, np.float64)


def _reference(model, x):
    """Float64 NumPy forward of a QLoRA `Net`: dequantized kernels plus s·A⊗B, written by hand."""
    def kernel(layer, delta_spec):
        w = _np(qj.dequantize(layer.kernel.get_value(), jnp.float32))
        if hasattr(layer, "lora_a"):
            w = w + layer.scale * np.einsum(delta_spec, _np(layer.lora_a[...]), _np(layer.lora_b[...]))
        return w

    x = _np(x)
    u = np.maximum(x @ kernel(model.up, "ir,ro->io") + _np(model.up.bias[...]), 0)
    h = np.tanh(np.einsum("bi,inh->bnh", u, kernel(model.heads, "ir,rnh->inh")) + _np(model.heads.bias[...]))
    y = x + np.einsum("bnh,nhd->bd", h, kernel(model.out, "nhr,rd->nhd")) + _np(model.out.bias[...])
    return y @ _np(model.head.kernel[...]) + _np(model.head.bias[...])


@pytest.fixture(scope="module")
def qlora_net():
    """A QLoRA `Net` (adapters on up and out, heads quantized only, head float) with nonzero B; cloned per use."""
    model = nnx.jit(lambda: Net(nnx.Rngs(0)))()
    model = apply_qlora(model, quant=QuantConfig(), lora=LoraConfig(rank=4, alpha=8, dropout=0.1,
                                                                    targets=["up", "out"]), rngs=nnx.Rngs(1))
    for i, layer in enumerate((model.up, model.out)):
        layer.lora_b[...] = jax.random.normal(jax.random.key(i), layer.lora_b.shape) * 0.1
    model.eval()
    return lambda: nnx.clone(model)


X = jnp.asarray(np.random.default_rng(0).standard_normal((5, D)), jnp.float32)
_forward = nnx.jit(lambda model, x: model(x))


def _packed(model):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, QuantizedWeight))]


# -- (1) merge -------------------------------------------------------------------------------


def test_merged_model_is_plain_flax_and_computes_the_same(qlora_net):
    model = qlora_net()
    assert [type(model.up).__name__, type(model.heads).__name__, type(model.out).__name__] == \
        ["QLoRALinear", "QuantLinearGeneral", "QLoRAEinsum"]
    expected, ref = _forward(model, X), _reference(model, X)
    np.testing.assert_allclose(expected, ref, rtol=1e-5, atol=1e-5)
    head, original = model.head, nnx.clone(model)
    merged = merge_lora(model)
    assert merged is model and merged.head is head and merged.up_alias is merged.up  # in place; sharing kept
    assert [type(merged.up), type(merged.heads), type(merged.out)] == [nnx.Linear, nnx.LinearGeneral, nnx.Einsum]
    assert all(type(m).__module__.startswith("flax.") for p, m in nnx.iter_modules(merged) if p)
    for kind in (QuantizedWeight, FrozenWeight, nnx.LoRAParam):
        assert not jax.tree.leaves(nnx.state(merged, kind)), kind
    report = merge_report(merged, original)
    assert type(original.up).__name__ == "QLoRALinear"  # the clone taken before merging is left as it was
    assert [(r.path, r.layer, r.merged, r.kernel_shape, r.folded, r.dtype, r.requant_error) for r in report.layers] \
        == [("heads", "QuantLinearGeneral", "LinearGeneral", (2 * D, H, HD), False, np.dtype(np.float32), None),
            ("out", "QLoRAEinsum", "Einsum", (H, HD, D), True, np.dtype(np.float32), None),
            ("up", "QLoRALinear", "Linear", (D, 2 * D), True, np.dtype(np.float32), None)]
    assert "QLoRAEinsum" in str(report)
    y = _forward(merged, X)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    assert not np.allclose(expected, _forward(merge_lora(_without_adapters(qlora_net())), X), atol=1e-3)


def _without_adapters(model):
    for layer in (model.up, model.out):
        layer.lora_b[...] = jnp.zeros_like(layer.lora_b[...])
    return model


def test_float_lora_merges_into_its_float_kernel_and_dtype_is_selectable():
    model = nnx.Sequential(nnx.Linear(D, 16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    kernel = _np(model.layers[0].kernel[...])
    model = apply_qlora(model, quant=None, lora=LoraConfig(rank=2, alpha=2, targets=["0"]), rngs=nnx.Rngs(1))
    layer = model.layers[0]
    layer.lora_b[...] = jnp.ones((2, 16))
    a, b = _np(layer.lora_a[...]), _np(layer.lora_b[...])
    merged = merge_lora(nnx.clone(model))
    assert merge_report(merged, model).layers[0].dtype == jnp.bfloat16
    assert merged.layers[0].kernel[...].dtype == jnp.bfloat16
    np.testing.assert_allclose(_np(merged.layers[0].kernel[...]), kernel + a @ b, rtol=1e-2, atol=1e-2)
    original = nnx.clone(model)
    merged = merge_lora(model, dtype=jnp.float32)
    assert merge_report(merged, original).layers[0].dtype == np.float32
    np.testing.assert_allclose(_np(merged.layers[0].kernel[...]), kernel + a @ b, rtol=1e-6, atol=1e-6)


def _within_float32_rounding(got, ref, w, a, b, scale):
    """`got` (float32) equals the float64 `ref = w + scale · a @ b` up to float32 rounding: the rank-r dot, the
    scaling and the sum each round once, so |got − ref| ≤ (r + 2) · 2⁻²⁴ · (|w| + |scale| · |a| @ |b|)."""
    assert got.dtype == np.float32 and got.shape == ref.shape
    bound = (a.shape[-1] + 2) * 2.0**-24 * (np.abs(w) + abs(scale) * np.abs(a) @ np.abs(b))
    excess = np.abs(_np(got) - ref) - bound
    assert (excess <= 0).all(), f"{(excess > 0).sum()} elements beyond float32 rounding, worst by {excess.max():.3g}"


def test_merged_kernels_are_peft_merge_to_float32_rounding(qlora_net):
    """PEFT's merge `W + s·(B@A)` in its `[out, in]` layout, in float64 NumPy, against `merge_lora`'s kernels."""
    model = qlora_net()
    merged = merge_lora(nnx.clone(model))
    for name, n_in in (("up", D), ("out", H * HD)):
        layer = getattr(model, name)
        w = _np(qj.dequantize(layer.kernel.get_value(), jnp.float32)).reshape(n_in, -1).T  # [out, in]
        lora_a = _np(layer.lora_a[...]).reshape(n_in, -1).T  # PEFT's lora_A.weight [r, in]
        lora_b = _np(layer.lora_b[...]).reshape(layer.rank, -1).T  # PEFT's lora_B.weight [out, r]
        ref = w + layer.scale * (lora_b @ lora_a)  # peft.tuners.lora.Linear.get_delta_weight, fan_in_fan_out=False
        got = np.asarray(getattr(merged, name).kernel[...]).reshape(n_in, -1).T
        _within_float32_rounding(got, ref, w, lora_b, lora_a, layer.scale)
        assert not np.allclose(got, w, atol=1e-4)  # the adapter is folded in


def test_save_merged_tensors_equal_merge_lora_kernels_bit_for_bit():
    """`merged_tensors` (what `save_merged` writes) and `merge_lora` share `merged_kernel`: the same bits, in float32
    and bfloat16, from the QLoRA model and from the merged one; both are PEFT's merge to float32 rounding."""
    cfg = models.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2)
    model = apply_qlora(models.CausalLM(cfg, rngs=nnx.Rngs(0)), quant=QuantConfig(block_size=32),
                        lora=LoraConfig(rank=4, alpha=8, targets="all-linear"), rngs=nnx.Rngs(1))
    for i, (_, v) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        v.set_value(jax.random.normal(jax.random.key(i), v.get_value().shape) * 0.1)
    tensors = dict(models.merged_tensors(model))
    tensors16 = dict(models.merged_tensors(model, jnp.bfloat16))
    merged, merged16 = merge_lora(nnx.clone(model)), merge_lora(nnx.clone(model), dtype=jnp.bfloat16)
    layers = [(p, m) for p, m in nnx.iter_modules(model.layers) if isinstance(m, qj.nnx.QLoRALinear)]
    assert len(layers) == 7
    for path, layer in layers:
        names = ".".join(map(str, path))
        for i in range(cfg.num_layers):
            key = f"model.layers.{i}.{names}.weight"
            for ours, into in ((tensors, merged), (tensors16, merged16)):
                kernel = functools.reduce(getattr, path, into.layers).kernel[...][i]  # [in, out]
                assert ours[key].dtype == kernel.dtype and ours[key].shape == kernel.shape[::-1]
                np.testing.assert_array_equal(ours[key], np.asarray(kernel).T)
            np.testing.assert_array_equal(tensors16[key], tensors[key].astype(jnp.bfloat16))  # rounded once
            w = _np(qj.dequantize(jax.tree.map(lambda x, i=i: x[i], layer.kernel.get_value()), jnp.float32)).T
            lora_a, lora_b = _np(layer.lora_a[...][i]).T, _np(layer.lora_b[...][i]).T  # [r, in], [out, r]
            _within_float32_rounding(tensors[key], w + layer.scale * (lora_b @ lora_a), w, lora_b, lora_a,
                                     layer.scale)
    again = dict(models.merged_tensors(merged))  # the merged model exports the same checkpoint
    assert again.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(again[key], value)


# -- (2) requantize ----------------------------------------------------------------------------


def test_requantize_is_explicit_and_reports_its_error(qlora_net):
    floats = merge_lora(qlora_net())
    model = qlora_net()
    heads_codes, original = model.heads.kernel.get_value().codes, nnx.clone(model)
    requantized = merge_lora(model, requantize=QuantConfig(fmt="nf4", block_size=64, double_quant=True))
    report = merge_report(requantized, original)
    assert report.paths == ("out", "up")  # the quantized-only layer keeps its codes, untouched
    assert type(requantized.heads).__name__ == "QuantLinearGeneral"
    np.testing.assert_array_equal(requantized.heads.kernel.get_value().codes, heads_codes)
    assert [type(requantized.up).__name__, type(requantized.out).__name__] == ["QuantLinear", "QuantEinsum"]
    assert not jax.tree.leaves(nnx.state(requantized, nnx.LoRAParam))
    for row, axes in zip(report.layers, [(0, 1), (0,)], strict=True):
        w = getattr(floats, row.path).kernel[...]  # the float merge of the same layer
        q = getattr(requantized, row.path).kernel.get_value()
        own = qj.quantize(w, "nf4", 64, double_quant=True, contract_axes=axes)  # independent requantization
        for mine, theirs in zip(jax.tree.leaves(q), jax.tree.leaves(own), strict=True):
            np.testing.assert_array_equal(mine, theirs)
        err = np.linalg.norm(_np(qj.dequantize(q, jnp.float32)) - _np(w)) / np.linalg.norm(_np(w))
        assert 0.01 < row.requant_error < 0.2
        np.testing.assert_allclose(row.requant_error, err, rtol=1e-4)
    assert report.max_requant_error == max(r.requant_error for r in report.layers)
    y = _forward(requantized, X)
    assert not np.allclose(y, _forward(floats, X), atol=1e-4)  # requantization changes the outputs...
    np.testing.assert_allclose(y, _forward(floats, X), rtol=0.2, atol=0.2)  # ...by quantization noise


# -- (3) unmerge --------------------------------------------------------------------------------


@pytest.mark.parametrize(("requantize", "dtype"), [(None, None), (QuantConfig(fmt="int8"), None),
                                                   (None, jnp.bfloat16), (QuantConfig(fmt="nf4"), jnp.bfloat16)])
def test_unmerge_restores_the_original_codes_bit_for_bit(qlora_net, requantize, dtype):
    model = qlora_net()
    packed, adapters = _packed(model), jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    expected = _forward(model, X)
    original = nnx.clone(model)
    for _ in range(2):  # `original` is left as it was: merge and unmerge again
        merged = merge_lora(model, requantize=requantize, dtype=dtype)
        report = merge_report(merged, original)
        assert report.paths == (("heads", "out", "up") if requantize is None else ("out", "up"))
        assert {r.dtype for r in report.layers} == {np.dtype(dtype or np.float32)}
        restored = unmerge_lora(merged, original)
        assert restored is model and restored.up_alias is restored.up
        assert [type(restored.up).__name__, type(restored.heads).__name__, type(restored.out).__name__] == \
            ["QLoRALinear", "QuantLinearGeneral", "QLoRAEinsum"]
        assert all(getattr(restored, p) is not getattr(original, p) for p in ("up", "heads", "out"))  # copies
        for a, b in zip(packed, _packed(restored), strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(adapters, jax.tree.leaves(nnx.state(restored, nnx.LoRAParam)), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(_forward(restored, X), expected)


def test_unmerge_refuses_a_changed_kernel_and_a_foreign_model(qlora_net):
    model = qlora_net()
    original = nnx.clone(model)
    merged = merge_lora(model)
    merged.up.kernel[...] = merged.up.kernel[...] + 1e-3  # e.g. trained after merging
    with pytest.raises(ValueError, match=r"up: its kernel is not the one merge_lora installed \(max \|difference\| "
                                         r"0.001\)"):
        unmerge_lora(merged, original)
    assert type(merged.out) is nnx.Einsum  # checked before any change
    with pytest.raises(ValueError, match=r"no layer of the original model is merged in the model"):
        unmerge_lora(qlora_net(), original)
    with pytest.raises(ValueError, match=r"heads: not found in the model"):
        unmerge_lora(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0))), original)
    merged.heads = nnx.Linear(2 * D, H * HD, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"heads: expected the LinearGeneral that merge_lora installs for a "
                                         r"QuantLinearGeneral, or that QuantLinearGeneral, found a Linear"):
        unmerge_lora(merged, original)
    with pytest.raises(ValueError, match=r"heads: expected the LinearGeneral"):
        merge_report(merged, original)
    with pytest.raises(TypeError, match=r"original: expected the model before merging"):
        unmerge_lora(merged, {"up": None})
    with pytest.raises(TypeError, match=r"original: expected the model before merging"):
        merge_report(merged, None)
    model = qlora_net()
    original = nnx.clone(model)
    requantized = merge_lora(model, requantize=QuantConfig(fmt="int8"))
    q = requantized.out.kernel.get_value()
    requantized.out.kernel.set_value(dataclasses.replace(q, codes=q.codes.at[(0,) * q.codes.ndim].add(1)))
    with pytest.raises(ValueError, match=r"out: its kernel is not the one merge_lora installed \(its packed codes or "
                                         r"scales differ\)"):
        unmerge_lora(requantized, original)


# -- (4) stacked layers -----------------------------------------------------------------------


class Stack(nnx.Module):
    def __init__(self, n, rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return nnx.Linear(D, D, rngs=rngs)

        self.fc = create(rngs)

    def __call__(self, x):
        return nnx.scan(lambda x, fc: jnp.tanh(fc(x)), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.fc)


def test_stacked_layers_merge_and_unmerge():
    model = apply_qlora(nnx.jit(lambda: Stack(3, nnx.Rngs(0)))(), quant=QuantConfig(), lora=LoraConfig(rank=2),
                        rngs=nnx.Rngs(1))
    model.fc.lora_b[...] = jax.random.normal(jax.random.key(0), (3, 2, D)) * 0.1
    packed, expected, original = _packed(model), _forward(model, X), nnx.clone(model)
    merged = merge_lora(model)
    assert type(merged.fc) is nnx.Linear and merged.fc.kernel.shape == (3, D, D)
    assert merge_report(merged, original).layers[0].kernel_shape == (3, D, D)
    np.testing.assert_allclose(_forward(merged, X), expected, rtol=1e-5, atol=1e-5)
    restored = unmerge_lora(merged, original)
    for a, b in zip(packed, _packed(restored), strict=True):
        np.testing.assert_array_equal(a, b)


# -- (5) errors ---------------------------------------------------------------------------------


def test_nothing_to_merge_and_bad_arguments(qlora_net):
    plain = nnx.Sequential(nnx.Linear(D, D, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"merge_lora: the model has no layer over a frozen kernel .*nothing to "
                                         r"merge"):
        merge_lora(plain)
    quantized = apply_qlora(nnx.Sequential(nnx.Linear(D, D, rngs=nnx.Rngs(0))), quant=QuantConfig(), lora=None)
    with pytest.raises(ValueError, match=r"merge_lora: the model has no layer with a LoRA adapter .*nothing to merge "
                                         r"\(found only layers/0\)"):
        merge_lora(quantized, requantize=QuantConfig())
    model = qlora_net()
    with pytest.raises(ValueError, match=r"dtype: .*int32.* is not float32, bfloat16, float16 or None"):
        merge_lora(model, dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"requantize: expected a QuantConfig or None, got dict"):
        merge_lora(model, requantize={"fmt": "nf4"})
    assert type(model.up).__name__ == "QLoRALinear"  # nothing changed
    original = nnx.clone(model)
    assert merge_lora(model) is model
    assert isinstance(merge_report(model, original), MergeReport)
    with pytest.raises(ValueError, match=r"index: 0 does not pick an entry of a layer stacked as \(\)"):
        merged_kernel(original.up, index=0)

"""DoRA / QDoRA (`LoraConfig(use_dora=True)`) against PEFT's implementation, bitsandbytes and float64 NumPy.

PEFT's DoRA (peft/tuners/lora/dora.py): `lora_magnitude_vector` m per output, initialised to the row norms of
the (dequantized) torch weight; forward `c · (x W) + c · s·B(A(x)) + bias`, `c = m / ‖W + s·B A‖` with the norm
detached; merge `c ⊙ (W + s·B A)`. bitsandbytes' CPU 4-bit *forward* is not an exact reference (see
../shared/reference/bitsandbytes-4bit.md), so over a 4-bit base PEFT runs over the bnb model for the magnitude's
init (which reads bnb's dequantized weight) and over a float32 model holding the exactly dequantized weights
(`codebook[code] · absmax`) for forward, gradients and adapter loading.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from test_nnx_layers import naive_scan_temporaries

import qlora_jax as qj
from qlora_jax import models
from qlora_jax._src.surgery.merge import merged_kernel

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCKS = {p: ("self_attn" if p in ALL[:4] else "mlp") for p in ALL}
RANK, ALPHA = 4, 8
# Every output size a multiple of 64 (bitsandbytes' CPU 4-bit layers need it): no GQA, intermediate 128.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
IDS = np.random.default_rng(0).integers(0, 128, (2, 10))
WEIGHTS = np.random.default_rng(1).standard_normal((2, 10, 128)).astype(np.float32)  # loss = sum(logits * w)


def _f64(x):
    return np.asarray(x, np.float64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dora") / "llama"
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attn_implementation="eager")).float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)
    return path, hf


def _peft(base, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=ALL, lora_dropout=0.0,
                                           use_dora=True, **kw))


def _dora_modules(peft_model):
    """`{(proj, i): the PEFT LoRA module}` over the decoder layers."""
    layers = peft_model.base_model.model.model.layers
    return {(p, i): getattr(getattr(layer, BLOCKS[p]), p) for p in ALL for i, layer in enumerate(layers)}


def _ours(model, proj):
    return getattr(getattr(model.layers, BLOCKS[proj]), proj)


def _logits(torch_model):
    with torch.no_grad():
        return torch_model(torch.from_numpy(IDS)).logits.numpy()


def _assert_init_magnitude(model, peft_model, rtol):
    for (p, i), mod in _dora_modules(peft_model).items():
        np.testing.assert_allclose(np.asarray(_ours(model, p).lora_magnitude_vector[...][i]),
                                   mod.lora_magnitude_vector["default"].weight.detach().numpy(), rtol=rtol,
                                   err_msg=f"layer {i} {p}")


def _loss(model):
    logits = model(jnp.asarray(IDS))
    return jnp.sum(logits * WEIGHTS), logits


# The adapters' gradients of `sum(logits · w)` and the logits, compiled once per model structure.
_grads_and_logits = nnx.jit(nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True))


def _assert_grads_match(grads, peft_model, atol):
    """`grads` (w.r.t. A, B and m of every layer) equal PyTorch autograd's through PEFT (atol: relative to each
    tensor's largest entry)."""
    peft_model.train()  # lora_dropout=0: the same computation as eval, with gradients
    peft_model.zero_grad()
    (peft_model(torch.from_numpy(IDS)).logits * torch.from_numpy(WEIGHTS)).sum().backward()
    for (p, i), mod in _dora_modules(peft_model).items():
        g = _ours(grads, p)
        for mine, ref in ((g.lora_a[...][i], mod.lora_A["default"].weight.grad.T),
                          (g.lora_b[...][i], mod.lora_B["default"].weight.grad.T),
                          (g.lora_magnitude_vector[...][i], mod.lora_magnitude_vector["default"].weight.grad)):
            scale = float(ref.abs().max())
            assert scale > 0
            np.testing.assert_allclose(np.asarray(mine), ref.numpy(), rtol=0, atol=atol * scale,
                                       err_msg=f"layer {i} {p}")
    peft_model.eval()


def _merged_reference(w, a, b, m, scale):
    """PEFT's DoRA merge in float64, Flax layout: w [in, out], a [in, r], b [r, out], m [out]."""
    v = _f64(w) + scale * _f64(a) @ _f64(b)
    return v * (_f64(m) / np.linalg.norm(v, axis=0))


def _exact_reference(hf, model):
    """A float32 copy of `hf` whose decoder projections are `model`'s exactly dequantized kernels."""
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for p in ALL:
            w = np.asarray(qj.dequantize(_ours(model, p).kernel.get_value(), jnp.float32))  # [L, in, out]
            for i, layer in enumerate(ref.model.layers):
                getattr(getattr(layer, BLOCKS[p]), p).weight.copy_(torch.from_numpy(w[i].T.copy()))
    return ref


def test_qdora_matches_peft(checkpoint, tmp_path):
    """A bitsandbytes NF4 checkpoint loaded here with DoRA on every projection, against PEFT:

    - the initial magnitude equals PEFT's over the bnb model (norms of bnb's dequantized weights), and is
      sharded along its kernel's output axis;
    - a PEFT DoRA adapter (random B, changed m) over the exactly dequantized float32 base loads here: logits and
      the gradients of A, B, m equal PEFT's (1e-5);
    - after one optimizer step here (B != 0, m changed) `save_peft_adapter` writes PEFT's keys and config and
      loads in `PeftModel` with the same logits (1e-4);
    - the merge equals PEFT's merge in float64 NumPy, and `save_merged` loads in transformers with PEFT's logits.
    """
    from peft import PeftModel

    path, hf = checkpoint
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    hf4 = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cpu")
    hf4.save_pretrained(tmp_path / "nf4")
    lora = qj.LoraConfig(rank=RANK, alpha=ALPHA, targets=ALL, use_dora=True)
    model = models.from_pretrained(tmp_path / "nf4", lora=lora)
    assert _ours(model, "q_proj").quantized
    _assert_init_magnitude(model, _peft(hf4), rtol=1e-5)
    specs = qj.partition_specs(model, qj.make_mesh({"fsdp": 1, "tensor": 8}), "tp")  # m: the kernel's output axis
    P = jax.sharding.PartitionSpec
    assert specs["layers"]["mlp"]["up_proj"]["lora_magnitude_vector"].get_value() == P(None, "tensor")
    assert specs["layers"]["mlp"]["down_proj"]["lora_magnitude_vector"].get_value() == P(None, None)

    peft_model = _peft(_exact_reference(hf, model))
    torch.manual_seed(1)
    with torch.no_grad():  # nonzero B, a changed magnitude
        for n, prm in peft_model.named_parameters():
            if "lora_B" in n:
                prm.copy_(torch.randn_like(prm) * 0.1)
            elif "lora_magnitude_vector" in n:
                prm.mul_(1 + 0.2 * torch.rand_like(prm))
    peft_model.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"  # PEFT's key (no ".weight")
    assert saved[key].shape == (64,)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    models.load_peft_adapter(model, tmp_path / "peft")
    grads, logits = _grads_and_logits(model)
    np.testing.assert_allclose(np.asarray(logits), _logits(peft_model.eval()), rtol=0, atol=1e-5)
    _assert_grads_match(grads, peft_model, atol=1e-5)

    before = np.asarray(_ours(model, "up_proj").lora_magnitude_vector[...])
    nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.LoRAParam).update(model, grads)
    up = _ours(model, "up_proj")
    assert not np.allclose(up.lora_magnitude_vector[...], before)
    models.save_peft_adapter(model, tmp_path / "adapter")
    assert sorted(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == sorted(saved)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    trained = PeftModel.from_pretrained(_exact_reference(hf, model), tmp_path / "adapter").eval()
    expected = _logits(trained)
    np.testing.assert_allclose(np.asarray(_grads_and_logits(model)[1]), expected, rtol=0, atol=1e-4)

    k = _ours(model, "k_proj")
    w = qj.dequantize(k.kernel.get_value(), jnp.float32)[1]
    ref = _merged_reference(w, k.lora_a[...][1], k.lora_b[...][1], k.lora_magnitude_vector[...][1], k.scale)
    np.testing.assert_allclose(np.asarray(merged_kernel(k)[1]), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    models.save_merged(model, tmp_path / "merged")
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    np.testing.assert_allclose(_logits(merged), expected, rtol=0, atol=1e-4)


def _dora_reference(x, w, bias, a, b, m, scale, h=None):
    """PEFT's DoRA forward in float64 (Flax layout, w [in, out]); `h`: the dropped-out adapter input, if any."""
    x, w = _f64(x), _f64(w)
    v = w + scale * _f64(a) @ _f64(b)
    c = _f64(m) / np.linalg.norm(v, axis=0)
    if h is None:
        return c * (x @ w + scale * x @ _f64(a) @ _f64(b)) + _f64(bias)
    h = _f64(h)
    return x @ w + _f64(bias) + (c - 1) * (h @ w) + c * scale * (h @ _f64(a) @ _f64(b))


def test_dora_layers_match_numpy():
    """NNX QLoRALinear (flat-layout packed kernel, with and without dropout, and through the merged product with
    its gradients of A, B, m), QLoRAEinsum (output axes permuted
    and interleaved with x's) and Linen (init magnitude, forward with dropout, lora_mask, convert_params and the
    interceptor) against float64 NumPy; a fresh DoRA layer changes nothing."""
    import flax.linen

    from qlora_jax._src.ops.merged import can_merge
    from qlora_jax.linen import QLoRADense, convert_params, dense_forward, lora_mask, qlora_interceptor
    from qlora_jax.nnx import QLoRAEinsum, QLoRALinear

    rng = np.random.default_rng(2)
    lora = qj.LoraConfig(rank=4, alpha=8, dropout=0.25, use_dora=True)
    q = qj.quantize(jnp.asarray(rng.standard_normal((100, 64)), jnp.float32), "nf4")  # 100 inputs: flat layout
    assert not q.row_layout
    bias = jnp.asarray(rng.standard_normal(64), jnp.float32)
    layer = QLoRALinear(q, bias, lora=lora, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((3, 100)), jnp.float32)
    w = _f64(qj.dequantize(q, jnp.float32))

    @nnx.jit
    def run(layer, x):  # eval output; the dropout mask the next call draws (on a copy); the train output
        return layer(x, deterministic=True), nnx.clone(layer)._adapter_input(x, False), layer(x)

    np.testing.assert_allclose(layer.lora_magnitude_vector[...], np.linalg.norm(w, axis=0), rtol=1e-6)
    np.testing.assert_allclose(run(layer, x)[0], _f64(x) @ w + _f64(bias), rtol=0, atol=1e-4)  # B = 0, m = ‖W‖
    layer.lora_b[...] = jnp.asarray(rng.standard_normal((4, 64)) * 0.1, jnp.float32)
    layer.lora_magnitude_vector[...] = layer.lora_magnitude_vector[...] * jnp.asarray(1 + rng.random(64) * 0.3,
                                                                                     jnp.float32)
    parts = (layer.lora_a[...], layer.lora_b[...], layer.lora_magnitude_vector[...], layer.scale)
    y_eval, h, y_train = run(layer, x)
    np.testing.assert_allclose(y_eval, _dora_reference(x, w, bias, *parts), rtol=0, atol=1e-4)
    assert 0 < float(jnp.mean(h == 0)) < 1
    np.testing.assert_allclose(y_train, _dora_reference(x, w, bias, *parts, h=h), rtol=0, atol=1e-4)

    # Enough tokens for the merged product `c · x @ (W + s·A @ B)` (ops/merged.py): output and gradients.
    xb = jnp.asarray(rng.standard_normal((100, 100)), jnp.float32)
    g = rng.standard_normal((100, 64))
    assert can_merge(xb, q)

    def loss(layer, x):
        y = layer(x, deterministic=True)
        return jnp.sum(y * g.astype(np.float32)), y

    grads, y = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True))(layer, xb)
    grads = (grads.lora_a[...], grads.lora_b[...], grads.lora_magnitude_vector[...])
    a64, b64, m64, s = _f64(parts[0]), _f64(parts[1]), _f64(parts[2]), parts[3]
    norm = np.linalg.norm(w + s * a64 @ b64, axis=0)
    np.testing.assert_allclose(y, _dora_reference(xb, w, bias, *parts), rtol=0, atol=1e-4)
    gc = g * (m64 / norm)  # the cotangent of x @ (W + s·A @ B)
    for got, ref in ((grads[0], s * _f64(xb).T @ gc @ b64.T), (grads[1], s * (_f64(xb) @ a64).T @ gc),
                     (grads[2], np.sum(g * (_f64(xb) @ (w + s * a64 @ b64)), axis=0) / norm)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())

    kernel = jnp.asarray(rng.standard_normal((4, 64, 8)), jnp.float32)  # [n, d, h], d contracted; a float kernel
    ein = QLoRAEinsum("bd,ndh->bhn", kernel, lora=qj.LoraConfig(rank=2, alpha=2, use_dora=True), rngs=nnx.Rngs(1))
    assert ein.lora_magnitude_vector.shape == (4, 8)
    ein.lora_b[...] = jnp.asarray(rng.standard_normal((2, 4, 8)) * 0.1, jnp.float32)
    ein.lora_magnitude_vector[...] = jnp.asarray(rng.random((4, 8)) + 1, jnp.float32)
    we = _f64(kernel).transpose(1, 0, 2).reshape(64, 32)  # [d, n*h]
    ref = _dora_reference(x[:, :64], we, np.zeros(32), ein.lora_a[...], _f64(ein.lora_b[...]).reshape(2, 32),
                          _f64(ein.lora_magnitude_vector[...]).reshape(32), 1.0)  # [b, n*h]
    np.testing.assert_allclose(nnx.jit(lambda m, v: m(v))(ein, x[:, :64]), ref.reshape(3, 4, 8).transpose(0, 2, 1),
                               rtol=0, atol=1e-4)

    dense = QLoRADense(64, lora=lora, quant=None, deterministic=True)  # a float kernel
    params = dense.init(jax.random.key(0), x)["params"]
    wl = _f64(dense.init(jax.random.key(0), x)["frozen"]["kernel"])
    np.testing.assert_allclose(params["lora_magnitude_vector"], np.linalg.norm(wl, axis=0), rtol=1e-6)
    assert lora_mask(params) == {"bias": False, "lora_a": True, "lora_b": True, "lora_magnitude_vector": True}
    key = jax.random.key(3)
    got = jax.jit(lambda *v: dense_forward(*v, scale=2.0, dropout_rate=0.25, dropout_rng=key, magnitude=parts[2]))(
        x, q, bias, parts[:2])  # over the packed kernel of the NNX layer above
    keep = jax.random.bernoulli(key, 0.75, x.shape)  # inverted dropout with this key, as torch.nn.Dropout
    np.testing.assert_allclose(got, _dora_reference(x, w, bias, *parts[:3], 2.0, h=np.where(keep, x / 0.75, 0)),
                               rtol=0, atol=1e-4)
    # An unmodified nn.Dense converted (packed) and run under the interceptor.
    converted, _ = convert_params({"Dense_0": {"kernel": jnp.asarray(wl, jnp.float32), "bias": bias}},
                                  quant=qj.QuantConfig(), lora=lora, rng=jax.random.key(4))
    wc = _f64(qj.dequantize(converted["frozen"]["Dense_0"]["kernel"], jnp.float32))
    fc = converted["params"]["Dense_0"]
    np.testing.assert_allclose(fc["lora_magnitude_vector"], np.linalg.norm(wc, axis=0), rtol=1e-6)
    fc["lora_b"], fc["lora_magnitude_vector"] = parts[1], parts[2]

    def intercepted(variables, x):
        with flax.linen.intercept_methods(qlora_interceptor(quant=qj.QuantConfig(), lora=lora, deterministic=True)):
            return flax.linen.Dense(64).apply({"params": variables["params"]["Dense_0"],
                                               "frozen": variables["frozen"]["Dense_0"]}, x)

    np.testing.assert_allclose(jax.jit(intercepted)(converted, x),
                               _dora_reference(x, wc, bias, fc["lora_a"], *parts[1:3], 2.0), rtol=0, atol=1e-4)


class _Stack(nnx.Module):
    """One stacked `QLoRALinear` (kernels [n, d, d]) applied `n` times with `nnx.scan`, `tanh` in between."""

    def __init__(self, layer):
        self.fc = layer

    def __call__(self, x):
        return nnx.scan(lambda h, fc: jnp.tanh(fc(h)), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.fc)


def test_qdora_gradient_step_keeps_no_dequantized_weights():
    """8 scanned d x d QDoRA layers (rank 4, with dropout: two products with the packed kernel per layer): the
    compiled gradient step's temporaries stay below 4 float32 weights, as for LoRA (the norm is computed from
    the codes and a packed product, without a gradient); the same scan over `x @ dequantize(q)` keeps every
    layer's weight."""
    from qlora_jax.nnx import QLoRALinear, quantize_kernel

    n, d = 8, 512
    q = quantize_kernel(jax.random.normal(jax.random.key(0), (n, d, d)) * 0.05, qj.QuantConfig())
    model = _Stack(QLoRALinear(q, lora=qj.LoraConfig(rank=4, dropout=0.1, use_dora=True), rngs=nnx.Rngs(1)))
    fc = model.fc
    assert fc.lora_magnitude_vector.shape == (n, d) and fc.kernel.get_value().row_layout
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora, rest, x):
        return jnp.sum(nnx.merge(graphdef, lora, rest, copy=True)(x))

    x = jnp.ones((8, d))
    compiled = jax.jit(jax.grad(loss)).lower(lora, rest, x).compile()
    ours = compiled.memory_analysis().temp_size_in_bytes
    grads = compiled(lora, rest, x)
    assert float(jnp.abs(grads["fc"]["lora_magnitude_vector"][...]).sum()) > 0

    naive_bytes = naive_scan_temporaries(fc, x)
    weight_bytes = d * d * 4
    assert naive_bytes > n * weight_bytes, naive_bytes  # the baseline really keeps the weights
    assert ours < 4 * weight_bytes, (ours, naive_bytes)

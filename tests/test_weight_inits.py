"""PiSSA, OLoRA and LoftQ inits (`LoraConfig.init`) against PEFT's own init and a NumPy LoftQ written out here.

PEFT computes PiSSA and OLoRA on CPU with float weights; its LoftQ needs CUDA, so LoftQ is checked against the
paper's alternation written below in NumPy with bitsandbytes' own NF4 (`quantize_4bit` on CPU). SVD factors are
unique up to the sign of each singular pair (u_i, v_i); the comparisons align that sign first.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import qlora_jax as qj
from qlora_jax import models
from qlora_jax.linen import FROZEN, convert_params
from qlora_jax.nnx import weight_init

RANK = 4


def _spectral(rng, rows, cols, top, noise=0.02):
    """A `[rows, cols]` float32 matrix: singular values `top` (well separated) plus Gaussian noise."""
    u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    k = len(top)
    return (u[:, :k] * np.asarray(top) @ v[:, :k].T + rng.normal(0, noise, (rows, cols))).astype(np.float32)


def _rel(x, y):
    return float(np.abs(np.asarray(x, np.float64) - y).max() / np.abs(y).max())


def _aligned(a, a_ref, b):
    """`a [in, r]`, `b [r, out]` with each rank component's sign flipped to match `a_ref` (the SVD's ambiguity)."""
    sign = np.sign(np.sum(np.asarray(a) * a_ref, axis=0))
    return np.asarray(a) * sign[None, :], np.asarray(b) * sign[:, None]


def _peft_linear(w, init, alpha, rank=RANK, use_dora=False):
    """PEFT's init on a torch Linear with weight `w [out, in]`: (A [r, in], B [out, r], base [out, in]), and with
    DoRA the magnitude too."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    net = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    net[0].weight.data = torch.tensor(w)
    torch.manual_seed(0)
    layer = get_peft_model(net, PeftConfig(r=rank, lora_alpha=alpha, target_modules=["0"], init_lora_weights=init,
                                           use_dora=use_dora)).base_model.model[0]
    out = (layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy(),
           layer.base_layer.weight.detach().numpy())
    return (*out, layer.lora_magnitude_vector["default"].weight.detach().numpy()) if use_dora else out


class _Net(nnx.Module):
    def __init__(self, n_in, n_out):
        self.proj = nnx.Linear(n_in, n_out, use_bias=False, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.proj(x)


def _bnb_nf4(w, double_quant=False):
    """bitsandbytes' NF4 of `w [out, in]` (block 64): (packed codes, dequantized)."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(torch.tensor(w), blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return packed.numpy().ravel(), F.dequantize_4bit(packed, state).numpy()


def test_pissa_and_olora_equal_peft_in_nnx_linen_and_over_nf4():
    """A, B and the residual base as PEFT computes them (PiSSA with alpha = r/2, OLoRA with alpha = 2r) through
    `apply_qlora`; PiSSA also through Linen's `convert_params`, and over NF4, where the stored base is
    bitsandbytes' NF4 of PEFT's residual."""
    w = _spectral(np.random.default_rng(0), 32, 64, top=(20, 15, 11, 8, 6))  # torch layout [out, in]
    for init, alpha in (("olora", 8), ("pissa", 2)):
        a_ref, b_ref, base_ref = _peft_linear(w, init, alpha)
        a_ref, b_ref, base_ref = a_ref.T, b_ref.T, base_ref.T  # Flax layout: [in, r], [r, out], [in, out]
        lora = qj.LoraConfig(rank=RANK, alpha=alpha, init=init, targets=["proj"])
        net = _Net(64, 32)
        net.proj.kernel[...] = jnp.asarray(w.T)
        net = qj.apply_qlora(net, quant=None, lora=lora, rngs=nnx.Rngs(1))
        a, b = _aligned(net.proj.lora_a[...], a_ref, net.proj.lora_b[...])
        assert _rel(a, a_ref) < 1e-5 and _rel(b, b_ref) < 1e-5, init
        assert _rel(net.proj.kernel.get_value(), base_ref) < 1e-5, init

    converted, _ = convert_params({"proj": {"kernel": jnp.asarray(w.T)}}, quant=None, lora=lora, rng=jax.random.key(1))
    node = converted["params"]["proj"]
    a, b = _aligned(node["lora_a"], a_ref, node["lora_b"])
    assert _rel(a, a_ref) < 1e-5 and _rel(b, b_ref) < 1e-5
    assert _rel(converted[FROZEN]["proj"]["kernel"], base_ref) < 1e-5

    # DoRA: the magnitude is the norm of the new weight (base + s·A@B = W), as PEFT's dora_init after PiSSA.
    *_, magnitude = _peft_linear(w, "pissa", 2, use_dora=True)
    net = _Net(64, 32)
    net.proj.kernel[...] = jnp.asarray(w.T)
    net = qj.apply_qlora(net, quant=None, lora=dataclasses.replace(lora, use_dora=True), rngs=nnx.Rngs(1))
    assert _rel(net.proj.lora_magnitude_vector[...], magnitude) < 1e-5

    # Over NF4: the same factors, and the residual quantized (PEFT quantizes its residual model the same way).
    net = _Net(64, 32)
    net.proj.kernel[...] = jnp.asarray(w.T)
    net = qj.apply_qlora(net, quant=qj.QuantConfig(), lora=lora, rngs=nnx.Rngs(1))
    a, _ = _aligned(net.proj.lora_a[...], a_ref, net.proj.lora_b[...])
    assert _rel(a, a_ref) < 1e-5
    codes, deq = _bnb_nf4(base_ref.T, double_quant=True)
    ours = net.proj.kernel.get_value()
    # The residuals agree to ~1e-6, so a code may differ only where a value sits on a decision boundary.
    assert np.mean(np.asarray(qj.to_bnb(ours)["weight"]).ravel() == codes) > 0.999
    assert _rel(qj.dequantize(ours, jnp.float32), deq.T) < 2e-2


def test_pissa_niter_low_rank_part_matches_peft_and_the_exact_svd():
    """Randomized SVD (`pissa_niter_4`): PEFT draws with torch's generator, we with JAX's, so the factors differ;
    the low-rank part `s·A@B` of both is the exact rank-r truncation to 1e-4, and base + s·A@B = W."""
    w = _spectral(np.random.default_rng(1), 32, 64, top=(30, 24, 18, 14, 3))
    u, s, vh = np.linalg.svd(w.astype(np.float64))
    exact = (u[:, :RANK] * s[:RANK] @ vh[:RANK]).T  # [in, out]
    for alpha in (8, 2):
        scale = alpha / RANK
        a_ref, b_ref, base_ref = _peft_linear(w, "pissa_niter_4", alpha)
        a, b, base = weight_init(w.T, lora=qj.LoraConfig(rank=RANK, alpha=alpha, init="pissa_niter_4"),
                                 key=jax.random.key(0))
        ours = scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
        theirs = scale * (b_ref.astype(np.float64) @ a_ref).T
        assert _rel(ours, exact) < 1e-4 and _rel(theirs, exact) < 1e-4
        assert _rel(np.asarray(base) + ours, w.T) < 1e-5
        assert _rel(base, base_ref.T) < 1e-3


def _loftq_reference(w, rank, scale, iters):
    """The LoftQ alternation on `w [out, in]` in NumPy (float64 SVD) with bitsandbytes' NF4: (A [r, in],
    B [out, r], packed codes of the base), so that `dequant(base) + scale·B@A` approximates `w`."""
    res = w
    for i in range(iters):
        codes, deq = _bnb_nf4(res)
        u, s, vh = np.linalg.svd((w - deq).astype(np.float64), full_matrices=False)
        root = np.sqrt(s[:rank] / scale)
        b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
        if i + 1 < iters:
            res = (w - scale * b @ a).astype(np.float32)
    return a, b, codes


@pytest.mark.parametrize("alpha", [2 * RANK, RANK / 2])
def test_loftq_equals_the_numpy_alternation_with_bitsandbytes_nf4(alpha):
    """Three rounds of LoftQ for alpha = 2r and r/2: `s·A@B` is the rank-r SVD of `W − dequant(Q)` (the
    scaling divided out, unlike PEFT's loftq_init), the base the NF4 codes of the last round."""
    w = _spectral(np.random.default_rng(2), 32, 64, top=(6, 5, 4, 3, 2, 1.5), noise=0.05)
    scale = alpha / RANK
    a_ref, b_ref, codes_ref = _loftq_reference(w, RANK, scale, 3)
    a, b, q = weight_init(w.T, lora=qj.LoraConfig(rank=RANK, alpha=alpha, init="loftq", loftq_iter=3),
                          quant=qj.QuantConfig(double_quant=False))
    a, b = _aligned(a, a_ref.T, b)
    assert _rel(a, a_ref.T) < 1e-4 and _rel(b, b_ref.T) < 1e-4
    assert np.mean(np.asarray(qj.to_bnb(q)["weight"]).ravel() == codes_ref) > 0.999
    # The alternation helps: after three rounds the error is below plain NF4's.
    w_eff = np.asarray(qj.dequantize(q, jnp.float32)) + scale * a @ b
    assert np.linalg.norm(w_eff - w.T) < 0.9 * np.linalg.norm(_bnb_nf4(w)[1] - w)


# -- a tiny Llama through from_pretrained ------------------------------------------------------------------------

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def spiky_llama(tmp_path_factory):
    """A tiny random Llama whose projections have a few dominant singular directions (as trained weights do),
    so that taking them out of the quantized base matters."""
    config = transformers.LlamaConfig(**TINY)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("_proj.weight"):
                out_f, in_f = p.shape
                u, _ = np.linalg.qr(rng.normal(size=(out_f, 3)))
                v, _ = np.linalg.qr(rng.normal(size=(in_f, 3)))
                p.add_(torch.tensor((u * np.array([1.2, 0.9, 0.6]) @ v.T).astype(np.float32)))
    path = tmp_path_factory.mktemp("spiky") / "llama"
    hf.save_pretrained(path)
    return path, hf


@jax.jit
def _forward(model, ids):
    return model(ids)


def _logits(model, ids):
    """Models of the same structure (layer types, shapes, scaling) share one compiled forward pass."""
    return np.asarray(_forward(model, jnp.asarray(ids)))


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids).long()).logits.numpy()


IDS = np.random.default_rng(4).integers(0, 128, (2, 16))
LOFTQ = qj.LoraConfig(rank=RANK, alpha=8, init="loftq", loftq_iter=2)


@pytest.fixture(scope="module")
def loftq_model(spiky_llama):
    """The spiky Llama loaded in NF4 (double quantization) with LoftQ adapters, streamed."""
    return models.from_pretrained(spiky_llama[0], quant=qj.QuantConfig(), lora=LOFTQ)


def test_pissa_and_loftq_on_nf4_are_closer_to_float_and_streaming_equals_apply_qlora(spiky_llama, loftq_model):
    path, hf = spiky_llama
    expected = _hf_logits(hf, IDS)
    quant = qj.QuantConfig()  # NF4 with double quantization

    def error(model):
        return float(np.linalg.norm(_logits(model, IDS) - expected) / np.linalg.norm(expected))

    plain = error(models.from_pretrained(path, quant=quant))
    pissa = error(models.from_pretrained(path, quant=quant, lora=qj.LoraConfig(rank=RANK, alpha=8, init="pissa")))
    loftq, streamed = error(loftq_model), loftq_model
    print(f"relative logit error vs float32: nf4 {plain:.4f}, pissa {pissa:.4f}, loftq {loftq:.4f}")
    assert pissa < 0.7 * plain and loftq < 0.8 * plain

    # The loader's per-tensor init equals apply_qlora on the loaded float model.
    whole = qj.apply_qlora(models.from_pretrained(path), quant=quant, lora=LOFTQ, rngs=nnx.Rngs(0))
    for name in ("q_proj", "down_proj"):
        parent = "self_attn" if name == "q_proj" else "mlp"
        got, want = getattr(getattr(streamed.layers, parent), name), getattr(getattr(whole.layers, parent), name)
        np.testing.assert_array_equal(got.kernel.get_value().codes, want.kernel.get_value().codes)
        np.testing.assert_allclose(got.lora_a[...], want.lora_a[...], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.lora_b[...], want.lora_b[...], rtol=0, atol=1e-6)
    np.testing.assert_allclose(_logits(streamed, IDS), _logits(whole, IDS), rtol=0, atol=1e-5)


def _train(model, seed):
    """Stands in for training: random changes to every adapter factor."""
    rng = np.random.default_rng(seed)
    for layer in {id(v): v for v in models.adapter_layers(model).values()}.values():
        for var in (layer.lora_a, layer.lora_b):
            var[...] = var[...] + jnp.asarray(rng.normal(0, 0.05, var.shape), var.dtype)


def test_exports_load_in_peft_over_the_original_and_over_the_residual_base(spiky_llama, loftq_model, tmp_path):
    """PiSSA/OLoRA: converted to a rank-2r LoRA over the ORIGINAL float checkpoint (PEFT's conversion), PEFT gives
    our logits; LoftQ on NF4: our adapter over the saved residual base gives our logits."""
    from peft import PeftModel

    path, _ = spiky_llama
    for init in ("pissa", "olora"):
        lora = qj.LoraConfig(rank=RANK, alpha=8, init=init, targets=["q_proj", "v_proj", "down_proj"])
        model = models.from_pretrained(path, lora=lora)
        models.save_peft_adapter(model, tmp_path / init / "initial")
        _train(model, 0)
        out = models.save_peft_adapter_over_original(model, tmp_path / init / "lora",
                                                     initial_adapter=tmp_path / init / "initial")
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (2 * RANK, 16)
        original = transformers.LlamaForCausalLM.from_pretrained(path).float().eval()
        peft_model = PeftModel.from_pretrained(original, out).eval()
        np.testing.assert_allclose(_logits(model, IDS), _hf_logits(peft_model, IDS), rtol=0, atol=1e-4)

    model = nnx.clone(loftq_model)
    _train(model, 1)
    models.save_residual_base(model, tmp_path / "loftq" / "base")
    models.save_peft_adapter(model, tmp_path / "loftq" / "adapter")
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "loftq" / "base").float().eval()
    # bitsandbytes quantizes the saved (dequantized) residual back to the 4-bit codes stored here.
    codes, _ = _bnb_nf4(base.model.layers[1].self_attn.q_proj.weight.detach().numpy(), double_quant=True)
    stored = jax.tree.map(lambda x: x[1], model.layers.self_attn.q_proj.kernel.get_value())
    np.testing.assert_array_equal(np.asarray(qj.to_bnb(stored)["weight"]).ravel(), codes)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "loftq" / "adapter").eval()
    np.testing.assert_allclose(_logits(model, IDS), _hf_logits(peft_model, IDS), rtol=0, atol=1e-4)


class _EinsumNet(nnx.Module):
    def __init__(self):
        self.proj = nnx.Einsum("bd,nhd->bnh", (4, 8, 64), rngs=nnx.Rngs(0))  # kernel [n, h, d], input axis d

    def __call__(self, x):
        return self.proj(x)


def test_pissa_on_an_einsum_kernel_whose_input_axis_is_last():
    """The factors of an einsum kernel `[n, h, d]` (input axis last): A `[d, r]`, B `[r, n, h]`; `s·A⊗B` is the
    rank-r truncation of the matrix `[d, n·h]` (NumPy SVD), the base the rest."""
    net = _EinsumNet()
    kernel = _spectral(np.random.default_rng(5), 32, 64, top=(9, 7, 5, 3, 2)).reshape(4, 8, 64)
    net.proj.kernel[...] = jnp.asarray(kernel)
    net = qj.apply_qlora(net, quant=None, lora=qj.LoraConfig(rank=RANK, alpha=2, init="pissa", targets=["proj"]),
                         rngs=nnx.Rngs(1))
    a, b = np.asarray(net.proj.lora_a[...]), np.asarray(net.proj.lora_b[...])
    assert a.shape == (64, RANK) and b.shape == (RANK, 4, 8)
    u, sv, vh = np.linalg.svd(kernel.reshape(32, 64).astype(np.float64))  # [n·h, d]: PyTorch layout [out, in]
    truncation = (u[:, :RANK] * sv[:RANK]) @ vh[:RANK]
    low_rank = 0.5 * np.einsum("dr,rnh->nhd", a, b).reshape(32, 64)
    assert _rel(low_rank, truncation) < 1e-5
    assert _rel(np.asarray(net.proj.kernel.get_value()).reshape(32, 64) + low_rank, kernel.reshape(32, 64)) < 1e-5


def test_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="needs a quantized base"):
        qj.apply_qlora(_Net(64, 32), quant=None, lora=qj.LoraConfig(init="loftq", targets=["proj"]),
                       rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds min"):
        weight_init(np.ones((64, 8), np.float32), lora=qj.LoraConfig(rank=16, init="pissa"))

"""Gemma 1/2/3 (text), Phi-3, OLMo-2, Granite and Mixtral against `transformers` (PyTorch, float32) on tiny random
checkpoints: float32 logits, NF4 logits against the exactly dequantized HF model, greedy generation with the KV
cache, PEFT adapters both ways, and the config settings that are refused by name."""

import copy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from cases import by_default
from flax import nnx
from test_models import hf_logits, peft_with_random_b
from test_models_quant import NF4_TABLE, _exact_dequant

import qlora_jax as qj
from qlora_jax import models

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

# Each family with the settings that make it differ from Llama switched on and large enough to matter: head_dim
# apart from hidden / heads, sliding windows (4) shorter than the sequences (12) and than prompt + new tokens (14),
# soft caps near the logits' size, RoPE bases and scaling per layer kind, partial rotary, scalar multipliers.
FAMILIES = {
    "gemma": ("gemma", dict(head_dim=32)),
    "gemma2": ("gemma2", dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=4, attn_logit_softcapping=0.5,
                              initializer_range=0.1,
                              final_logit_softcapping=10.0)),
    "gemma3": ("gemma3_text", dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                                    "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                       "rope_theta": 10000.0}})),
    "phi3": ("phi3", dict(pad_token_id=0, intermediate_size=192, sliding_window=5, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "olmo2": ("olmo2", dict(pad_token_id=0)),
    "granite": ("granite", dict(embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.1,
                                logits_scaling=4.0, attention_bias=True, mlp_bias=True)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5)),
}
DENSE = [name for name in FAMILIES if name != "mixtral"]

# Generation, PEFT round trips and gradients run by default on the families whose code paths differ (sliding
# windows, soft-capping, fused projections, experts, biases); the others with -m slow.
# The projections PEFT can target, by family (PEFT's own module names).
TARGETS = {name: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] for name in FAMILIES}
TARGETS["phi3"] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
TARGETS["mixtral"] = ["q_proj", "k_proj", "v_proj", "o_proj"]  # PEFT's LoRA has no module for transformers' experts


def _make(directory, name, seed=0):
    model_type, extra = FAMILIES[name]
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **extra})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(directory / name)
    return directory / name, hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`checkpoint(name) -> (path, hf model)`, each family's built once per module (copy the model to change it)."""
    directory, built = tmp_path_factory.mktemp("families"), {}

    def get(name):
        if name not in built:
            built[name] = _make(directory, name)
        return built[name]

    return get


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """`loaded(name)`: the float32 model of each family, loaded once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = models.from_pretrained(checkpoint(name)[0])
        return cache[name]

    return get


IDS = np.random.default_rng(0).integers(0, 128, (2, 12))


def _logits(model, ids):
    return np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_float32_logits_match_transformers(checkpoint, loaded, name):
    _, hf = checkpoint(name)
    expected = hf_logits(hf, IDS)
    got = _logits(loaded(name), IDS)
    assert np.abs(expected).max() > 0.05  # logits far from zero: the comparison says something
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_families_read_their_switches(loaded):
    assert loaded("gemma").config.hidden_act == "gelu_tanh" and loaded("gemma").config.tie_word_embeddings
    assert loaded("gemma").lm_head is None
    cfg2 = loaded("gemma2").config
    assert cfg2.layer_types == ("sliding_attention", "full_attention") and cfg2.sliding_window == 4
    assert (cfg2.attn_logit_softcap, cfg2.final_logit_softcap, cfg2.attn_scale) == (0.5, 10.0, 20**-0.5)
    cfg3 = loaded("gemma3").config
    assert cfg3.rope_local_theta == 100.0 and cfg3.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    phi3 = loaded("phi3")
    assert phi3.config.rotary_dim == 8 and phi3.layers.self_attn.qkv_proj.kernel.shape == (2, 64, 128)
    assert phi3.layers.mlp.gate_up_proj.kernel.shape == (2, 64, 384)
    olmo2 = loaded("olmo2")
    assert olmo2.layers.input_layernorm is None and olmo2.layers.self_attn.q_norm.weight.shape == (2, 64)
    assert loaded("granite").config.logits_scaling == 4.0
    mixtral = loaded("mixtral")
    assert mixtral.config.num_experts == 4 and mixtral.layers.mlp.experts.w1.kernel.shape == (2, 4, 64, 128)
    assert mixtral.layers.mlp.gate.kernel.shape == (2, 64, 4)  # the router: [layers, hidden, experts]


def test_mixtral_experts_are_quantized_and_the_router_is_not(checkpoint):
    path, _ = checkpoint("mixtral")
    model = models.from_pretrained(path, quant=qj.QuantConfig(fmt="nf4", block_size=64, double_quant=False),
                                   lora=qj.LoraConfig(rank=4, alpha=8, targets=TARGETS["mixtral"]))
    w2 = model.layers.mlp.experts.w2.kernel.get_value()
    assert isinstance(w2, qj.QuantizedArray) and w2.stack_shape == (2, 4) and w2.shape == (128, 64)
    router = model.layers.mlp.gate.kernel
    assert isinstance(router, nnx.Param) and router.get_value().dtype == jnp.float32
    assert not any("experts" in str(p) or "gate" in p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))


def test_mixtral_adapters_on_experts_and_merged_export_are_refused(checkpoint, loaded, tmp_path):
    """Adapters on the stacked experts train here but have no PEFT form; merged export of experts is not written."""
    path, _ = checkpoint("mixtral")
    model = models.from_pretrained(path, lora=qj.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    with pytest.raises(ValueError, match=r"stacked experts \(model.layers.0.mlp.experts.w1, stack \(2, 4\)"):
        models.save_peft_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"save_merged does not write mixture-of-experts models yet"):
        models.save_merged(loaded("mixtral"), tmp_path / "merged")
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "merged").exists()


def test_mixtral_routing_matters(checkpoint, loaded):
    """Routing every token to all experts instead of the top 2 moves the logits (the top-k path is exercised)."""
    import dataclasses

    from qlora_jax._src.models import loading

    path, hf = checkpoint("mixtral")
    cfg = dataclasses.replace(loaded("mixtral").config, num_experts_per_tok=4)
    model = loading._load(cfg, path, loading.SafetensorsReader(path), quant=None, lora=None, dtype=jnp.float32,
                          param_dtype=jnp.float32, remat=False, rngs=None, progress=False)
    assert np.abs(_logits(model, IDS) - hf_logits(hf, IDS)).max() > 1e-3


def test_gemma2_sliding_and_global_layers_differ(checkpoint):
    """The alternating layers matter: with every layer global the logits move (so the test above checks them)."""
    path, hf = checkpoint("gemma2")
    cfg = models.load_config(path)
    import dataclasses

    from qlora_jax._src.models import loading

    glob = dataclasses.replace(cfg, layer_types=None, sliding_window=None)
    model = loading._load(glob, path, loading.SafetensorsReader(path), quant=None, lora=None, dtype=jnp.float32,
                          param_dtype=jnp.float32, remat=False, rngs=None, progress=False)
    assert np.abs(_logits(model, IDS) - hf_logits(hf, IDS)).max() > 1e-3


def _projections(hf):
    return [(n, m) for n, m in hf.named_modules() if n.rsplit(".", 1)[-1].endswith("_proj")
            and isinstance(m, torch.nn.Linear)]


def _nf4(w):
    """`w` (PyTorch `[out, in]`) quantized by bitsandbytes' NF4 `quantize_4bit`, dequantized exactly in NumPy
    (`table[code] * absmax` in float32)."""
    import bitsandbytes.functional as bnbf

    w = w.detach().float().contiguous()
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    return torch.from_numpy(_exact_dequant(packed.numpy(), state.absmax.numpy(), NF4_TABLE, tuple(w.shape)))


def _nf4_reference(hf):
    """A copy of `hf` whose projections (fused ones as stored; each Mixtral expert's w1, w3 and w2 on its own, as
    its checkpoint stores them) hold their exactly dequantized NF4 values. Routers stay float."""
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        for _, module in _projections(hf):
            module.weight.copy_(_nf4(module.weight))
        for name, module in hf.named_modules():
            if name.endswith("mlp.experts"):  # gate_up_proj [e, 2f, d] (w1 then w3), down_proj [e, d, f] (w2)
                f = module.gate_up_proj.shape[1] // 2
                for e in range(module.gate_up_proj.shape[0]):
                    module.gate_up_proj[e, :f] = _nf4(module.gate_up_proj[e, :f])
                    module.gate_up_proj[e, f:] = _nf4(module.gate_up_proj[e, f:])
                    module.down_proj[e] = _nf4(module.down_proj[e])
    return hf


@pytest.mark.parametrize("name", list(FAMILIES))
def test_nf4_logits_match_exactly_dequantized_transformers(checkpoint, name):
    path, hf = checkpoint(name)
    model = models.from_pretrained(path, quant=qj.QuantConfig(fmt="nf4", block_size=64, double_quant=False))
    attn = model.layers.self_attn
    kernel = (attn.qkv_proj if name == "phi3" else attn.q_proj).kernel.get_value()
    assert isinstance(kernel, qj.QuantizedArray)
    np.testing.assert_allclose(_logits(model, IDS), hf_logits(_nf4_reference(hf), IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", by_default(FAMILIES, "gemma2", "gemma3", "phi3", "mixtral"))
def test_greedy_generation_matches_transformers(checkpoint, loaded, name):
    _, hf = checkpoint(name)
    prompt = np.random.default_rng(5).integers(1, 128, (1, 6))
    ours = models.generate(loaded(name), prompt, max_new_tokens=8)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(prompt).long(), max_new_tokens=8, do_sample=False,
                             attention_mask=torch.ones(1, 6, dtype=torch.long), pad_token_id=0).numpy()[:, 6:]
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", by_default(FAMILIES, "gemma", "phi3", "granite", "mixtral"))
def test_peft_adapters_round_trip(checkpoint, tmp_path, name):
    """An adapter made by PEFT loads here with PEFT's logits; one saved here loads in `PeftModel` with ours."""
    from peft import PeftModel

    path, hf = checkpoint(name)
    targets = TARGETS[name]
    lora = qj.LoraConfig(rank=4, alpha=8, targets=targets, dropout=0.0)
    made = peft_with_random_b(copy.deepcopy(hf), tmp_path, targets)
    model = models.from_pretrained(path, lora=lora)
    models.load_peft_adapter(model, tmp_path / "adapter")
    np.testing.assert_allclose(_logits(model, IDS), hf_logits(made.eval(), IDS), atol=1e-4, rtol=0)

    fresh = models.from_pretrained(path, lora=lora)
    rng = np.random.default_rng(2)
    for _, v in nnx.to_flat_state(nnx.state(fresh, nnx.LoRAParam)):
        v.set_value(jnp.asarray(rng.standard_normal(v.get_value().shape) * 0.1, jnp.float32))
    models.save_peft_adapter(fresh, tmp_path / "ours", base_model_name_or_path=str(path))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    np.testing.assert_allclose(_logits(fresh, IDS), hf_logits(peft_model, IDS), atol=1e-4, rtol=0)


def _config(hf, **changes):
    """The HF config of `hf` as a plain object with `changes` (no `transformers` validation in the way)."""
    return types.SimpleNamespace(**{**hf.config.to_dict(), **changes})


@pytest.mark.parametrize("name, changes, message", [
    ("gemma", dict(hidden_act="relu"), r"hidden_act: 'relu' is not implemented"),
    ("gemma", dict(use_bidirectional_attention=True), r"use_bidirectional_attention: bidirectional"),
    ("gemma2", dict(hidden_activation="gelu"), r"hidden_activation: 'gelu' is not implemented"),
    ("gemma2", dict(layer_types=["sliding_attention", "chunked_attention"]),
     r"layer_types: \['chunked_attention'\] are not implemented"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0},
                                     "sliding_attention": {"rope_type": "default"}}),
     r"rope_parameters.rope_type: 'yarn' is not implemented"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "default"},
                                     "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     r"rope_parameters.sliding_attention.rope_type: 'linear' is not implemented"),
    ("phi3", dict(rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}),
     r"rope_parameters.rope_type: 'longrope' is not implemented"),
    ("olmo2", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
     r"rope_parameters.rope_type: 'dynamic' is not implemented"),
    ("olmo2", dict(partial_rotary_factor=0.5), r"partial_rotary_factor: partial rotary embeddings are not"),
    ("granite", dict(hidden_act="gelu"), r"hidden_act: 'gelu' is not implemented"),
    ("mixtral", dict(router_jitter_noise=0.1), r"router_jitter_noise: 0.1 is not implemented"),
    ("mixtral", dict(output_router_logits=True), r"output_router_logits: the router's auxiliary loss"),
])
def test_unsupported_settings_are_refused_by_name(checkpoint, name, changes, message):
    _, hf = checkpoint(name)
    with pytest.raises(ValueError, match=message):
        models.ModelConfig.from_hf(_config(hf, **changes))


@pytest.mark.parametrize("name", DENSE)
def test_merged_export_reloads_in_transformers(checkpoint, tmp_path, name):
    """`save_merged` writes each family's own config: transformers loads it back with the same logits."""
    path, _ = checkpoint(name)
    model = models.from_pretrained(path)
    models.save_merged(model, tmp_path / "merged")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    assert back.config.model_type == FAMILIES[name][0]
    np.testing.assert_allclose(hf_logits(back.float(), IDS), _logits(model, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, remat", [("gemma2", False), ("gemma3", True), ("phi3", False),
                                         pytest.param("olmo2", True, marks=pytest.mark.slow),
                                         pytest.param("granite", False, marks=pytest.mark.slow), ("mixtral", True)])
def test_adapter_gradients_match_peft(checkpoint, tmp_path, name, remat):
    """The adapters' gradients (soft-capped attention's backward pass, GeGLU's, the per-layer flags through the
    scan with and without `remat`, fused projections) equal PyTorch autograd's through PEFT on the same weights."""
    path, hf = checkpoint(name)
    targets = TARGETS[name]
    peft_model = peft_with_random_b(copy.deepcopy(hf), tmp_path, targets)
    model = models.from_pretrained(path, lora=qj.LoraConfig(rank=4, alpha=8, targets=targets, dropout=0.0),
                                   remat=remat)
    models.load_peft_adapter(model, tmp_path / "adapter")
    weights = np.random.default_rng(1).standard_normal((*IDS.shape, 128)).astype(np.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(IDS)) * weights), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    peft_model.train()
    (peft_model(torch.from_numpy(IDS)).logits * torch.from_numpy(weights)).sum().backward()
    theirs = {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    checked = 0
    for path_, v in nnx.to_flat_state(grads):
        block, proj, factor = path_[1], path_[2], {"lora_a": "lora_A", "lora_b": "lora_B"}[path_[-1]]
        for i in range(v.get_value().shape[0]):
            ref = theirs[f"base_model.model.model.layers.{i}.{block}.{proj}.{factor}.default.weight"].T
            scale = float(ref.abs().max())
            assert scale > 0
            np.testing.assert_allclose(np.asarray(v.get_value()[i]), ref.numpy(), rtol=0, atol=2e-5 * scale,
                                       err_msg=f"layer {i} {proj} {factor}")
            checked += 1
    assert checked == 2 * len(targets) * 2


def test_gemma3_legacy_rope_keys(checkpoint, tmp_path):
    """A Gemma 3 config.json with the released checkpoints' keys (`rope_scaling` for the global layers,
    `rope_local_base_freq`, `sliding_window_pattern`, no `layer_types`) loads with transformers' logits."""
    import json
    import shutil

    path, _ = checkpoint("gemma3")
    legacy = tmp_path / "legacy"
    shutil.copytree(path, legacy)
    config = json.loads((legacy / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):
        config.pop(key)
    config.update(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=1000.0, rope_local_base_freq=50.0,
                  sliding_window_pattern=2)
    (legacy / "config.json").write_text(json.dumps(config))
    model = models.from_pretrained(legacy)
    cfg = model.config
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == (1000.0, 50.0, {"rope_type": "linear",
                                                                                      "factor": 4.0})
    assert cfg.layer_types == ("sliding_attention", "full_attention")
    hf = transformers.AutoModelForCausalLM.from_pretrained(legacy, attn_implementation="eager").float().eval()
    np.testing.assert_allclose(_logits(model, IDS), hf_logits(hf, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_num_params_counts_the_checkpoint(checkpoint, loaded, name):
    """`ModelConfig.num_params` (the memory planner's count) equals the HF model's parameters."""
    _, hf = checkpoint(name)
    assert loaded(name).config.num_params == sum(p.numel() for p in hf.parameters())

"""Llama-family models against `transformers` (PyTorch, float32) on tiny random checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import qlora_jax as qj
from qlora_jax import models

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama-gqa-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-mha-bias": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "llama3-rope-scaling": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral-sliding-window": ("mistral", dict(sliding_window=5)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=32)),
}


def make_checkpoint(tmp_path, name, seed=0, **overrides):
    """A tiny random HF checkpoint saved with `save_pretrained` (float32 safetensors)."""
    model_type, extra = CONFIGS[name]
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / name
    hf.save_pretrained(path)
    return path, hf


def hf_logits(hf, ids, attention_mask=None):
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
        return hf(torch.tensor(np.asarray(ids)).long(), attention_mask=mask).logits.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unquantized_logits_match_transformers(tmp_path, name):
    path, hf = make_checkpoint(tmp_path, name)
    model = models.from_pretrained(path)
    ids = np.random.default_rng(0).integers(0, 128, (2, 12))
    expected = hf_logits(hf, ids)
    got = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_padding_mask_matches_transformers(tmp_path):
    path, hf = make_checkpoint(tmp_path, "llama-gqa-untied")
    model = models.from_pretrained(path)
    ids = np.random.default_rng(1).integers(0, 128, (2, 10))
    mask = np.ones((2, 10), np.int64)
    mask[1, 7:] = 0  # right padding
    expected = hf_logits(hf, ids, mask)
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got[0], expected[0], atol=1e-4)
    np.testing.assert_allclose(got[1, :7], expected[1, :7], atol=1e-4)


def test_packed_segments_equal_separate_sequences(tmp_path):
    path, _ = make_checkpoint(tmp_path, "qwen3")
    model = models.from_pretrained(path)
    a, b = np.arange(1, 6), np.arange(10, 17)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    positions = jnp.asarray(np.concatenate([np.arange(5), np.arange(7)])[None])
    segments = jnp.asarray(np.array([[0] * 5 + [1] * 7]))
    got = np.asarray(model(packed, positions=positions, segment_ids=segments))
    np.testing.assert_allclose(got[0, :5], np.asarray(model(jnp.asarray(a[None])))[0], atol=1e-5)
    np.testing.assert_allclose(got[0, 5:], np.asarray(model(jnp.asarray(b[None])))[0], atol=1e-5)


def test_sharded_checkpoint_loads(tmp_path):
    path, hf = make_checkpoint(tmp_path, "llama-gqa-untied")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = np.arange(8)[None]
    np.testing.assert_array_equal(models.from_pretrained(sharded)(jnp.asarray(ids)),
                                  models.from_pretrained(path)(jnp.asarray(ids)))


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        models.from_pretrained(tmp_path)
    path, _ = make_checkpoint(tmp_path, "llama-gqa-untied")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: \('llama', 'mistral'"):
        models.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match=r"hidden_act: 'gelu' is not implemented"):
        models.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))
    with pytest.raises(ValueError, match=r"rope_type: 'yarn' is not implemented"):
        models.from_pretrained(path)
    (path / "config.json").write_text(json.dumps(config))
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated: tensor '[\w.]+' needs bytes"):
        models.from_pretrained(path)


def test_missing_tensor_is_named(tmp_path):
    from qlora_jax._src.models.safetensors_io import SafetensorsReader, save_safetensors

    path, _ = make_checkpoint(tmp_path, "llama-gqa-untied")
    reader = SafetensorsReader(path)
    tensors = {n: reader[n] for n in reader if n != "model.layers.1.mlp.up_proj.weight"}
    save_safetensors(path / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"checkpoint is missing model.layers.1.mlp.up_proj.weight"):
        models.from_pretrained(path)


def test_model_builds_and_trains_under_remat():
    cfg = models.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2)
    from flax import nnx

    model = models.CausalLM(cfg, remat=True, rngs=nnx.Rngs(0))
    ids = jnp.arange(10)[None] % 64
    grads = nnx.grad(lambda m: jnp.mean(m(ids) ** 2))(model)
    assert jnp.abs(grads.layers.mlp.down_proj.kernel[...]).sum() > 0
    assert qj.__version__


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_with_random_b(hf, tmp_path, targets, rank=4, alpha=8):
    """PEFT LoRA (no dropout) on `hf` with non-zero B factors, saved to `tmp_path / "adapter"`; the PEFT model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(hf, PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                   lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


def assert_adapter_gradients_match_peft(model, peft_model, ids, targets):
    """The gradients of `sum(logits * w)` (w random) w.r.t. every adapter factor of every layer of `model` equal
    PyTorch autograd's through `peft_model` (atol 2e-5 x the largest)."""
    from flax import nnx

    weights = np.random.default_rng(1).standard_normal((*ids.shape, model.config.vocab_size)).astype(np.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids)) * weights), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    peft_model.train()
    (peft_model(torch.from_numpy(ids)).logits * torch.from_numpy(weights)).sum().backward()
    layers = peft_model.base_model.model.model.layers
    checked = 0
    for block, names in (("self_attn", [t for t in targets if t in ALL_LINEAR[:4]]),
                         ("mlp", [t for t in targets if t in ALL_LINEAR[4:]])):
        for proj in names:
            ours = getattr(getattr(grads.layers, block), proj)
            for i, layer in enumerate(layers):
                theirs = getattr(getattr(layer, block), proj)
                for mine, ref in ((ours.lora_a[...][i], theirs.lora_A["default"].weight.grad.T),
                                  (ours.lora_b[...][i], theirs.lora_B["default"].weight.grad.T)):
                    scale = float(ref.abs().max())
                    assert scale > 0
                    np.testing.assert_allclose(np.asarray(mine), ref.numpy(), rtol=0, atol=2e-5 * scale,
                                               err_msg=f"layer {i} {proj}")
                    checked += 1
    assert checked == 2 * len(targets) * len(layers)


@pytest.mark.parametrize("name", ["llama-mha-bias", "qwen3"])
def test_adapter_gradients_match_peft(tmp_path, name):
    """The adapters' gradients of a step without remat (each scanned layer keeps `llama._KEPT` and recomputes
    its RMSNorm outputs and SwiGLU product) equal PyTorch autograd's through PEFT on the same weights;
    Qwen3's q/k norms read the projections' outputs in the backward pass."""
    path, hf = make_checkpoint(tmp_path, name)
    peft_model = peft_with_random_b(hf, tmp_path, ALL_LINEAR)
    model = models.from_pretrained(path, lora=qj.LoraConfig(rank=4, alpha=8, targets=ALL_LINEAR, dropout=0.0))
    models.load_peft_adapter(model, tmp_path / "adapter")
    assert not model.remat
    assert_adapter_gradients_match_peft(model, peft_model, np.random.default_rng(0).integers(0, 128, (2, 12)),
                                        ALL_LINEAR)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_layers_recompute_no_product_and_keep_less(monkeypatch, qk_norm):
    """Against the same step that keeps every value: no matmul is computed twice (the lowered backward pass
    has as many dot_generals) and the compiled step needs less temporary memory."""
    from flax import nnx

    from qlora_jax._src.models import llama

    cfg = models.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, qk_norm=qk_norm)
    model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
    model = qj.apply_qlora(model, quant=qj.QuantConfig(block_size=32),
                           lora=qj.LoraConfig(rank=4, alpha=8, targets="all-linear"), rngs=nnx.Rngs(1))
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    ids = jnp.arange(64).reshape(2, 32) % 64

    def measure():
        def loss(lora, rest):
            return jnp.mean(nnx.merge(graphdef, lora, rest, copy=True)(ids) ** 2)

        lowered = jax.jit(jax.grad(loss)).lower(lora, rest)
        return lowered.as_text().count("stablehlo.dot_general"), lowered.compile().memory_analysis().temp_size_in_bytes

    dots, temp = measure()
    monkeypatch.setattr(llama, "_KEEP", jax.checkpoint_policies.everything_saveable)
    dots_all, temp_all = measure()
    assert dots == dots_all
    assert temp < 0.9 * temp_all


def test_dropout_keys_advance_through_the_scanned_layers():
    """The layers run under `nnx.remat` that hands back only what they change: the adapters' dropout RNG counts
    advance with every call (eager and in a jitted step), so no two steps draw the same masks."""
    from flax import nnx

    cfg = models.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2)
    model = qj.apply_qlora(models.CausalLM(cfg, rngs=nnx.Rngs(0)), quant=qj.QuantConfig(block_size=32),
                           lora=qj.LoraConfig(rank=4, alpha=8, targets="all-linear", dropout=0.5),
                           rngs=nnx.Rngs(1))
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] == "lora_b":
            v.set_value(jnp.full_like(v.get_value(), 0.1))
    ids = jnp.arange(32).reshape(2, 16) % 64
    assert not np.allclose(model(ids), model(ids))

    def counts():
        return np.concatenate([np.ravel(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.RngCount))])

    config = qj.train.TrainConfig(total_steps=10, warmup_ratio=0.0)
    optimizer = nnx.Optimizer(model, qj.train.make_optimizer(config), wrt=nnx.LoRAParam)
    batch = {"input_ids": np.asarray(ids), "targets": np.asarray(ids), "weights": np.ones((2, 16), np.float32)}
    before = counts()
    qj.train.train_step(model, optimizer, batch)
    assert len(before) > 0 and np.all(counts() == before + 1)


def test_tokenizer_is_exposed_when_the_checkpoint_has_one(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    path, _ = make_checkpoint(tmp_path, "llama-gqa-untied")
    assert models.load_tokenizer(path) is None
    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    loaded = models.load_tokenizer(path)
    assert loaded("hello world")["input_ids"] == [1, 2]


@pytest.mark.parametrize("name", ["llama-gqa-tied", "mistral-sliding-window"])
def test_greedy_generation_with_kv_cache_matches_transformers(tmp_path, name):
    """Mistral's window (5) is shorter than prompt + new tokens (14): the cache path masks it too."""
    path, hf = make_checkpoint(tmp_path, name)
    model = models.from_pretrained(path)
    prompt = np.random.default_rng(5).integers(1, 128, (1, 6))
    ours = models.generate(model, prompt, max_new_tokens=8)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(prompt).long(), max_new_tokens=8, do_sample=False,
                             attention_mask=torch.ones(1, 6, dtype=torch.long), pad_token_id=0).numpy()[:, 6:]
    np.testing.assert_array_equal(ours, theirs)


def test_left_padded_batch_generates_as_each_prompt_alone(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama-gqa-untied")
    model = models.from_pretrained(path)
    a, b = np.array([5, 6, 7, 8, 9]), np.array([11, 12, 13])
    batch = np.array([a, np.concatenate([[0, 0], b])])
    mask = np.array([[1] * 5, [0, 0, 1, 1, 1]])
    both = models.generate(model, batch, attention_mask=mask, max_new_tokens=5)
    np.testing.assert_array_equal(both[0], models.generate(model, a[None], max_new_tokens=5)[0])
    np.testing.assert_array_equal(both[1], models.generate(model, b[None], max_new_tokens=5)[0])
    sampled = models.generate(model, a[None], max_new_tokens=5, temperature=1.0, top_p=0.9, seed=1)
    assert sampled.shape == (1, 5) and sampled.max() < 128
    stopped = models.generate(model, a[None], max_new_tokens=5, eos_token_id=int(both[0][0]), pad_token_id=0)
    assert stopped[0, 0] == both[0][0] and (stopped[0, 1:] == 0).all()
    with pytest.raises(ValueError, match="max_new_tokens: prompt"):
        models.generate(model, a[None], max_new_tokens=1000)

"""Quantized loading, bitsandbytes-4bit import, PEFT export/import and merged
export, each against PyTorch (`transformers`, `bitsandbytes`, `peft`) on tiny
random checkpoints built here."""

import copy
import json

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from test_models import assert_adapter_gradients_match_peft, hf_logits, make_checkpoint, peft_with_random_b

import qlora_jax as qj
from qlora_jax import models
from qlora_jax._src.formats import codebooks
from qlora_jax._src.models.safetensors_io import SafetensorsReader

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _projections(hf):
    return [(n, m) for n, m in hf.named_modules() if n.rsplit(".", 1)[-1] in PROJ]


def _exact_nf4(codes_packed: np.ndarray, absmax: np.ndarray, shape, fmt="nf4", block=64) -> np.ndarray:
    """codebook[code] * absmax in float32 from bitsandbytes' packed bytes (high nibble first)."""
    packed = codes_packed.reshape(-1)
    codes = np.stack([packed >> 4, packed & 0xF], -1).reshape(-1)[: int(np.prod(shape))]
    table = np.asarray(codebooks.codebook(fmt), np.float32)
    values = table[codes].reshape(-1, block) * absmax.reshape(-1, 1).astype(np.float32)
    return values.reshape(shape)


def _dequantized_reference(hf, double_quant=False):
    """The HF model with every projection replaced by bitsandbytes' quantize_4bit
    codes, dequantized exactly (not bnb's CPU dequantize kernel)."""
    with torch.no_grad():
        for _, module in _projections(hf):
            w = module.weight.detach().float().contiguous()
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
            absmax = state.absmax.float().numpy()
            if double_quant:  # absmax_i = f32(code_map[code_i] * nested_absmax[i // 256]) + offset
                nested = state.state2
                codes = state.absmax.numpy().astype(np.int64)
                scale = np.repeat(nested.absmax.float().numpy(), 256)[: codes.size]
                absmax = (nested.code.float().numpy()[codes] * scale).astype(np.float32) + np.float32(state.offset)
            exact = _exact_nf4(packed.numpy(), absmax, tuple(w.shape))
            module.weight.copy_(torch.from_numpy(exact))
    return hf


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2", "qwen3"])
def test_nf4_logits_match_exactly_dequantized_transformers(tmp_path, name):
    path, hf = make_checkpoint(tmp_path, name)
    model = models.from_pretrained(path, quant=qj.QuantConfig(fmt="nf4", block_size=64, double_quant=False))
    assert isinstance(model.layers.self_attn.q_proj.kernel.get_value(), qj.QuantizedArray)
    assert isinstance(model.lm_head, nnx.Linear) or model.lm_head is None  # the head stays float
    ids = np.random.default_rng(0).integers(0, 128, (2, 10))
    expected = hf_logits(_dequantized_reference(hf), ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)


def test_nf4_double_quant_logits_match_within_a_nested_code_step(tmp_path):
    path, hf = make_checkpoint(tmp_path, "llama-gqa-untied")
    model = models.from_pretrained(path, quant=qj.QuantConfig(double_quant=True))
    ids = np.random.default_rng(0).integers(0, 128, (2, 10))
    expected = hf_logits(_dequantized_reference(hf, double_quant=True), ids)
    # bitsandbytes' CPU nested search sometimes picks the second-nearest 8-bit code (tests/test_formats_bnb.py);
    # one step of the dynamic map moves an absmax by < 1%, a logit by far less than 1e-2 here.
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-2, rtol=0)


def test_qlora_adapter_gradients_match_peft_on_the_exact_nf4_weights(tmp_path, monkeypatch):
    """A float32 QLoRA step without dropout (the merged products of `ops/merged.py`; on CPU with the 4-bit
    kernels' permuted input columns): the adapters' gradients equal PyTorch autograd's through PEFT on the HF
    model whose projections hold the exactly dequantized NF4 weights. Llama with biases everywhere."""
    from qlora_jax._src.nn import linear as linear_module

    path, hf = make_checkpoint(tmp_path, "llama-mha-bias")
    peft_model = peft_with_random_b(_dequantized_reference(hf), tmp_path, PROJ)
    model = models.from_pretrained(path, quant=qj.QuantConfig(fmt="nf4", block_size=64, double_quant=False),
                                   lora=qj.LoraConfig(rank=4, alpha=8, targets=list(PROJ), dropout=0.0))
    models.load_peft_adapter(model, tmp_path / "adapter")
    merged = []
    real = linear_module.lora_matmul
    monkeypatch.setattr(linear_module, "lora_matmul", lambda *a, **k: merged.append(1) or real(*a, **k))
    # 64 tokens: enough for the merged products (`can_merge`)
    assert_adapter_gradients_match_peft(model, peft_model, np.random.default_rng(0).integers(0, 128, (2, 32)), PROJ)
    assert len(merged) == 7  # every projection of the scanned layer took the merged product


def test_bitsandbytes_checkpoint_loads_its_packed_bytes(tmp_path):
    path, hf = make_checkpoint(tmp_path, "llama-gqa-untied")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.float32)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config,
                                                                  device_map="cpu")
    bnb_path = tmp_path / "bnb"
    quantized.save_pretrained(bnb_path)
    model = models.from_pretrained(bnb_path)
    reader = SafetensorsReader(bnb_path)
    q = model.layers.mlp.down_proj.kernel.get_value()
    for i in range(2):
        layer = jax.tree.map(lambda leaf, i=i: np.asarray(leaf[i]), q)
        exported = qj.to_bnb(layer)
        for key in ("weight", "absmax", "nested_absmax"):
            stored = reader[f"model.layers.{i}.mlp.down_proj.weight" + ("" if key == "weight" else f".{key}")]
            np.testing.assert_array_equal(exported[key].reshape(-1).view(np.uint8),
                                          stored.reshape(-1).view(np.uint8))
    # exact reference from the file's own codes and scales
    with torch.no_grad():
        for name, module in _projections(hf):
            prefix = f"{name}.weight"
            state = json.loads(reader[f"{prefix}.quant_state.bitsandbytes__nf4"].tobytes())
            codes = reader[f"{prefix}.absmax"].astype(np.int64)
            scale = np.repeat(reader[f"{prefix}.nested_absmax"], 256)[: codes.size]
            absmax = (reader[f"{prefix}.nested_quant_map"][codes] * scale).astype(np.float32) + np.float32(
                state["nested_offset"])
            module.weight.copy_(torch.from_numpy(_exact_nf4(reader[prefix], absmax, tuple(module.weight.shape))))
    ids = np.random.default_rng(2).integers(0, 128, (2, 10))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(hf, ids), atol=1e-4, rtol=0)
    loose = hf_logits(quantized, ids)  # bnb's own CPU forward computes at lower precision
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), loose, atol=1e-2, rtol=0)


@nnx.jit
def _adam_step(model, optimizer, ids):
    """One Adam step on the adapters, compiled (run eagerly, op by op, it compiled each primitive separately: ~15 s
    a test)."""
    def loss_fn(model):
        logits = model(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)


def _train_a_few_steps(model, ids, steps=3):
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(steps):
            _adam_step(model, optimizer, ids)
    return model


def test_adapter_round_trips_through_peft(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    path, hf = make_checkpoint(tmp_path, "llama-gqa-untied")
    hf2 = copy.deepcopy(hf)  # the same random base, for the PEFT-made adapter below
    lora = qj.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    model = models.from_pretrained(path, quant=qj.QuantConfig(double_quant=False), lora=lora)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 128, (2, 12)))
    model = _train_a_few_steps(model, ids, steps=2)
    model.eval()
    assert np.abs(np.asarray(model.layers.self_attn.q_proj.lora_b[...])).max() > 0
    models.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["r"] == 4
    base = _dequantized_reference(hf)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    expected = hf_logits(peft_model, np.asarray(ids))
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=1e-4, rtol=0)

    # an adapter made by PEFT loads here
    made = get_peft_model(_dequantized_reference(hf2), PeftLoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    made.save_pretrained(tmp_path / "peft_made")
    fresh = models.from_pretrained(path, quant=qj.QuantConfig(double_quant=False), lora=lora)
    models.load_peft_adapter(fresh, tmp_path / "peft_made")
    np.testing.assert_allclose(np.asarray(fresh(ids)), hf_logits(made.eval(), np.asarray(ids)), atol=1e-4,
                               rtol=0)


def test_bad_adapters_are_refused_without_changes(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama-gqa-untied")
    model = models.from_pretrained(path, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=4, alpha=8,
                                                                                    targets=["q_proj"]))
    other = models.from_pretrained(path, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=8, alpha=8,
                                                                                    targets=["q_proj", "k_proj"]))
    models.save_peft_adapter(other, tmp_path / "r8")
    before = np.asarray(model.layers.self_attn.q_proj.lora_a[...])
    with pytest.raises(ValueError, match=r"targets \['model.layers.0.self_attn.k_proj'"):
        models.load_peft_adapter(model, tmp_path / "r8")
    other2 = models.from_pretrained(path, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=8, alpha=8,
                                                                                     targets=["q_proj"]))
    models.save_peft_adapter(other2, tmp_path / "r8q")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: lora_A \(8, 64\), lora_B \(64, 8\) "
                                         r"\(r=8\) do not fit"):
        models.load_peft_adapter(model, tmp_path / "r8q")
    np.testing.assert_array_equal(np.asarray(model.layers.self_attn.q_proj.lora_a[...]), before)
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing"):
        models.load_peft_adapter(model, tmp_path)


def test_merged_checkpoint_loads_in_transformers(tmp_path):
    path, _ = make_checkpoint(tmp_path, "qwen2")
    model = models.from_pretrained(path, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=4, alpha=8))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 128, (2, 12)))
    model = _train_a_few_steps(model, ids, steps=2)
    model.eval()
    ours = np.asarray(model(ids))
    for name, shard_bytes in (("merged", 5 * 1024**3), ("sharded", 100_000)):
        out = models.save_merged(model, tmp_path / name, max_shard_bytes=shard_bytes)
        assert (out / "model.safetensors.index.json").is_file() == (name == "sharded")
        merged = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
        np.testing.assert_allclose(hf_logits(merged, np.asarray(ids)), ours, atol=1e-4, rtol=0)
    # and our own loader reads it back as a float model with the same logits
    np.testing.assert_allclose(np.asarray(models.from_pretrained(tmp_path / "sharded")(ids)), ours, atol=1e-4)


@pytest.mark.parametrize("double_quant", [False, True])
def test_chunked_streaming_quantization_is_bit_identical(tmp_path, monkeypatch, double_quant):
    """The loader quantizes big weights a few rows at a time and double-quantizes all
    scales at the end; forced here onto a tiny checkpoint (8 rows per chunk)."""
    from qlora_jax._src.formats import blockwise

    monkeypatch.setattr(blockwise, "_STREAM_CHUNK_BYTES", 8 * 192 * 4)  # float32 weights
    path, hf = make_checkpoint(tmp_path, "llama-gqa-untied", intermediate_size=640)  # 640 / 8: 80 chunks
    model = models.from_pretrained(path, quant=qj.QuantConfig(double_quant=double_quant))
    for name in ("down_proj", "up_proj"):
        q = getattr(model.layers.mlp, name).kernel.get_value()
        for i in range(2):
            weight = getattr(hf.model.layers[i].mlp, name).weight.detach().numpy()
            expected = qj.quantize(weight.T, "nf4", 64, double_quant)
            got = jax.tree.map(lambda leaf, i=i: leaf[i], q)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_value_in_a_chunked_weight_names_file_tensor_and_rows(tmp_path, monkeypatch):
    """The chunked loader flags non-finite values inside its quantize program; the error names where they are."""
    from qlora_jax._src.formats import blockwise
    from qlora_jax._src.models.safetensors_io import save_safetensors

    monkeypatch.setattr(blockwise, "_STREAM_CHUNK_BYTES", 8 * 64 * 4)
    path, _ = make_checkpoint(tmp_path, "llama-gqa-untied", intermediate_size=640)
    reader = SafetensorsReader(path)
    tensors = {name: reader[name] for name in reader}
    name = "model.layers.1.mlp.up_proj.weight"  # [640, 64]: 8 rows (one chunk per call) of 64 inputs
    tensors[name][21, 5] = np.nan
    file = reader.file_of(name)
    save_safetensors(file, tensors, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{file.name}: tensor '{name}': rows 16:24: x: contains 1 non-finite "
                                         r"value\(s\).*nan at index \(5, 5\)"):
        models.from_pretrained(path, quant=qj.QuantConfig())

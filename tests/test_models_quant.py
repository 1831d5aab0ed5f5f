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
from qlora_jax._src.models.safetensors_io import SafetensorsReader

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _projections(hf):
    return [(n, m) for n, m in hf.named_modules() if n.rsplit(".", 1)[-1] in PROJ]


# bitsandbytes' 4-bit code tables as ../shared/reference/bitsandbytes-4bit.md gives them, written out here so the
# references below do not read qlora_jax's own tables. FP4 is bitsandbytes' own (not OCP E2M1); its code 8 is +0.0.
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
FP4_TABLE = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32) / np.float32(12)
TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}
NESTED_MAP = bnbf.create_dynamic_map(signed=True).numpy().astype(np.float32)  # the signed dynamic map, 256 values


def _exact_dequant(packed: np.ndarray, absmax: np.ndarray, table: np.ndarray, shape, block=64) -> np.ndarray:
    """table[code] * absmax in float32 from bitsandbytes' packed bytes (high nibble first), PyTorch shape."""
    packed = np.asarray(packed).reshape(-1).view(np.uint8)
    n = int(np.prod(shape))
    codes = np.stack([packed >> 4, packed & 0xF], -1).reshape(-1)[:n]
    scale = np.repeat(np.asarray(absmax, np.float32), block)[:n]
    return (table[codes].astype(np.float64) * scale).astype(np.float32).reshape(shape)  # exact product, one rounding


def _nested_absmax(codes: np.ndarray, nested_absmax: np.ndarray, nested_map: np.ndarray, offset) -> np.ndarray:
    """absmax_i = f32(nested_map[code_i] * nested_absmax[i // 256]) + offset, in float32."""
    codes = np.asarray(codes).reshape(-1).astype(np.int64)
    scale = np.repeat(np.asarray(nested_absmax, np.float32), 256)[: codes.size]
    return (nested_map[codes].astype(np.float64) * scale).astype(np.float32) + np.float32(offset)


def _double_quantize(absmax: np.ndarray):
    """The documented double quantization of float32 absmax (bitsandbytes-4bit.md), in NumPy: offset =
    torch.mean(absmax); per block of 256, m = max |v| of v = absmax - offset, normed = v / m in float32, and the
    nearest value of the signed dynamic map (compared in float64; a tie goes to the lower one). Not bitsandbytes'
    CPU kernel, whose approximate binary search sometimes takes the second-nearest value."""
    offset = np.float32(torch.mean(torch.from_numpy(absmax)).item())
    n = absmax.size
    v = np.zeros(-(-n // 256) * 256, np.float32)
    v[:n] = absmax - offset
    v = v.reshape(-1, 256)
    m = np.abs(v).max(axis=1)
    normed = v / np.where(m > 0, m, np.float32(1))[:, None]
    codes = np.abs(normed.astype(np.float64)[..., None] - NESTED_MAP.astype(np.float64)).argmin(axis=-1)
    codes = np.where(m[:, None] > 0, codes, 0).reshape(-1)[:n].astype(np.uint8)  # argmin: the first (lower) of a tie
    return codes, m.astype(np.float32), offset


def _dequantized_reference(hf, double_quant=False, states=None):
    """The HF model with every projection replaced by bitsandbytes' NF4 `quantize_4bit` codes and absmax (the
    spec: bit-identical to ours, tests/test_formats_bnb.py), absmax double-quantized by the documented rule
    (`_double_quantize`), dequantized exactly in NumPy (not bnb's CPU dequantize kernel). `states` gets each
    projection's reference codes and scales."""
    with torch.no_grad():
        for name, module in _projections(hf):
            w = module.weight.detach().float().contiguous()
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
            packed = packed.numpy()
            absmax = state.absmax.numpy()
            ref = {"weight": packed, "absmax": absmax}
            if double_quant:
                codes, nested_absmax, offset = _double_quantize(absmax)
                absmax = _nested_absmax(codes, nested_absmax, NESTED_MAP, offset)
                ref.update(absmax=codes, nested_absmax=nested_absmax, nested_offset=offset)
            if states is not None:
                states[name] = ref
            module.weight.copy_(torch.from_numpy(_exact_dequant(packed, absmax, NF4_TABLE, tuple(w.shape))))
    return hf


def _layer_state(model, name: str) -> dict:
    """`to_bnb` of our kernel of the HF projection `name` (`model.layers.<i>.<block>.<proj>`)."""
    _, _, i, block, proj = name.split(".")
    q = getattr(getattr(model.layers, block), proj).kernel.get_value()
    return qj.to_bnb(jax.tree.map(lambda leaf: np.asarray(leaf[int(i)]), q))


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2", "qwen3"])
def test_nf4_logits_match_exactly_dequantized_transformers(tmp_path, name):
    path, hf = make_checkpoint(tmp_path, name)
    model = models.from_pretrained(path, quant=qj.QuantConfig(fmt="nf4", block_size=64, double_quant=False))
    assert isinstance(model.layers.self_attn.q_proj.kernel.get_value(), qj.QuantizedArray)
    assert isinstance(model.lm_head, nnx.Linear) or model.lm_head is None  # the head stays float
    ids = np.random.default_rng(0).integers(0, 128, (2, 10))
    expected = hf_logits(_dequantized_reference(hf), ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)


def test_nf4_double_quant_logits_match_the_exact_nested_reference(tmp_path):
    """Double quantization against the documented rule (nearest 8-bit code), not bitsandbytes' CPU nested codes:
    the same codes and scales as ours, and logits to float32 rounding (measured 2.4e-7; against bitsandbytes' CPU
    nested codes, 1 of 1536 a step off, it was 4.2e-6)."""
    path, hf = make_checkpoint(tmp_path, "llama-gqa-untied")
    model = models.from_pretrained(path, quant=qj.QuantConfig(double_quant=True))
    ids = np.random.default_rng(0).integers(0, 128, (2, 10))
    states = {}
    expected = hf_logits(_dequantized_reference(hf, double_quant=True, states=states), ids)
    for name, ref in states.items():
        ours = _layer_state(model, name)
        for key in ("weight", "absmax"):  # the 4-bit codes and the nearest 8-bit codes
            np.testing.assert_array_equal(ours[key].reshape(-1), ref[key].reshape(-1), err_msg=f"{name}: {key}")
        # the offset is a float32 mean: another summation order may change its last bit, and so max |v|'s
        offset = json.loads(ours["quant_state.bitsandbytes__nf4"].tobytes())["nested_offset"]
        np.testing.assert_allclose(np.float32(offset), ref["nested_offset"], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(ours["nested_absmax"], ref["nested_absmax"], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)


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


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """One tiny float32 Llama checkpoint for the bitsandbytes-import cases."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "llama-gqa-untied")


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_bitsandbytes_checkpoint_loads_its_packed_bytes(tiny_llama, tmp_path, fmt, double_quant):
    """A checkpoint saved by `transformers` + `bitsandbytes` in 4 bit: our layers hold its bytes, and the logits
    equal those of the float32 HF model with the weights dequantized exactly from the file's own codes and
    scales (NumPy, from the code tables of bitsandbytes-4bit.md)."""
    path, base = tiny_llama
    hf = copy.deepcopy(base)
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt,
                                                 bnb_4bit_use_double_quant=double_quant,
                                                 bnb_4bit_compute_dtype=torch.float32)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config,
                                                                  device_map="cpu")
    bnb_path = tmp_path / "bnb"
    quantized.save_pretrained(bnb_path)
    model = models.from_pretrained(bnb_path)
    assert model.layers.mlp.down_proj.kernel.get_value().fmt == fmt
    reader = SafetensorsReader(bnb_path)
    keys = ("weight", "absmax", "quant_map") + (("nested_absmax", "nested_quant_map") if double_quant else ())
    with torch.no_grad():
        for name, module in _projections(hf):
            prefix = f"{name}.weight"
            stored = {key: reader[prefix if key == "weight" else f"{prefix}.{key}"] for key in keys}
            meta_key = f"quant_state.bitsandbytes__{fmt}"
            assert {n for n in reader if n.startswith(prefix)} == {prefix, *(f"{prefix}.{k}" for k in (
                *keys[1:], meta_key))}
            meta = json.loads(reader[f"{prefix}.{meta_key}"].tobytes())
            ours = _layer_state(model, name)
            for key in keys:  # our layer holds the file's bytes
                np.testing.assert_array_equal(ours[key].reshape(-1).view(np.uint8),
                                              stored[key].reshape(-1).view(np.uint8), err_msg=f"{prefix}: {key}")
            assert json.loads(ours[meta_key].tobytes()) == meta
            np.testing.assert_array_equal(stored["quant_map"].view(np.uint32), TABLES[fmt].view(np.uint32))
            absmax = stored["absmax"]
            if double_quant:
                np.testing.assert_array_equal(stored["nested_quant_map"].view(np.uint32), NESTED_MAP.view(np.uint32))
                absmax = _nested_absmax(absmax, stored["nested_absmax"], stored["nested_quant_map"],
                                        meta["nested_offset"])
            exact = _exact_dequant(stored["weight"], absmax, TABLES[fmt], tuple(module.weight.shape))
            module.weight.copy_(torch.from_numpy(exact))
    ids = np.random.default_rng(2).integers(0, 128, (2, 10))
    got = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(got, hf_logits(hf, ids), atol=1e-4, rtol=0)
    # bnb's own CPU forward computes at lower precision (bitsandbytes-4bit.md): only a loose check that it reads
    # the same weights
    np.testing.assert_allclose(got, hf_logits(quantized, ids), atol=1e-2, rtol=0)


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

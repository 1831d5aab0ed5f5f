"""Kernels whose input size is not a multiple of the block size (issue 23): stored in flat layout, the blocks
running over the flattened `[out, in]` weight across rows, byte for byte as bitsandbytes stores them, and
accepted everywhere an aligned kernel is: NNX and Linen layers (with the packed-only backward), `apply_qlora`,
`from_pretrained` (streaming quantization and bitsandbytes-4bit checkpoints), stacked layers, merge, PEFT
export/import, `save_merged` and sharding.

References are built from bitsandbytes' `quantize_4bit` codes and scales, dequantized exactly in NumPy (its CPU
4-bit layers need output sizes that are multiples of 64, and its CPU dequantize and forward are imprecise in
places: ../shared/reference/bitsandbytes-4bit.md)."""

import copy
import dataclasses
import json

import bitsandbytes.functional as bnbf
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from cases import matrix
from flax import nnx
from test_models import assert_adapter_gradients_match_peft, hf_logits, make_checkpoint, peft_with_random_b
from test_models_quant import (
    NESTED_MAP,
    NF4_TABLE,
    PROJ,
    TABLES,
    _dequantized_reference,
    _exact_dequant,
    _layer_state,
    _nested_absmax,
    _projections,
    _train_a_few_steps,
)
from test_nnx_layers import ScannedStack, _split_grad_fn
from test_sharding import _assert_close, _loss_and_grads

import qlora_jax as qj
from qlora_jax import models
from qlora_jax._src.models.config import ModelConfig
from qlora_jax._src.models.llama import CausalLM
from qlora_jax._src.models.safetensors_io import SafetensorsReader
from qlora_jax.linen import FROZEN, QLoRADense, convert_params

# hidden 96 (q/k/v/gate/up/o read 96 = 1.5 blocks of 64) and intermediate 344 (down_proj reads 5.375 blocks)
UNALIGNED = dict(hidden_size=96, intermediate_size=344)
# (out, in) PyTorch weights: blocks cross rows; 33 x 35 has an odd element count and a partial last block
SHAPES = [(96, 96), (48, 96), (96, 344), (344, 96), (33, 35), (64, 1376)]


def _bnb_state(weight: np.ndarray, fmt: str, block: int) -> dict:
    """bitsandbytes' `quantize_4bit` of a PyTorch weight `[out, in]`: packed bytes and float32 absmax."""
    packed, state = bnbf.quantize_4bit(torch.from_numpy(np.ascontiguousarray(weight, np.float32)), blocksize=block,
                                       quant_type=fmt, compress_statistics=False)
    return {"weight": packed.numpy().reshape(-1), "absmax": state.absmax.numpy().reshape(-1)}


def _assert_bnb_bytes(q: qj.QuantizedArray, weight: np.ndarray, fmt: str = "nf4", block: int = 64, what: str = ""):
    """`q` (a kernel `weight.T`, no double quantization) holds bitsandbytes' bytes for `weight [out, in]`."""
    ref = _bnb_state(weight, fmt, block)
    ours = qj.to_bnb(q)
    np.testing.assert_array_equal(ours["weight"].reshape(-1), ref["weight"], err_msg=f"{what}: weight")
    np.testing.assert_array_equal(ours["absmax"].view(np.uint32), ref["absmax"].view(np.uint32),
                                  err_msg=f"{what}: absmax")


@pytest.mark.parametrize(("fmt", "block"), matrix(["nf4", "fp4"], [32, 64, 128, 4096]))
def test_quantize_is_bitsandbytes_byte_for_byte(fmt, block):
    rng = np.random.default_rng(0)
    checked = 0
    for out, n_in in SHAPES:
        weight = rng.standard_normal((out, n_in)).astype(np.float32)
        weight[0, :5] = 0.0  # zeros and a tie-free mix of magnitudes
        q = qj.quantize(jnp.asarray(weight.T), fmt, block)
        if q.row_layout:
            continue
        checked += 1
        assert q.codes.shape == (-(-out * n_in // 2),) and q.absmax.shape == (-(-out * n_in // block),)
        _assert_bnb_bytes(q, weight, fmt, block, what=f"{(out, n_in)}")
        # and back: the exact NumPy dequantization of bitsandbytes' codes
        exact = _exact_dequant(qj.to_bnb(q)["weight"], q.absmax, TABLES[fmt], (out, n_in), block)
        np.testing.assert_array_equal(np.asarray(qj.dequantize(q)), exact.T)
    assert checked >= 2


def test_layers_store_bitsandbytes_bytes():
    """`apply_qlora` (streaming quantization of a concrete kernel), `convert_params` and a Linen layer's own init
    store an unaligned kernel exactly as bitsandbytes does."""
    rng = np.random.default_rng(1)

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(96, 344, rngs=rngs)
            self.down = nnx.Linear(344, 96, rngs=rngs)

    model = MLP(nnx.Rngs(0))
    kernels = {name: np.asarray(getattr(model, name).kernel[...]) for name in ("up", "down")}
    model = qj.apply_qlora(model, quant=qj.QuantConfig(double_quant=False), lora=qj.LoraConfig(rank=4),
                           rngs=nnx.Rngs(1))
    for name, kernel in kernels.items():
        q = getattr(model, name).kernel.get_value()
        assert not q.row_layout
        _assert_bnb_bytes(q, kernel.T, what=f"nnx {name}")

    params = {"up": {"kernel": jnp.asarray(rng.standard_normal((96, 344)), jnp.float32), "bias": jnp.zeros(344)}}
    variables, _ = convert_params(params, quant=qj.QuantConfig(double_quant=False), lora=qj.LoraConfig(rank=4),
                                  rng=jax.random.key(0))
    _assert_bnb_bytes(variables[FROZEN]["up"]["kernel"], np.asarray(params["up"]["kernel"]).T, what="convert_params")

    layer = QLoRADense(96, quant=qj.QuantConfig(double_quant=False), lora=qj.LoraConfig(rank=4))
    q = layer.init(jax.random.key(0), jnp.ones((1, 344)))[FROZEN]["kernel"]
    assert not q.row_layout and q.shape == (344, 96)
    # the same layer with quant=None draws the same float kernel and keeps it
    kernel = dataclasses.replace(layer, quant=None).init(jax.random.key(0), jnp.ones((1, 344)))[FROZEN]["kernel"]
    _assert_bnb_bytes(q, np.asarray(kernel).T, what="QLoRADense")


@pytest.fixture(scope="module")
def unaligned_llama(tmp_path_factory):
    """A tiny float32 Llama checkpoint with hidden 96 and intermediate 344 (every projection unaligned)."""
    return make_checkpoint(tmp_path_factory.mktemp("unaligned"), "llama-gqa-untied", **UNALIGNED)


@pytest.mark.parametrize("double_quant", [False, True], ids=["no-dq", "dq"])
def test_nf4_logits_match_the_exact_dequantization(unaligned_llama, double_quant):
    """`from_pretrained` quantizes every projection in flat layout with bitsandbytes' 4-bit codes (the nested
    absmax by the documented rule); the logits equal the float32 HF model with exactly dequantized weights."""
    path, base = unaligned_llama
    model = models.from_pretrained(path, quant=qj.QuantConfig(double_quant=double_quant))
    for block in ("self_attn", "mlp"):
        for proj in ("q_proj", "o_proj") if block == "self_attn" else ("gate_proj", "down_proj"):
            q = getattr(getattr(model.layers, block), proj).kernel.get_value()
            assert not q.row_layout and q.stack_shape == (2,) and q.double_quant == double_quant
    ids = np.random.default_rng(0).integers(0, 128, (2, 10))
    states = {}
    expected = hf_logits(_dequantized_reference(copy.deepcopy(base), double_quant=double_quant, states=states), ids)
    assert len(states) == 14
    for name, ref in states.items():
        ours = _layer_state(model, name)
        for key in ("weight", "absmax"):
            np.testing.assert_array_equal(ours[key].reshape(-1), ref[key].reshape(-1), err_msg=f"{name}: {key}")
    got = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_adapter_gradients_match_peft_on_the_exact_nf4_weights(unaligned_llama, tmp_path):
    path, base = unaligned_llama
    peft_model = peft_with_random_b(_dequantized_reference(copy.deepcopy(base)), tmp_path, PROJ)
    model = models.from_pretrained(path, quant=qj.QuantConfig(double_quant=False),
                                   lora=qj.LoraConfig(rank=4, alpha=8, targets=list(PROJ), dropout=0.0))
    models.load_peft_adapter(model, tmp_path / "adapter")
    # 64 tokens: the merged products of ops/merged.py too
    assert_adapter_gradients_match_peft(model, peft_model, np.random.default_rng(0).integers(0, 128, (2, 32)), PROJ)


@pytest.mark.parametrize("double_quant", [False, True], ids=["no-dq", "dq"])
def test_bitsandbytes_checkpoint_with_unaligned_layers_loads_its_bytes(unaligned_llama, tmp_path, double_quant):
    """A checkpoint saved by `transformers` + `bitsandbytes` (NF4) whose layers have unaligned input sizes: our
    layers hold its bytes, and the logits equal the HF model's with the file's codes and scales dequantized
    exactly in NumPy. (bitsandbytes' own CPU forward needs output sizes that are multiples of 64: not run.)"""
    path, base = unaligned_llama
    hf = copy.deepcopy(base)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=double_quant,
                                             bnb_4bit_compute_dtype=torch.float32)
    transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu") \
        .save_pretrained(tmp_path / "bnb")
    model = models.from_pretrained(tmp_path / "bnb")
    reader = SafetensorsReader(tmp_path / "bnb")
    keys = ("weight", "absmax") + (("nested_absmax",) if double_quant else ())
    with torch.no_grad():
        for name, module in _projections(hf):
            prefix = f"{name}.weight"
            stored = {key: reader[prefix if key == "weight" else f"{prefix}.{key}"] for key in keys}
            meta = json.loads(reader[f"{prefix}.quant_state.bitsandbytes__nf4"].tobytes())
            assert meta["shape"] == list(module.weight.shape) and module.weight.shape[1] % 64
            ours = _layer_state(model, name)
            for key in keys:
                np.testing.assert_array_equal(ours[key].reshape(-1).view(np.uint8),
                                              stored[key].reshape(-1).view(np.uint8), err_msg=f"{prefix}: {key}")
            absmax = stored["absmax"]
            if double_quant:
                absmax = _nested_absmax(absmax, stored["nested_absmax"], NESTED_MAP, meta["nested_offset"])
            module.weight.copy_(torch.from_numpy(_exact_dequant(stored["weight"], absmax, NF4_TABLE,
                                                                tuple(module.weight.shape))))
    ids = np.random.default_rng(2).integers(0, 128, (2, 10))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_peft_adapter_round_trip_and_save_merged(unaligned_llama, tmp_path):
    from peft import PeftModel

    path, base = unaligned_llama
    lora = qj.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    model = models.from_pretrained(path, quant=qj.QuantConfig(double_quant=False), lora=lora)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 128, (2, 12)))
    model = _train_a_few_steps(model, ids, steps=2)
    model.eval()
    assert np.abs(np.asarray(model.layers.mlp.down_proj.lora_b[...])).max() > 0
    ours = np.asarray(model(ids))
    models.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    peft_model = PeftModel.from_pretrained(_dequantized_reference(copy.deepcopy(base)), tmp_path / "adapter").eval()
    np.testing.assert_allclose(ours, hf_logits(peft_model, np.asarray(ids)), atol=1e-4, rtol=0)
    fresh = models.from_pretrained(path, quant=qj.QuantConfig(double_quant=False), lora=lora)
    models.load_peft_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(np.asarray(fresh(ids)), ours, atol=1e-6, rtol=0)

    out = models.save_merged(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    np.testing.assert_allclose(hf_logits(merged, np.asarray(ids)), ours, atol=1e-4, rtol=0)


def _exact_kernel(q: qj.QuantizedArray) -> np.ndarray:
    """One layer's kernel `[in, out]` in float64, dequantized in NumPy from its bitsandbytes bytes."""
    state = qj.to_bnb(q)
    absmax = np.asarray(qj.dequantize_absmax(q), np.float32).reshape(-1)
    out, n_in = json.loads(state[f"quant_state.bitsandbytes__{q.fmt}"].tobytes())["shape"]
    table = TABLES[q.fmt].astype(np.float64)
    packed = state["weight"].reshape(-1)
    codes = np.stack([packed >> 4, packed & 0xF], -1).reshape(-1)[: out * n_in]
    return (table[codes] * np.repeat(absmax.astype(np.float64), q.block_size)[: out * n_in]).reshape(out, n_in).T


def test_stacked_layers_scan_merge_and_requantize():
    """Three scanned 96 x 96 layers (stacked by nnx.vmap, blocks across rows): each layer's slice is that layer
    quantized on its own, the scan equals a per-layer float64 reference, the adapters get gradients, and
    `merge_lora` equals a float64 NumPy merge (with `requantize`, blocks of 128: flat again)."""
    n, d, rank = 3, 96, 4
    model = ScannedStack(n, d, nnx.Rngs(0))
    kernels, biases = np.asarray(model.blocks.fc.kernel[...]), np.asarray(model.blocks.fc.bias[...])
    model = qj.apply_qlora(model, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=rank, alpha=8), rngs=nnx.Rngs(1))
    fc = model.blocks.fc
    q = fc.kernel.get_value()
    assert q.stack_shape == (n,) and not q.row_layout and q.codes.shape == (n, d * d // 2)
    layers = [jax.tree.map(lambda leaf, i=i: leaf[i], q) for i in range(n)]
    for i in range(n):
        own = qj.quantize(jnp.asarray(kernels[i]), "nf4", 64, double_quant=True)
        for a, b in zip(jax.tree.leaves(layers[i]), jax.tree.leaves(own), strict=True):
            np.testing.assert_array_equal(a, b)
    fc.lora_b[...] = jax.random.normal(jax.random.key(2), (n, rank, d)) * 0.1
    x = jax.random.normal(jax.random.key(3), (4, d))
    h = np.asarray(x, np.float64)
    a, b = np.asarray(fc.lora_a[...], np.float64), np.asarray(fc.lora_b[...], np.float64)
    for i in range(n):
        h = np.tanh(h @ _exact_kernel(layers[i]) + biases[i] + h @ a[i] @ b[i] * 2.0)
    np.testing.assert_allclose(model(x), h, rtol=1e-5, atol=1e-5)
    grad_fn, lora, rest = _split_grad_fn(model)
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grad_fn(lora, rest, x)))

    merged = qj.merge_lora(nnx.clone(model))
    got = np.asarray(merged.blocks.fc.kernel[...])
    assert got.dtype == np.float32
    for i in range(n):
        w = _exact_kernel(layers[i])
        ref = w + 2.0 * a[i] @ b[i]
        bound = (rank + 2) * 2.0**-24 * (np.abs(w) + 2.0 * np.abs(a[i]) @ np.abs(b[i]))
        assert (np.abs(got[i] - ref) <= bound).all(), i
    requantized = qj.merge_lora(nnx.clone(model), requantize=qj.QuantConfig(block_size=128))
    rq = requantized.blocks.fc.kernel.get_value()
    assert rq.block_size == 128 and not rq.row_layout and rq.stack_shape == (n,)
    for i in range(n):
        own = qj.quantize(jnp.asarray(got[i]), "nf4", 128, double_quant=True)
        for x1, x2 in zip(jax.tree.leaves(jax.tree.map(lambda leaf, i=i: leaf[i], rq)), jax.tree.leaves(own),
                          strict=True):
            np.testing.assert_array_equal(x1, x2)


# The packed-only backward of scanned flat-layout NNX layers: tests/test_nnx_layers.py
# (test_scanned_gradient_step_keeps_no_dequantized_weights[flat-layout]).


class LinenStack(nn.Module):
    """`n` QLoRADense layers `d -> d` stacked by nn.scan (params and frozen kernels scanned)."""

    n: int
    d: int
    double_quant: bool = True

    @nn.compact
    def __call__(self, x):
        d, quant = self.d, qj.QuantConfig(double_quant=self.double_quant)

        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return jnp.tanh(QLoRADense(d, quant=quant, lora=qj.LoraConfig(rank=4), name="fc")(h)), None

        stack = nn.scan(Block, variable_axes={"params": 0, FROZEN: 0}, split_rngs={"params": True}, length=self.n)
        return stack(name="blocks")(x, None)[0]


def test_linen_scanned_layers_match_the_reference_and_keep_no_dequantized_weights():
    n, d = 8, 1000
    model = LinenStack(n, d)
    x = jnp.ones((8, d))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    q = variables[FROZEN]["blocks"]["fc"]["kernel"]
    assert not q.row_layout and q.stack_shape == (n,)
    params = jax.tree.map(lambda p: p, variables["params"])
    fc = params["blocks"]["fc"]
    fc["lora_b"] = 0.01 * jax.random.normal(jax.random.key(2), fc["lora_b"].shape)  # non-zero B
    scale = qj.LoraConfig(rank=4).alpha / 4
    small = jax.random.normal(jax.random.key(1), (2, d))
    got = model.apply({"params": params, FROZEN: variables[FROZEN]}, small)
    h = np.asarray(small, np.float64)
    for i in range(n):
        w = _exact_kernel(jax.tree.map(lambda leaf, i=i: leaf[i], q))
        a, b = np.asarray(fc["lora_a"][i], np.float64), np.asarray(fc["lora_b"][i], np.float64)
        h = np.tanh(h @ w + np.asarray(fc["bias"][i], np.float64) + h @ a @ b * scale)
    np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-5)

    def loss(params, frozen, x):
        return jnp.sum(model.apply({"params": params, FROZEN: frozen}, x))

    ours = jax.jit(jax.grad(loss)).lower(params, variables[FROZEN], x).compile().memory_analysis().temp_size_in_bytes
    assert ours < 4 * d * d * 4, ours


UNALIGNED_CONFIG = ModelConfig(vocab_size=256, hidden_size=96, intermediate_size=344, num_layers=2, num_heads=4,
                               num_kv_heads=2, max_position_embeddings=64)
# Blocks of 64: q/o [96, 96] hold 144 blocks and k/v [96, 48] 72 (split over 8 devices), gate/up/down [96, 344] 516
# (split over 4, not 8: replicated under "fsdp" on 8 devices).
MESHES = [({"fsdp": 8}, "fsdp"), ({"data": 2, "tensor": 4}, "tp"), ({"fsdp": 2, "tensor": 4}, "fsdp+tp")]


def _unaligned_model():
    model = qj.apply_qlora(CausalLM(UNALIGNED_CONFIG, rngs=nnx.Rngs(0)), quant=qj.QuantConfig(double_quant=True),
                           lora=qj.LoraConfig(rank=8, alpha=16), rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    return model


def _unaligned_batch(n=8, seq=16):
    ids = np.random.default_rng(0).integers(0, UNALIGNED_CONFIG.vocab_size, (n, seq + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((n, seq), np.float32)}


@pytest.fixture(scope="module")
def unaligned_single_device():
    model = _unaligned_model()
    loss, grads = _loss_and_grads(model, _unaligned_batch())
    return float(loss), nnx.to_pure_dict(grads)


@pytest.mark.parametrize("axes,strategy", [*MESHES[:2], pytest.param(*MESHES[2], marks=pytest.mark.slow)],
                         ids=[s for _, s in MESHES])
def test_sharded_step_matches_one_device(cpu_devices, unaligned_single_device, axes, strategy):
    ref_loss, ref_grads = unaligned_single_device
    mesh = qj.make_mesh(axes, cpu_devices)
    model = qj.shard_model(_unaligned_model(), mesh, strategy)
    attn, mlp = model.layers.self_attn, model.layers.mlp
    kinds = set()
    for layer in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        q = layer.kernel.get_value()
        assert not q.row_layout
        spec = q.codes.sharding.spec
        assert q.absmax.sharding.spec == spec and q.nested_absmax.sharding.is_fully_replicated
        if q.codes.sharding.is_fully_replicated:
            kinds.add("replicated")
            continue
        kinds.add("split")
        n = q.absmax.shape[-1] // q.absmax.addressable_shards[0].data.shape[-1]
        # whole blocks per device: the codes' share is exactly the absmax share's blocks
        assert q.codes.addressable_shards[0].data.shape[-1] * 2 == q.absmax.shape[-1] // n * q.block_size
        assert q.size % q.block_size == 0
    assert kinds == ({"split", "replicated"} if strategy == "fsdp" else {"split"}), kinds
    loss, grads = _loss_and_grads(model, qj.shard_batch(_unaligned_batch(), mesh))
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    _assert_close(nnx.to_pure_dict(grads), ref_grads)


def test_a_flat_kernel_that_cannot_split_on_whole_blocks_stays_replicated(cpu_devices):
    """A partial last block (33 x 35 = 18 blocks of 64 and 3 elements) or a block count the mesh axis does not
    divide: replicated under every strategy, never an error."""

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.up_proj = nnx.Linear(35, 33, use_bias=False, rngs=rngs)  # partial block (a bias [33] splits nowhere)
            self.down_proj = nnx.Linear(344, 96, rngs=rngs)  # 516 blocks: not over 8

    block = qj.apply_qlora(Block(nnx.Rngs(0)), quant=qj.QuantConfig(), lora=None)  # adapters: [35, r] splits nowhere
    for axes, strategy in MESHES:
        specs = qj.partition_specs(block, qj.make_mesh(axes, cpu_devices), strategy, axes=models.LLAMA_AXES)
        up = specs["up_proj"]["kernel"].get_value()
        assert all(s == jax.sharding.PartitionSpec() for s in jax.tree.leaves(
            up, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))), (strategy, up)
        down = specs["down_proj"]["kernel"].get_value()
        want = jax.sharding.PartitionSpec() if strategy == "fsdp" else jax.sharding.PartitionSpec("tensor")
        assert down.codes == want and down.absmax == want and down.nested_absmax == jax.sharding.PartitionSpec()
    qj.shard_model(block, qj.make_mesh({"fsdp": 8}, cpu_devices), "fsdp", axes=models.LLAMA_AXES)
    assert block.down_proj.kernel.get_value().codes.sharding.is_fully_replicated


def test_linear_general_and_einsum_kernels_in_flat_layout():
    """N-D kernels whose input axes hold 96 elements (blocks of 64 cross rows): `nnx.LinearGeneral` `[2, 48, 4, 24]`
    and `nnx.Einsum` `[96, 4, 16]` as QLoRA layers equal a float64 reference with the exactly dequantized kernel."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.general = nnx.LinearGeneral((2, 48), (4, 24), axis=(-2, -1), rngs=rngs)
            self.einsum = nnx.Einsum("bsd,dnh->bsnh", (96, 4, 16), (4, 16), rngs=rngs)

    model = Net(nnx.Rngs(0))
    floats = {name: np.asarray(getattr(model, name).kernel[...]).reshape(96, -1) for name in ("general", "einsum")}
    model = qj.apply_qlora(model, quant=qj.QuantConfig(double_quant=False), lora=qj.LoraConfig(rank=4, alpha=8),
                           rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (2, 3, 96))
    for name, x_in in (("general", x.reshape(2, 3, 2, 48)), ("einsum", x)):
        layer = getattr(model, name)
        q = layer.kernel.get_value()
        assert not q.row_layout and q.contract_axes == ((0, 1) if name == "general" else (0,))
        layer.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(3), layer.lora_b.shape)
        w = _exact_kernel(q)  # [96, prod(out axes)], float64 from the bitsandbytes bytes
        _assert_bnb_bytes(q, floats[name].T, what=name)  # bitsandbytes' weight [out, in] = [prod(out axes), 96]
        a = np.asarray(layer.lora_a[...], np.float64).reshape(96, 4)
        b = np.asarray(layer.lora_b[...], np.float64).reshape(4, -1)
        h = np.asarray(x, np.float64).reshape(6, 96)
        ref = h @ w + np.asarray(layer.bias[...], np.float64).reshape(-1) + h @ a @ b * 2.0
        np.testing.assert_allclose(np.asarray(layer(x_in)).reshape(6, -1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dtype", "double_quant"), matrix([jnp.float32, jnp.bfloat16], [False, True]))
def test_streaming_quantization_in_chunks_of_whole_blocks(dtype, double_quant):
    """`quantize_streaming` (the checkpoint loader's) quantizes a flat-layout matrix a chunk of whole blocks at a
    time, bit for bit as `quantize` of the whole; a non-finite value in the partial last block is named."""
    from qlora_jax._src.formats.blockwise import quantize_streaming

    rng = np.random.default_rng(4)
    for out, n_in, block in ((96, 344, 64), (37, 35, 64), (40, 100, 128), (9, 13, 4096)):
        rows = np.asarray(jnp.asarray(rng.standard_normal((out, n_in)), dtype))  # PyTorch [out, in]
        whole = qj.quantize(jnp.asarray(rows), "nf4", block, double_quant, contract_axes=(1,))
        assert not whole.row_layout
        for chunk_elements in (1, 3 * n_in, 10**9):
            q = quantize_streaming(rows, "nf4", block, double_quant, chunk_elements=chunk_elements)
            assert q.shape == (out, n_in) and q.contract_axes == (1,)
            for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(whole), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{(out, n_in, chunk_elements)}")
    rows = rng.standard_normal((200, 35)).astype(np.float32)  # chunks of 64 rows (35 x 64 = 35 blocks)
    rows[-1, -1] = np.nan  # in the partial last block
    with pytest.raises(ValueError, match=r"rows 192:200: x: contains 1 non-finite value\(s\) .* at index \(7, 34\)"):
        quantize_streaming(rows, "nf4", 64, double_quant, chunk_elements=35)


def test_linen_interceptor_runs_an_unmodified_model_with_unaligned_kernels():
    """`convert_params` + `qlora_interceptor` on a plain Linen MLP 96 -> 344 -> 96: equal to a float64 reference
    with the exactly dequantized kernels and the adapters."""
    from qlora_jax.linen import qlora_interceptor

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(96, name="down")(jnp.tanh(nn.Dense(344, name="up")(x)))

    model, x = MLP(), jax.random.normal(jax.random.key(0), (3, 96))
    params = model.init(jax.random.key(1), x)["params"]
    quant, lora = qj.QuantConfig(), qj.LoraConfig(rank=4, alpha=8)
    variables, report = convert_params(params, quant=quant, lora=lora, rng=jax.random.key(2))
    assert report.paths == ("up", "down")
    for name in ("up", "down"):
        layer = variables["params"][name]
        layer["lora_b"] = 0.1 * jax.random.normal(jax.random.key(3), layer["lora_b"].shape)
        assert not variables[FROZEN][name]["kernel"].row_layout

    @jax.jit
    def run(variables, x):
        with nn.intercept_methods(qlora_interceptor(quant=quant, lora=lora)):
            return model.apply(variables, x)

    h = np.asarray(x, np.float64)
    for name, act in (("up", np.tanh), ("down", lambda v: v)):
        p = variables["params"][name]
        w = _exact_kernel(variables[FROZEN][name]["kernel"])
        a, b = np.asarray(p["lora_a"], np.float64), np.asarray(p["lora_b"], np.float64)
        h = act(h @ w + np.asarray(p["bias"], np.float64) + h @ a @ b * 2.0)
    np.testing.assert_allclose(np.asarray(run(variables, x)), h, rtol=1e-5, atol=1e-5)

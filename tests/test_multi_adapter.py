"""Several named adapters on one model against PEFT's multi-adapter `PeftModel` (float32 base, tiny Llama).

PEFT's "default" adapter (q_proj, v_proj, down_proj) and a second adapter "b" (q_proj, down_proj), both with
random non-zero B, loaded here with `load_peft_adapter(..., adapter_name=...)`; logits per active adapter,
training only the active one, exact switching, merge and export of a chosen adapter."""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

import qlora_jax as qj
from qlora_jax import models

TARGETS = ["q_proj", "v_proj", "down_proj"]
TARGETS_B = ["q_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    tmp = tmp_path_factory.mktemp("multi")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    hf.save_pretrained(tmp / "base")
    peft_model = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    peft_model.add_adapter("b", PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS_B, lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp / "adapters")  # "default" in adapters/, "b" in adapters/b/
    peft_model.eval()
    return tmp, peft_model


def _peft_logits(peft_model, ids, name):
    peft_model.set_adapter(name)
    with torch.no_grad():
        return peft_model(torch.from_numpy(ids)).logits.numpy()


def test_named_adapters_match_peft(setup, tmp_path, cpu_devices):
    from peft import PeftModel

    tmp, peft_model = setup
    ids = np.random.default_rng(0).integers(0, 128, (2, 10))
    expected = {name: _peft_logits(peft_model, ids, name) for name in ("default", "b")}
    assert np.abs(expected["default"] - expected["b"]).max() > 1e-2  # the two adapters differ

    model = models.from_pretrained(tmp / "base", lora=qj.LoraConfig(rank=4, alpha=8, targets=TARGETS))
    models.load_peft_adapter(model, tmp / "adapters")
    models.load_peft_adapter(model, tmp / "adapters" / "b", adapter_name="b")
    assert qj.adapter_names(model) == ["default", "b"] and qj.active_adapter(model) == "default"
    forward = nnx.jit(lambda m, x: m(x))
    x = jnp.asarray(ids)
    first = np.asarray(forward(model, x))
    np.testing.assert_allclose(first, expected["default"], atol=1e-4, rtol=0)
    trainable = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    stored = jax.tree.map(np.asarray, nnx.state(model, qj.nnx.FrozenAdapter))

    # The stored adapter shares the stacked layout and the sharding rules of the active one.
    specs = qj.partition_specs(model, qj.make_mesh({"fsdp": 2, "tensor": 4}, cpu_devices), "fsdp+tp")
    for proj in (specs["layers"]["self_attn"]["q_proj"], specs["layers"]["mlp"]["down_proj"]):
        for slot in ("lora_a", "lora_b"):
            assert proj["frozen_adapters"]["b"][slot].get_value() == proj[slot].get_value()
    assert "tensor" in str(specs["layers"]["self_attn"]["q_proj"]["lora_b"].get_value())

    # Switching: the active adapter is the trainable one; back and forth is exact.
    assert qj.set_adapter(model, "b") == "default"
    np.testing.assert_allclose(np.asarray(forward(model, x)), expected["b"], atol=1e-4, rtol=0)
    assert qj.set_adapter(model, "b") == "b"  # already active: nothing moves
    v_proj = model.layers.self_attn.v_proj  # not targeted by "b": a zero adapter
    assert not np.asarray(v_proj.lora_a[...]).any() and not np.asarray(v_proj.lora_b[...]).any()
    qj.set_adapter(model, "default")
    np.testing.assert_array_equal(np.asarray(forward(model, x)), first)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam)),
                 trainable)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, qj.nnx.FrozenAdapter)),
                 stored)

    # One optimizer step over nnx.LoRAParam with "b" active changes "b" only.
    trained = nnx.clone(model)
    qj.set_adapter(trained, "b")
    optimizer = nnx.Optimizer(trained, optax.sgd(0.1), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(m, opt):
        opt.update(m, nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(m))

    step(trained, optimizer)
    after = trained.layers.self_attn.q_proj
    assert np.abs(np.asarray(after.lora_b[...])
                  - stored["layers"]["self_attn"]["q_proj"]["frozen_adapters"]["b"]["lora_b"].get_value()).max() > 0
    for (path, layer), (_, before) in zip(nnx.iter_modules(trained), nnx.iter_modules(model), strict=True):
        if isinstance(layer, qj.nnx.QLoRALinear):  # "default", now stored, bit-identical to its values before
            for slot in ("lora_a", "lora_b"):
                np.testing.assert_array_equal(np.asarray(layer.frozen_adapters["default"][slot].get_value()),
                                              np.asarray(getattr(before, slot)[...]), err_msg=str(path))

    # Export of the non-active adapter: PEFT loads it over the base with "b"'s logits; the model is unchanged.
    qj.models.save_peft_adapter(model, tmp_path / "b", adapter_name="b")
    assert qj.active_adapter(model) == "default"
    reloaded = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp / "base").eval(),
                                         tmp_path / "b").eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.from_numpy(ids)).logits.numpy(), expected["b"], atol=1e-4,
                                   rtol=0)
    np.testing.assert_array_equal(np.asarray(forward(model, x)), first)

    # Merge of a chosen adapter equals PEFT's merge_and_unload(adapter_names=["b"]).
    merged_peft = copy.deepcopy(peft_model).merge_and_unload(adapter_names=["b"])
    with torch.no_grad():
        merged_expected = merged_peft(torch.from_numpy(ids)).logits.numpy()
    merged = qj.merge_lora(nnx.clone(model), adapter_name="b")
    np.testing.assert_allclose(np.asarray(forward(merged, x)), merged_expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged_expected, expected["b"], atol=1e-4, rtol=0)

    # Errors name the problem; nothing changes.
    with pytest.raises(ValueError, match="'b' is already loaded"):
        models.load_peft_adapter(model, tmp / "adapters" / "b", adapter_name="b")
    with pytest.raises(ValueError, match="'c' is not loaded"):
        qj.set_adapter(model, "c")
    with pytest.raises(ValueError, match="is the active adapter"):
        qj.delete_adapter(model, "default")
    shutil.copytree(tmp / "adapters" / "b", tmp_path / "r8")  # "b" claiming rank 8: refused, nothing changes
    config = json.loads((tmp_path / "r8" / "adapter_config.json").read_text())
    (tmp_path / "r8" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match=r"down_proj: lora_A \(4, 128\), lora_B \(64, 4\) \(r=8\) do not fit"):
        models.load_peft_adapter(model, tmp_path / "r8", adapter_name="r8")
    assert qj.adapter_names(model) == ["default", "b"]
    np.testing.assert_array_equal(np.asarray(forward(model, x)), first)
    qj.delete_adapter(model, "b")
    assert qj.adapter_names(model) == ["default"] and not nnx.state(model, qj.nnx.FrozenAdapter)



def test_named_dora_adapters_match_peft(tmp_path):
    """Two PEFT DoRA adapters (random B and magnitudes; "b" targets a subset): logits per active adapter and the
    merge of the stored one equal PEFT's; each stored adapter keeps its magnitude."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    hf.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0, use_dora=True))
    peft_model.add_adapter("b", PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0,
                                               use_dora=True))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "lora_magnitude_vector" in n:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapters")
    peft_model.eval()
    ids = np.random.default_rng(0).integers(0, 128, (2, 10))
    expected = {name: _peft_logits(peft_model, ids, name) for name in ("default", "b")}
    assert np.abs(expected["default"] - expected["b"]).max() > 1e-2

    model = models.from_pretrained(tmp_path / "base", lora=qj.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"],
                                                                         use_dora=True))
    models.load_peft_adapter(model, tmp_path / "adapters")
    models.load_peft_adapter(model, tmp_path / "adapters" / "b", adapter_name="b")
    forward = nnx.jit(lambda m, x: m(x))
    x = jnp.asarray(ids)
    for name in ("b", "default"):
        qj.set_adapter(model, name)
        np.testing.assert_allclose(np.asarray(forward(model, x)), expected[name], atol=1e-4, rtol=0)
    stored = model.layers.self_attn.q_proj.frozen_adapters["b"]
    assert sorted(stored) == ["lora_a", "lora_b", "lora_magnitude_vector"]
    merged_peft = copy.deepcopy(peft_model).merge_and_unload(adapter_names=["b"])
    with torch.no_grad():
        merged_expected = merged_peft(torch.from_numpy(ids)).logits.numpy()
    merged = qj.merge_lora(model, adapter_name="b")
    np.testing.assert_allclose(np.asarray(forward(merged, x)), merged_expected, atol=1e-4, rtol=0)

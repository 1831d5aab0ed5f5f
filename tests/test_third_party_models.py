"""QLoRA on third-party Flax models from PyPI, their code unmodified (issue 23).

* NNX: Llama 3 and Gemma from Google's `tunix` (`tunix.models.llama3.model`, `tunix.models.gemma.model`),
  through `apply_qlora` with "all-linear" and no other argument.
* Linen: Griffin from DeepMind's `recurrentgemma` (`recurrentgemma.jax.griffin`), through `convert_params`
  and `qlora_interceptor`.

Each model is built tiny and random; then (1) every packed kernel is, leaf for leaf, `qj.quantize` of the
original kernel, and with fresh adapters (B = 0) the model's logits equal, to 1e-5, those of a float copy of
the model whose converted kernels are `qj.dequantize` of the packed ones (the dequantized kernel lying within
NF4's rounding bound of the original); (2) a few AdamW steps on a fixed batch lower the next-token loss, move
every adapter, and leave the packed base (every leaf of every `QuantizedArray`: codes, absmax, nested scales)
and every other weight of the model bit-identical.

What is quantized, and what stays float: tunix's attention projections are its own `Einsum` module (one
`nnx.Param` `w` used in `jnp.einsum(self.einsum_str, ...)`), found by `apply_qlora` without a trace (one
parameter and its spec as a string attribute; issue 26) and replaced at `.../q_proj/w` (Llama) or
`.../q_einsum/w`, `kv_einsum/w`, `attn_vec_einsum/w` (Gemma: grouped-query attention, so kernels contracted
along a middle axis), together with the `nnx.Linear` MLP: 100% of the projection weights. The report lists what
stays float: the embedding, and Llama's untied `lm_head` (an `Einsum` named as an output head; Gemma's head is
its tied embedding). Griffin: its `nn.Dense` layers (`dense_layers`) and the weights its own modules multiply
(`product_params`: the MLP's `Einsum` `ffw_up` and the RG-LRU gates' `BlockDiagonalLinear`, both applying
`nn.dtypes.promote_dtype` to the weight before `jnp.einsum`); its `Conv1D` stays float. Norms and embeddings are
never quantized.

Installation: both packages are installed with `pip install --no-deps` (README's test command, `.ci/run`; see
docs/testing.md), because their dependency pins would downgrade jax, transformers and numpy. `tunix/__init__.py`
imports its trainers and their dependencies (grain, metrax, ...), which the model code does not need, so the
test registers an empty `tunix` package whose `__path__` is the installed one and imports only the model
module: tunix's code itself runs as shipped. The models are written for JAX's default promotion rules, so they
run under `jax.numpy_dtype_promotion("standard")` and `jax.numpy_rank_promotion("allow")` here (the suite's
conftest makes both strict). A test is skipped only when its package is not installed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qlora_jax as qj
from qlora_jax.nnx import QLoRALinear, QLoRAProduct, qlora_report

RANK = 4
QUANT = qj.QuantConfig()  # NF4, block 64, double quantization; computes in the layer's dtype (float32 here)
LORA = qj.LoraConfig(rank=RANK, alpha=8, targets="all-linear")
NF4_HALF_GAP = 0.152  # half the widest gap between NF4 levels (-1 and -0.6962), in units of a block's absmax
B, T, VOCAB = 2, 16, 128
STEPS = 8
# tunix's and recurrentgemma's own code uses APIs that JAX and Flax have since deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _default_promotion():
    """JAX's default promotion rules, for code written against them."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.numpy_dtype_promotion("standard"))
    stack.enter_context(jax.numpy_rank_promotion("allow"))
    return stack


def _installed(package: str, requirement: str) -> importlib.machinery.ModuleSpec:
    """The package's import spec; skips the test only when the package itself is absent (a missing dependency
    of an installed package fails the test: CI installs them all)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed: pip install --no-deps {requirement} (docs/testing.md)")
    return spec


def _import_tunix_module(name: str) -> types.ModuleType:
    """`tunix.<name>`, without running `tunix/__init__.py` (it imports the trainers' dependencies)."""
    if "tunix" not in sys.modules:  # (once the stub is registered, find_spec cannot look tunix up again)
        spec = _installed("tunix", "google-tunix==0.1.7")
        package = types.ModuleType("tunix")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["tunix"] = package
    return importlib.import_module(f"tunix.{name}")


def _batch(seed: int) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, T + 1), 0, VOCAB)  # [batch, T + 1] tokens


def _next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of `logits [B, T, V]` against `tokens[:, 1:]`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]).mean()


def _host(tree):
    return [np.array(leaf) for leaf in jax.tree.leaves(tree)]


def _assert_bit_identical(before, after, what: str) -> None:
    assert len(before) == len(after) > 0, what
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), f"{what}: leaf {i} changed"


def _assert_is_quantized(q: qj.QuantizedArray, original: jax.Array) -> None:
    """`q` is, leaf for leaf, `qj.quantize` of the original float kernel (codes, absmax, nested scales; blocks along
    the kernel's contracted axes)."""
    assert isinstance(q, qj.QuantizedArray) and q.fmt == "nf4" and q.shape == original.shape
    want = qj.quantize(original, QUANT.fmt, QUANT.block_size, QUANT.double_quant, contract_axes=q.contract_axes)
    _assert_bit_identical(_host(want), _host(q), "packed base vs qj.quantize of the original kernel")


def _assert_within_nf4_bound(original: jax.Array, q: qj.QuantizedArray) -> None:
    """The dequantized kernel is the original up to NF4 rounding (1% slack for the double-quantized absmax)."""
    err = np.abs(np.asarray(qj.dequantize(q, jnp.float32)) - np.asarray(original, np.float32))
    assert err.max() <= 1.01 * NF4_HALF_GAP * np.abs(np.asarray(original)).max()


# -- NNX: tunix Llama 3 ---------------------------------------------------------------------------------------


def _random_mlp(model: nnx.Module, seed: int) -> nnx.Module:
    """Draws the `nnx.Linear` kernels (zero-initialised: tunix loads checkpoints into them), as a pretrained model
    would have them."""
    key = jax.random.key(seed + 1)
    for i, (_, layer) in enumerate(nnx.iter_modules(model)):
        if type(layer) is nnx.Linear:
            shape = layer.kernel.get_value().shape
            layer.kernel.set_value(jax.random.normal(jax.random.fold_in(key, i), shape) / np.sqrt(shape[0]))
    return model


def _llama(llama, seed: int = 0) -> nnx.Module:
    """A tiny tunix Llama 3 with random weights."""
    config = llama.ModelConfig(num_layers=2, vocab_size=VOCAB, embed_dim=64, hidden_dim=128, num_heads=4,
                               head_dim=16, num_kv_heads=2, rope_theta=10_000, norm_eps=1e-5,
                               remat_config=llama.RematConfig.BLOCK)  # nnx.remat around attention and MLP
    return _random_mlp(llama.Llama3(config, rngs=nnx.Rngs(seed)), seed)


def _gemma(gemma, seed: int = 0) -> nnx.Module:
    """A tiny tunix Gemma (grouped-query attention: `q_einsum` and `kv_einsum`; global and sliding-window layers;
    the output head is the tied embedding)."""
    config = gemma.ModelConfig(num_layers=2, num_embed=VOCAB, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16,
                               num_kv_heads=2, final_logit_softcap=30.0, use_post_attn_norm=True,
                               use_post_ffw_norm=True, sliding_window_size=8,
                               attention_types=(gemma.AttentionType.GLOBAL, gemma.AttentionType.LOCAL_SLIDING),
                               remat_config=gemma.RematConfig.BLOCK)
    return _random_mlp(gemma.Gemma(config, rngs=nnx.Rngs(seed)), seed)


def _tunix_logits(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Logits `[B, T, V]` for `tokens[:, :-1]`, causal, no cache (the signature of tunix's Llama 3 and Gemma)."""
    inputs = tokens[:, :-1]
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))  # [B, T, S]
    logits, _ = model(inputs, positions, None, causal)
    return logits


def _check_tunix_model(model: nnx.Module, expected: list[str], float_left: dict[str, str]) -> None:
    """`apply_qlora` with "all-linear" on an unmodified tunix model: `expected` (sorted) are the replaced layers,
    `nnx.Linear`s and tunix's `Einsum` weights (`.../w`) alike, 100% of the model's projection weights;
    `float_left` the float parameters the report lists, with a word of their reason."""
    float_model = nnx.clone(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no multiplied weight left out
        model = qj.apply_qlora(model, quant=QUANT, lora=LORA, rngs=nnx.Rngs(1))

    report = qlora_report(model)
    assert sorted(report.paths) == expected and all(row.quantized for row in report.layers)
    assert {p.path: p.reason for p in report.float_params}.keys() == float_left.keys()
    for p in report.float_params:
        assert float_left[p.path] in p.reason, (p.path, p.reason)
    layers = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)
              if isinstance(m, (QLoRALinear, QLoRAProduct))}
    assert sorted(layers) == expected
    assert {type(m).__name__ for m in layers.values()} == {"QLoRALinear", "QLoRAProduct"}

    # (1) The quantized model with fresh adapters = the float model with the dequantized kernels.
    reference = nnx.clone(float_model)
    weights = {"/".join(map(str, p)): v for p, v in nnx.iter_graph(reference) if isinstance(v, nnx.Param)}
    originals = {}
    for path, layer in layers.items():
        weight = weights[path if path.endswith("/w") else f"{path}/kernel"]
        originals[path] = weight.get_value()
        q = layer.kernel.get_value()
        _assert_is_quantized(q, originals[path])
        _assert_within_nf4_bound(originals[path], q)
        weight.set_value(qj.dequantize(q, jnp.float32))
    tokens = _batch(0)
    logits = nnx.jit(_tunix_logits)  # (eagerly, each product under nnx.remat would compile on its own)
    got, want = logits(model, tokens), logits(reference, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

    # (2) Training moves the adapters and nothing else.
    base = _host([layer.kernel.get_value() for layer in layers.values()])
    frozen_floats = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # nnx.LoRAParam subclasses nnx.Param
    others = _host(nnx.state(model, frozen_floats))  # embedding, norms, the output head
    adapters = _host(nnx.state(model, nnx.LoRAParam))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
    moments = [leaf for leaf in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if leaf.ndim > 0]
    assert sum(leaf.size for leaf in moments) == 2 * sum(a.size for a in adapters)  # adapters only

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(model):
            return _next_token_loss(_tunix_logits(model, tokens), tokens)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, tokens)) for _ in range(STEPS)]
    final = float(_next_token_loss(logits(model, tokens), tokens))

    assert final < losses[0] - 0.1, losses + [final]
    _assert_bit_identical(base, _host([layer.kernel.get_value() for layer in layers.values()]), "packed base")
    for path, layer in layers.items():
        _assert_is_quantized(layer.kernel.get_value(), originals[path])
    _assert_bit_identical(others, _host(nnx.state(model, frozen_floats)), "float weights")
    moved = [not np.array_equal(a, b) for a, b in zip(adapters, _host(nnx.state(model, nnx.LoRAParam)), strict=True)]
    assert len(moved) == 2 * len(expected) and all(moved)  # every lora_a and lora_b


def test_tunix_llama3_nnx_apply_qlora_trains_the_adapters_only():
    llama = _import_tunix_module("models.llama3.model")
    expected = sorted([f"layers/{i}/mlp/{name}" for i in range(2) for name in ("down_proj", "gate_proj", "up_proj")]
                      + [f"layers/{i}/attn/{name}/w" for i in range(2) for name in
                         ("q_proj", "k_proj", "v_proj", "o_proj")])
    with _default_promotion():
        _check_tunix_model(_llama(llama), expected,
                           {"embedder/input_embedding": "embedding", "lm_head/w": "output head"})


def test_tunix_gemma_nnx_apply_qlora_trains_the_adapters_only():
    gemma = _import_tunix_module("models.gemma.model")
    expected = sorted([f"layers/{i}/mlp/{name}" for i in range(2) for name in ("down_proj", "gate_proj", "up_proj")]
                      + [f"layers/{i}/attn/{name}/w" for i in range(2) for name in
                         ("attn_vec_einsum", "kv_einsum", "q_einsum")])
    with _default_promotion():
        _check_tunix_model(_gemma(gemma), expected, {"embedder/input_embedding": "embedding"})


# -- Linen: recurrentgemma Griffin -----------------------------------------------------------------------------


def _griffin():
    _installed("recurrentgemma", "recurrentgemma==1.0.1")
    from recurrentgemma import common
    from recurrentgemma.jax import griffin

    blocks = (common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION)
    config = common.GriffinConfig(vocab_size=VOCAB, width=64, mlp_expanded_width=128, num_heads=4,
                                  block_types=blocks, embeddings_scale_by_sqrt_dim=True, attention_window_size=T,
                                  logits_soft_cap=30.0, lru_width=64, scan_type=common.ScanType.LINEAR_NATIVE)
    return griffin.Griffin(config)  # gradient_checkpointing=True by default: nn.remat around each block


def test_recurrentgemma_griffin_linen_interceptor_trains_the_adapters_only():
    import flax.linen as nn

    from qlora_jax.linen import FROZEN, convert_params, dense_layers, masked, product_params, qlora_interceptor

    model = _griffin()
    tokens = _batch(0)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))

    def logits(variables, interceptor=None):
        with contextlib.ExitStack() as stack:
            if interceptor is not None:
                stack.enter_context(nn.intercept_methods(interceptor))
            out, _ = model.apply(variables, tokens[:, :-1], positions, return_cache=False)
        return out

    with _default_promotion():
        float_params = jax.jit(model.init)(jax.random.key(0), tokens[:, :-1], positions)["params"]
        layers = dense_layers(model, tokens[:, :-1], positions)
        products = product_params(model, tokens[:, :-1], positions)
        variables, report = convert_params(float_params, quant=QUANT, lora=LORA, rng=jax.random.key(1), layers=layers,
                                           products=products)
        expected = ["blocks.0/recurrent_block/linear_y", "blocks.0/recurrent_block/linear_x",
                    "blocks.0/recurrent_block/linear_out", "blocks.0/mlp_block/ffw_down",
                    "blocks.1/attention_block/proj_q", "blocks.1/attention_block/proj_k",
                    "blocks.1/attention_block/proj_v", "blocks.1/attention_block/proj_final",
                    "blocks.1/mlp_block/ffw_down", "blocks.0/recurrent_block/rg_lru/input_gate/w",
                    "blocks.0/recurrent_block/rg_lru/a_gate/w", "blocks.0/mlp_block/ffw_up/w",
                    "blocks.1/mlp_block/ffw_up/w"]
        # every nn.Dense (no head: Griffin decodes with its embedding), then the weights multiplied in its own modules
        assert list(report.paths) == expected
        params, frozen = variables["params"], variables[FROZEN]
        interceptor = qlora_interceptor(quant=QUANT, lora=LORA, deterministic=True)

        # (1) The quantized model with fresh adapters = the float model with the dequantized kernels.
        kernels = {}
        for path in expected:
            q = _kernel(frozen, path)
            _assert_is_quantized(q, _kernel(float_params, path))
            _assert_within_nf4_bound(_kernel(float_params, path), q)
            kernels[path] = qj.dequantize(q, jnp.float32)
        reference = _with_kernels(float_params, kernels)
        got = jax.jit(lambda p, f: logits({"params": p, FROZEN: f}, interceptor))(params, frozen)
        want = jax.jit(lambda p: logits({"params": p}))(reference)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

        # (2) Training moves the adapters and nothing else.
        tx = masked(optax.adamw(1e-2), params)  # optimizer state for the adapters only
        opt_state = tx.init(params)
        moments = [leaf for leaf in jax.tree.leaves(opt_state) if leaf.ndim > 0]
        n_adapter = sum(v.size for path in expected for k, v in _lookup(params, path).items() if k.startswith("lora"))
        assert sum(leaf.size for leaf in moments) == 2 * n_adapter

        def loss_fn(params):
            return _next_token_loss(logits({"params": params, FROZEN: frozen}, interceptor), tokens)

        @jax.jit
        def step(params, opt_state):
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        base = _host(frozen)
        trained = params
        losses = []
        for _ in range(STEPS):
            trained, opt_state, loss = step(trained, opt_state)
            losses.append(float(loss))
        final = float(jax.jit(loss_fn)(trained))

    assert final < losses[0] - 0.1, losses + [final]
    # Linen keeps the packed base out of the optimizer's reach by construction (a collection of its own, not an
    # argument of tx): what is checked is that it is still the quantization of the original kernels.
    _assert_bit_identical(base, _host(frozen), "packed base")
    for path in expected:
        _assert_is_quantized(_kernel(frozen, path), _kernel(float_params, path))
    for path, before in _flat(params).items():
        after = np.asarray(_flat(trained)[path])
        if path.rsplit("/", 1)[-1] in ("lora_a", "lora_b"):
            assert not np.array_equal(np.asarray(before), after), f"{path} did not move"
        else:
            assert np.array_equal(np.asarray(before), after), f"{path} changed"
    assert sum(p.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for p in _flat(params)) == 2 * len(expected)


def _lookup(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _split(path: str) -> tuple[str, str]:
    """`(module path, weight name)` of a converted layer: a Dense layer's "kernel", or a multiplied param (".../w")."""
    return tuple(path.rsplit("/", 1)) if path.endswith("/w") else (path, "kernel")


def _kernel(tree, path: str):
    module, name = _split(path)
    return _lookup(tree, module)[name]


def _flat(tree, prefix: str = "") -> dict[str, jax.Array]:
    """`{"a/b/kernel": leaf}` of a nested dict."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, name + "/") if isinstance(value, Mapping) else {name: value})
    return out


def _with_kernels(tree, kernels: dict[str, jax.Array]):
    """A copy of the nested dict `tree` with `kernels[path]` as the "kernel" of each layer path."""
    out = {k: _with_kernels(v, {}) if isinstance(v, Mapping) else v for k, v in tree.items()}
    for path, kernel in kernels.items():
        module, name = _split(path)
        _lookup(out, module)[name] = kernel
    return out

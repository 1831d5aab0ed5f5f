"""Names that the docstring examples of `qlora_jax` use without defining them: a temporary directory, a tiny
Llama checkpoint, a model loaded from it and a PEFT adapter saved for it.

A doctest gets one of these names (through pytest's `doctest_namespace`) only where its examples read the
name and never assign it, so no other doctest builds the tiny model. The file is at the repository root
because `tests/conftest.py` does not apply to the doctests collected from `qlora_jax/`. It does not start
JAX (the fixtures run with the tests).

* `tmp`: an empty temporary directory (`pathlib.Path`), one per doctest.
* `checkpoint`: a tiny Llama-family Hugging Face checkpoint directory (`config.json`, `model.safetensors`
  and the demo's character tokenizer), written once a session by the library itself (`save_merged`).
* `model`: that checkpoint loaded in NF4 with rank-4 LoRA adapters (`from_pretrained(checkpoint,
  quant=QuantConfig(), lora=LoraConfig(rank=4, alpha=8))`), fresh for each doctest.
* `adapter_dir`: a PEFT adapter directory saved for that model, with non-zero factors (so loading it
  changes the model's outputs).
"""

from __future__ import annotations

import ast
import builtins
import os

import jax
import pytest
from _pytest.doctest import DoctestItem

# Strict JAX settings for every test and doctest (tests/conftest.py has the tests' fixtures).
# Most of the suite's time is XLA compiling small programs (backend compiles are ~60% of the tests' own CPU
# time, measured with jax.monitoring's compile-duration events). Tests build the CPU code the cheap way:
# * without LLVM's optimizations (as `benchmarks/memory.py --fast-compile` does): ~1.5x faster compiles;
# * with XLA:CPU's classic loop emitters instead of its MLIR fusion emitters: a tiny Llama train step's first
#   call 8.9 -> 5.0 s of CPU (Intel Xeon, one run side by side), later steps ~20% slower on these small arrays.
# XLA's own HLO passes (fusion, layout, buffer assignment: what the memory tests inspect) run as before. Set
# here, before XLA starts, so that every test process and the subprocesses the tests start (which inherit
# os.environ) use it; an XLA_FLAGS that sets one of these itself wins for that one.
_FLAGS = {"--xla_backend_optimization_level": "0", "--xla_llvm_disable_expensive_passes": "true",
          "--xla_cpu_use_fusion_emitters": "false"}
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_given] + [f"{k}={v}" for k, v in _FLAGS.items() if k not in _given]).strip()

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

_NAMES = ("tmp", "checkpoint", "model", "adapter_dir")
# Docstring examples that take more than a few seconds, marked `slow` like such tests (`-m "not slow"` skips them).
_SLOW_DOCTESTS = frozenset({"qlora_jax.app.demo.run_formats"})
_LORA = {"rank": 4, "alpha": 8.0}


def _free_names(test) -> set[str]:
    """Names the doctest's examples read but never assign, and that are not module globals or builtins."""
    loaded, stored = set(), set()
    for example in test.examples:
        try:
            tree = ast.parse(example.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (loaded if isinstance(node.ctx, ast.Load) else stored).add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                stored.update((a.asname or a.name).split(".")[0] for a in node.names)
    return loaded - stored - set(test.globs) - set(dir(builtins))


def pytest_collection_modifyitems(items):
    for item in items:
        if isinstance(item, DoctestItem) and item.name in _SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _doctest_names(request):
    """Puts the names of `_NAMES` that a doctest needs into its namespace (nothing for other tests)."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    needed = sorted(_free_names(request.node.dtest) & set(_NAMES))
    namespace = request.getfixturevalue("doctest_namespace")
    for name in needed:
        namespace[name] = request.getfixturevalue(f"doctest_{name}")
    yield
    for name in needed:
        namespace.pop(name, None)


@pytest.fixture
def doctest_tmp(tmp_path):
    return tmp_path


@pytest.fixture(scope="session")
def doctest_checkpoint(tmp_path_factory):
    import numpy as np
    from flax import nnx

    from qlora_jax.app.demo import char_tokenizer
    from qlora_jax.models import CausalLM, ModelConfig, save_merged

    config = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                         num_kv_heads=1)
    # Random weights drawn with NumPy into the abstract model's shapes (an eager `CausalLM(config, rngs=...)`
    # compiles every initializer: seconds).
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), state)
    path = save_merged(nnx.merge(graphdef, state), tmp_path_factory.mktemp("doctest") / "tiny-llama")
    char_tokenizer().save_pretrained(path)
    return path


def _tiny_model(checkpoint, seed: int = 0):
    from flax import nnx

    import qlora_jax as qj

    return qj.models.from_pretrained(checkpoint, quant=qj.QuantConfig(), lora=qj.LoraConfig(**_LORA),
                                     rngs=nnx.Rngs(seed))


@pytest.fixture
def doctest_model(doctest_checkpoint):
    return _tiny_model(doctest_checkpoint)


@pytest.fixture(scope="session")
def doctest_adapter_dir(doctest_checkpoint, tmp_path_factory):
    import jax.numpy as jnp
    import numpy as np

    from qlora_jax.models import adapter_layers, save_peft_adapter

    model = _tiny_model(doctest_checkpoint, seed=1)
    rng = np.random.default_rng(1)
    for layer in {id(layer): layer for layer in adapter_layers(model).values()}.values():
        b = layer.lora_b[...]  # LoRA's B starts at zero; a trained adapter's is not
        layer.lora_b[...] = jnp.asarray(0.05 * rng.standard_normal(b.shape), b.dtype)
    return save_peft_adapter(model, tmp_path_factory.mktemp("doctest") / "adapter",
                             base_model_name_or_path=str(doctest_checkpoint))

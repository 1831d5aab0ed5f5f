"""The public surface: every name in `__all__` imports and is documented."""

import importlib
import inspect

import pytest

import qlora_jax

PUBLIC_MODULES = ["qlora_jax", "qlora_jax.nnx", "qlora_jax.linen", "qlora_jax.models", "qlora_jax.checkpoint",
                  "qlora_jax.data", "qlora_jax.train"]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_imports_and_has_a_docstring_with_an_example(module_name):
    module = importlib.import_module(module_name)
    assert module.__all__, module_name
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            doc = inspect.getdoc(obj) or ""
            assert "Example" in doc, f"{module_name}.{name} has no example in its docstring"


def test_version():
    assert qlora_jax.__version__


def test_import_is_lazy_about_checkpointing_models_and_training():
    """`import qlora_jax` (in a fresh process) imports neither Orbax nor the models, training, data or Linen
    packages; `qj.train`, `qj.lora_mask` and `qj.checkpoint` import theirs on first use."""
    import subprocess
    import sys

    code = (
        "import sys, qlora_jax as qj\n"
        "heavy = ['orbax.checkpoint', 'qlora_jax.train', 'qlora_jax.models', 'qlora_jax.data',\n"
        "         'qlora_jax._src.linen']\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "qj.train.Trainer, qj.lora_mask, qj.checkpoint.save\n"
        "needed = ['orbax.checkpoint', 'qlora_jax.train', 'qlora_jax._src.linen']\n"
        "print([m for m in needed if m not in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "[]"], out

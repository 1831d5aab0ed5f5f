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

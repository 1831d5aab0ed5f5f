"""Strict JAX settings for every test, and fake CPU devices for those that ask.

Eight CPU devices exist in every test process (`jax_num_cpu_devices`); tests
that need a mesh take them with the `cpu_devices` fixture.
"""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def cpu_devices():
    """Eight fake CPU devices (XLA host platform)."""
    devices = jax.devices("cpu")
    assert len(devices) == 8, "jax was initialised before conftest could request 8 CPU devices"
    return devices

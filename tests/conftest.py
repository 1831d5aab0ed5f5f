"""Strict JAX settings for every test, fake CPU devices for those that ask, and references that tests
in several files compare with (computed once a session).

Eight CPU devices exist in every test process (`jax_num_cpu_devices`); tests
that need a mesh take them with the `cpu_devices` fixture.
"""

import os

import jax
import pytest

# Most of the suite's time is XLA compiling small programs (two thirds of a run, measured with
# jax_log_compiles), and most of compiling is LLVM optimizing the generated CPU code. Tests build that code
# without LLVM's optimizations (as `benchmarks/memory.py --fast-compile` does): it compiles about 1.5x faster and
# runs the tests' small arrays about as fast. XLA's own HLO passes (fusion, layout, buffer assignment: what the
# memory tests inspect) run as before. Set here, before XLA starts, so that every test process and the
# subprocesses the tests start (which inherit os.environ) use it; an XLA_FLAGS that sets the level itself wins.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                        "--xla_llvm_disable_expensive_passes=true"]).strip()

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def cpu_devices():
    """Eight fake CPU devices (XLA host platform)."""
    devices = jax.devices("cpu")
    assert len(devices) == 8, "jax was initialised before conftest could request 8 CPU devices"
    return devices


@pytest.fixture(scope="session")
def single_device():
    """tests/test_sharding.py's model and batch on one device (`single_device_reference` there): the reference of
    the sharded steps in that file and of the two-process step in tests/test_distributed.py."""
    from test_sharding import single_device_reference

    return single_device_reference()

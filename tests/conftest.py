"""Fake CPU devices for the tests that ask, and references that tests in several files compare with
(computed once a session).

Eight CPU devices exist in every test process (`jax_num_cpu_devices`, set in the root conftest.py); tests
that need a mesh take them with the `cpu_devices` fixture.
"""


import jax
import pytest

# XLA's compile options, eight CPU devices and strict promotion are set by the repository's root conftest.py
# (for these tests and the doctests alike).


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

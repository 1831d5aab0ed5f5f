"""`from_pretrained` leaves the process as it found it: glibc's malloc settings untouched (DESIGN: a library call
never changes process-wide settings), checked in a fresh process."""

import json
import subprocess
import sys

import pytest
from test_models import make_checkpoint

# Every `mallopt`/`malloc_trim` looked up through ctypes (before qlora_jax is imported) is recorded. The user sets
# a fixed mmap threshold of 256 KiB; after loading, a 4 MiB allocation must still be mapped (glibc's mallinfo2
# counts it in `hblkhd`), which a loader that set its own thresholds would have changed.
_SCRIPT = r"""
import ctypes, json, sys

calls = []
_lookup = ctypes.CDLL.__getitem__


def recording_lookup(self, name):
    function = _lookup(self, name)
    if name in ("mallopt", "malloc_trim"):
        def recorded(*args):
            calls.append([name, *args])
            return function(*args)
        return recorded
    return function


ctypes.CDLL.__getitem__ = recording_lookup


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL("libc.so.6")
mallinfo2, malloc, free = _lookup(libc, "mallinfo2"), _lookup(libc, "malloc"), _lookup(libc, "free")
mallinfo2.restype, malloc.restype, malloc.argtypes = Mallinfo2, ctypes.c_void_p, [ctypes.c_size_t]
free.argtypes = [ctypes.c_void_p]
assert _lookup(libc, "mallopt")(-3, 256 << 10) == 1  # M_MMAP_THRESHOLD: the user's setting


def mapped_growth(nbytes=4 << 20):
    before = mallinfo2().hblkhd
    pointer = malloc(nbytes)
    grown = mallinfo2().hblkhd - before
    free(pointer)
    return grown


import qlora_jax as qj

before = mapped_growth()
model = qj.models.from_pretrained(sys.argv[1], quant=qj.QuantConfig(double_quant=True))
print(json.dumps({"calls": calls, "mapped_before": before, "mapped_after": mapped_growth()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_from_pretrained_leaves_mallopt_settings_alone(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama-gqa-untied", intermediate_size=640)
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["calls"] == [], result  # no mallopt / malloc_trim through ctypes
    assert result["mapped_before"] >= 4 << 20, result  # the user's 256 KiB threshold holds before ...
    assert result["mapped_after"] >= 4 << 20, result  # ... and after loading

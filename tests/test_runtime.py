"""`qlora_jax.app.configure_cpu`: CPU steps reuse their temporary buffer instead of faulting in fresh pages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# One fresh process per mode: the dispatch mode is fixed when JAX creates its CPU client.
_SCRIPT = r"""
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
import qlora_jax as qj
import qlora_jax.app

runtime = None if sys.argv[1] == "default" else qlora_jax.app.configure_cpu()

def step(x):  # [2048, 4096] -> a transposed copy and its running sum: 64 MiB of temporaries
    return jnp.cumsum((x * 2).T, axis=0)[-1].sum()

compiled = jax.jit(step).lower(jax.ShapeDtypeStruct((2048, 4096), jnp.float32)).compile()
x = jnp.ones((2048, 4096), jnp.float32)

def faults(steps=7):
    out = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(compiled(x))
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out

jax.block_until_ready(compiled(x))
result = {"temp_pages": compiled.memory_analysis().temp_size_in_bytes // 4096, "faults": faults(),
          "runtime": None if runtime is None else [runtime.synchronous, runtime.keep_freed_memory]}
print(json.dumps(result))
"""


def _run(*modes: str) -> list[dict]:
    """The script in one fresh process per mode, run side by side (page faults are counted per process)."""
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for mode in modes]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def _transparent_huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and ru_minflt page counts")
def test_configure_cpu_steps_reuse_their_pages():
    default, configured = _run("default", "configure")
    pages = default["temp_pages"]
    assert pages >= 16384, default  # 64 MiB of temporaries: mapped afresh by glibc's defaults
    if not _transparent_huge_pages_always():  # with 2 MiB pages the default faults 512 times fewer
        assert min(default["faults"]) > pages // 2, default  # every step faults its temporaries in again
    assert configured["runtime"] == [True, True]
    # Reused from the steps before: of 7 steps, glibc's defaults fault in all 7 temporaries, the kept heap at
    # most two (now and then one step still faults its temporaries in afresh: about 1 in 15 on an idle
    # machine here, more under load).
    assert sum(configured["faults"]) < 3 * pages, configured


def test_configure_cpu_after_jax_started_names_the_fix():
    # A fresh process: the CLI may have configured this test process's JAX already.
    script = """
import jax.numpy as jnp, qlora_jax as qj, qlora_jax.app
jnp.zeros(1).block_until_ready()  # the backends exist now, with asynchronous dispatch
try:
    qlora_jax.app.configure_cpu(keep_freed_memory=False)
except RuntimeError as e:
    print("raised:", e)
print(qlora_jax.app.configure_cpu(synchronous=False, keep_freed_memory=False))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "raised: configure_cpu(synchronous=True)" in out.stdout and "before any JAX computation" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "CpuRuntime(synchronous=False, keep_freed_memory=False)"

"""CPU runtime settings for training steps: dispatch on the calling thread, freed memory kept.

XLA's CPU client allocates each execution's temporary buffer (for a training
step: the activations kept for the backward pass) when the execution starts
and frees it when it ends. With JAX's default asynchronous dispatch the
allocation runs on a worker thread, whose glibc arena serves any request over
64 MiB from a fresh `mmap`; the next step maps it again and faults in every
page. `configure_cpu` runs executions on the calling thread
(`jax_cpu_enable_async_dispatch=False`), where the allocation comes from
glibc's main arena, and tells glibc to serve large requests from the heap and
not to hand freed heap back to the OS (`mallopt`), so a step after the first
mostly reuses the pages of the ones before (now and then one still faults its
temporaries in afresh). What this saves is measured by
`benchmarks/train_step.py` (page faults and step times, with and without
`--default-runtime`); the numbers are in `benchmarks/README.md`.

Both settings are process-wide: other libraries in the process (PyTorch)
allocate the same way while they hold. They are the application's choice
(the `qlora-jax` command opts in); no library function calls `mallopt` or
changes JAX's flags.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import os
import pkgutil

import jax
import jax.numpy as jnp

__all__ = ["CpuRuntime", "configure_cpu"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX
_ASYNC_FLAG = "jax_cpu_enable_async_dispatch"

_keeping_freed_memory = False  # set by `configure_cpu` when glibc took the settings
_LIBC: ctypes.CDLL | None | bool = False  # `_libc()`: False until first looked up


@dataclasses.dataclass(frozen=True, kw_only=True)
class CpuRuntime:
    """What `configure_cpu` set.

    Attributes:
        synchronous: JAX runs CPU executions on the calling thread.
        keep_freed_memory: glibc serves large requests from the heap and keeps freed heap
            (False where the C library is not glibc or `GLIBC_TUNABLES` sets malloc parameters).

    Example:
        >>> from qlora_jax.app import CpuRuntime
        >>> CpuRuntime(synchronous=True, keep_freed_memory=False).synchronous
        True
    """

    synchronous: bool  # jax_cpu_enable_async_dispatch is False
    keep_freed_memory: bool  # glibc M_MMAP_MAX = 0 and M_TRIM_THRESHOLD = -1 (never trim)


def configure_cpu(*, synchronous: bool = True, keep_freed_memory: bool = True) -> CpuRuntime:
    """Sets up the process so that CPU training steps reuse their memory from step to step.

    Call it before the first JAX computation (JAX creates its CPU client then,
    with the dispatch mode it has at that moment); the `qlora-jax demo` and
    `finetune` commands call it when JAX runs on the CPU only. Both settings
    are process-wide (see the module docstring); on GPU and TPU they do not
    matter and are best left alone.

    Args:
        synchronous: Run CPU executions on the calling thread
            (`jax.config.update("jax_cpu_enable_async_dispatch", False)`). A
            jitted call then returns once its results are computed.
        keep_freed_memory: On glibc, serve large allocations from the heap
            (`mallopt(M_MMAP_MAX, 0)`) and never trim it (`mallopt(M_TRIM_THRESHOLD, -1)`),
            so freed step buffers stay mapped for the next step; the process
            keeps its peak heap. Left alone where `GLIBC_TUNABLES` sets malloc
            parameters, and a no-op on other C libraries.

    Returns:
        What was set: `CpuRuntime(synchronous=..., keep_freed_memory=...)`.

    Raises:
        RuntimeError: `synchronous=True` after JAX's backends were created with asynchronous dispatch.

    Example:
        The settings are the process's, so the examples run in fresh Python
        processes on the CPU (`python` prints what one prints). First thing
        in a program:

        >>> import os, subprocess, sys
        >>> def python(code):
        ...     env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        ...     return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
        ...                           check=True).stdout.strip()
        >>> print(python("import qlora_jax.app; print(qlora_jax.app.configure_cpu())"))
        CpuRuntime(synchronous=True, keep_freed_memory=True)

        After JAX has computed, synchronous dispatch is refused and the
        process is left as it was; `synchronous=False` still keeps freed
        memory:

        >>> print(python('''
        ... import jax.numpy as jnp, qlora_jax.app
        ... jnp.zeros(1).block_until_ready()  # JAX's first computation creates its CPU client
        ... try:
        ...     qlora_jax.app.configure_cpu()
        ... except RuntimeError as e:
        ...     print(f"RuntimeError: {e}")
        ... print(qlora_jax.app.configure_cpu(synchronous=False))
        ... '''))  # doctest: +ELLIPSIS
        RuntimeError: configure_cpu(synchronous=True): JAX's backends already exist ... or pass synchronous=False
        CpuRuntime(synchronous=False, keep_freed_memory=True)
    """
    global _keeping_freed_memory
    if synchronous and jax.config.values[_ASYNC_FLAG]:
        jax.config.update(_ASYNC_FLAG, False)
        if not _dispatch_is_synchronous():  # the client existed already, created with asynchronous dispatch
            jax.config.update(_ASYNC_FLAG, True)
            raise RuntimeError(
                "configure_cpu(synchronous=True): JAX's backends already exist (created by the first JAX "
                f"computation) with {_ASYNC_FLAG}=True, which a running client does not change; call "
                "qlora_jax.app.configure_cpu() before any JAX computation, or pass synchronous=False")
    kept = False
    if keep_freed_memory and (libc := _glibc()) is not None:
        kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
        _keeping_freed_memory = kept
    return CpuRuntime(synchronous=not jax.config.values[_ASYNC_FLAG], keep_freed_memory=kept)


def configure_cpu_for_command() -> CpuRuntime | None:
    """`configure_cpu()` for a command line run: only where JAX will compute on the CPU and has not started yet.

    JAX runs on the CPU when `jax_platforms` (`JAX_PLATFORMS`) names only
    "cpu", or when it is unset and no GPU/TPU plugin is installed
    (`jax_plugins.*`, `libtpu`). Where it calls `configure_cpu`, the CPU
    backend is created (it checks the dispatch mode by running a small
    computation).

    Returns:
        What `configure_cpu` set, or None where it was not called.

    Example:
        The settings are the process's, so the examples run in fresh Python
        processes on the CPU (`python` prints what one prints):

        >>> import os, subprocess, sys
        >>> def python(code):
        ...     env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        ...     return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
        ...                           check=True).stdout.strip()
        >>> call = "from qlora_jax.app.runtime import configure_cpu_for_command; print(configure_cpu_for_command())"
        >>> print(python(call))  # JAX not started yet
        CpuRuntime(synchronous=True, keep_freed_memory=True)
        >>> print(python("import jax.numpy as jnp; jnp.zeros(1).block_until_ready(); " + call))  # JAX has computed
        None

        With `JAX_PLATFORMS=cuda` (or a GPU/TPU plugin installed) it returns
        None too, without starting JAX.
    """
    platforms = {p.strip() for p in (jax.config.values.get("jax_platforms") or "").split(",") if p.strip()}
    if platforms:
        cpu_only = platforms == {"cpu"}
    else:
        try:
            import jax_plugins

            plugins = list(pkgutil.iter_modules(jax_plugins.__path__))
        except ImportError:
            plugins = []
        cpu_only = not plugins and importlib.util.find_spec("libtpu") is None
    if not cpu_only:
        return None
    try:
        return configure_cpu()
    except RuntimeError:  # JAX computed already, with asynchronous dispatch
        return None


def _dispatch_is_synchronous() -> bool:
    """Whether jitted CPU calls return only once computed: a call of some milliseconds is checked for readiness
    right after it returns (JAX has no public query of whether its backends exist; this creates them, with the
    dispatch mode the flag has now, where they did not)."""
    def work(x):
        return jax.lax.fori_loop(0, 16, lambda _, y: jnp.tanh(y @ y), x)

    y = jax.jit(work)(jnp.full((384, 384), 0.01, jnp.float32))
    ready = y.is_ready()
    y.block_until_ready()
    return ready


def _glibc() -> ctypes.CDLL | None:
    """glibc, unless malloc parameters come from `GLIBC_TUNABLES` (the user's choice) or the C library is another."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    return _libc()


def _libc() -> ctypes.CDLL | None:
    """glibc (loaded once), or None where the C library is another."""
    global _LIBC
    if _LIBC is False:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        except (OSError, AttributeError):
            _LIBC = None
    return _LIBC

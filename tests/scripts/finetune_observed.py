"""Runs `qlora-jax finetune` unmodified, for tests/test_interrupts.py, with two observers and nothing else.

- `faulthandler` writes every thread's Python stack to stderr when the process
  receives SIGUSR1, at the moment the signal arrives, even while the main
  thread waits inside a compiled XLA computation (it runs in the C signal
  handler, not between Python bytecodes). The tests read it to know where the
  run was when they interrupted it.
- JAX's persistent compilation cache in `QLORA_TEST_JAX_CACHE`, shared by the
  test's runs, so that each run after the first compiles nothing.

Usage: python finetune_observed.py finetune --model ... (the command line's arguments).
"""

import faulthandler
import os
import signal
import sys


def run(argv: list[str]) -> int:
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)

    import jax

    # The test process's settings (the root conftest.py): the same compiled programs, so the same bits.
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    if os.environ.get("QLORA_TEST_JAX_CACHE"):
        jax.config.update("jax_compilation_cache_dir", os.environ["QLORA_TEST_JAX_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    from qlora_jax.app.cli import main

    return main(argv)


if __name__ == "__main__":  # (pytest imports this file to look for doctests: nothing runs then)
    sys.exit(run(sys.argv[1:]))

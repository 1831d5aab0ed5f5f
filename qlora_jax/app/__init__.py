"""The application on top of the library: the `qlora-jax` command, its finetune run, the demo, plots, CPU tuning.

The library (`qlora_jax`, `qlora_jax._src`) never imports this package. What is
here changes the process or talks to a person: `configure_cpu` sets JAX's
dispatch mode and glibc's malloc thresholds (opt-in, for a training process),
the commands install signal handlers and draw progress bars.

Example:
    >>> from qlora_jax.app import CpuRuntime
    >>> CpuRuntime(synchronous=True, keep_freed_memory=False)
    CpuRuntime(synchronous=True, keep_freed_memory=False)
"""

from qlora_jax.app.plot import plot_curves
from qlora_jax.app.runtime import CpuRuntime, configure_cpu

__all__ = ["CpuRuntime", "configure_cpu", "plot_curves"]

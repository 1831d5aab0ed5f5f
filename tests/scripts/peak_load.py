"""Loads a checkpoint with NF4 in a fresh process and prints its memory as JSON.

The baseline is the RSS once the runtime is warm: libraries imported and the
loader's programs compiled, by loading (and dropping) a checkpoint of the same
shapes first (the test passes the same checkpoint). The peak is VmHWM while loading the real
checkpoint, reset just before via /proc/self/clear_refs."""

import gc
import json
import sys


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(path: str, warm_path: str) -> None:
    import jax
    import jax.numpy as jnp
    import transformers

    import qlora_jax as qj

    transformers.AutoConfig.for_model("llama")  # library imports (transformers pulls in torch) are baseline

    jax.block_until_ready(jax.jit(lambda x: x @ x)(jnp.ones((64, 64))))  # runtime up
    warm = qj.models.from_pretrained(warm_path, quant=qj.QuantConfig(fmt="nf4", double_quant=True))
    del warm
    gc.collect()
    baseline = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    model = qj.models.from_pretrained(path, quant=qj.QuantConfig(fmt="nf4", double_quant=True))
    peak = status("VmHWM")
    from flax import nnx

    state = jax.tree.leaves(nnx.state(model))
    final = sum(x.nbytes for x in state)
    print(json.dumps({"baseline": baseline, "peak": peak, "final_bytes": final}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

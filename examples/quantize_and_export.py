"""Quantize a Flax kernel to NF4 with double quantization and save it the way a
Hugging Face + bitsandbytes checkpoint stores a 4-bit linear layer.

Run: python examples/quantize_and_export.py [OUT_DIR]
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

import qlora_jax as qj


def main(out_dir: Path) -> None:
    kernel = jax.random.normal(jax.random.key(0), (1024, 512), jnp.bfloat16) * 0.02  # [in, out]
    q = qj.quantize(kernel, "nf4", block_size=64, double_quant=True)
    print(q, f"{q.nbytes / kernel.size:.4f} bytes/param")

    # HF keys: "<layer>.weight" for the packed codes, "<layer>.weight.<entry>" for the rest.
    layer = "model.layers.0.mlp.up_proj"
    entries = qj.to_bnb(q)
    tensors = {f"{layer}.weight" if k == "weight" else f"{layer}.weight.{k}": v for k, v in entries.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))

    loaded = load_file(str(out_dir / "model.safetensors"))
    prefix = f"{layer}.weight"
    state = {k[len(prefix) + 1:] if k != prefix else "weight": v for k, v in loaded.items() if k.startswith(prefix)}
    back = qj.from_bnb(state)
    assert np.array_equal(np.asarray(qj.dequantize(back)), np.asarray(qj.dequantize(q)))
    print(f"saved {len(tensors)} tensors to {out_dir / 'model.safetensors'}; reloaded bit-exact")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("example_out"))

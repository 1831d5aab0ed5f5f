"""Memory of a fine-tuning step: the QLoRA paper's accounting next to the compiled step.

For full fine-tuning, 16-bit LoRA and QLoRA, the model and its optimizer are
built abstractly (`nnx.eval_shape`: nothing allocated), the train step that
`Trainer` runs (`bound_train_step`: forward, backward with respect to the
trainable variables, `make_optimizer`'s clipped AdamW update, state donated)
is compiled for abstract inputs, and `compiled.memory_analysis()` says what
it needs. So a 7B or 70B configuration is reported on any machine.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax._src.config import LoraConfig, QuantConfig
from qlora_jax._src.models.config import ModelConfig
from qlora_jax._src.models.llama import CausalLM
from qlora_jax._src.nn.variables import FrozenWeight, QuantizedWeight
from qlora_jax._src.surgery.apply import apply_qlora
from qlora_jax._src.train.config import TrainConfig
from qlora_jax._src.train.optim import make_optimizer
from qlora_jax._src.train.step import bound_train_step

__all__ = ["METHODS", "MethodMemory", "step_memory"]

# The methods `step_memory` measures: every weight trained, adapters over a 16-bit base, over a packed base.
METHODS = ("full", "lora", "qlora")


@dataclasses.dataclass(frozen=True)
class MethodMemory:
    """Bytes of one fine-tuning method's step.

    Attributes:
        method: "full" (every weight trained), "lora" (16-bit frozen base +
            float32 adapters) or "qlora" (packed base + float32 adapters).
        linear_params: Parameters of the decoder's linear layers (N).
        linear_bytes: Bytes they are stored in.
        other_params: Embeddings, output head and norms.
        other_bytes: Bytes of those (16-bit, as the paper keeps them).
        trainable_params: Trained parameters (M for LoRA, everything for full).
        trainable_bytes: Bytes of the trained variables.
        gradient_bytes: Bytes of their gradients (same dtype).
        optimizer_bytes: AdamW state bytes.
        formula_bytes: The paper-style estimate: full 16-bit with AdamW
            `(2 + 2 + 4) N'` (16-bit weights, gradients, moments), LoRA
            `2N + 16M`, QLoRA `0.5N + 16M` (+ the 16-bit embeddings and head).
        argument_bytes: Compiled step: inputs (model, optimizer state, batch).
        output_bytes: Compiled step: outputs.
        alias_bytes: Compiled step: outputs written in place of donated inputs.
        temp_bytes: Compiled step: temporaries (activations, dequantized tiles, ...).
    """

    method: str
    linear_params: int
    linear_bytes: int
    other_params: int
    other_bytes: int
    trainable_params: int
    trainable_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    formula_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

    @property
    def compiled_total(self) -> int:
        """Peak the compiled step needs: arguments + temporaries + outputs not aliased."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def linear_bytes_per_param(self) -> float:
        """Bytes per parameter of the linear layers' base weights."""
        return self.linear_bytes / self.linear_params


def _abstract_model(config: ModelConfig, method: str, quant: QuantConfig, lora: LoraConfig, dtype, remat: bool,
                    remat_group: int = 1) -> tuple[nnx.Module, nnx.Optimizer]:
    """The model of `method` and its `Trainer` optimizer, built abstractly (ShapeDtypeStruct values)."""
    wrt = nnx.Param if method == "full" else nnx.LoRAParam
    tx = make_optimizer(TrainConfig(total_steps=1, warmup_ratio=0.0))  # Trainer's AdamW, default clipping

    def build():
        model = CausalLM(config, dtype=dtype, param_dtype=dtype, remat=remat, remat_group=remat_group,
                         rngs=nnx.Rngs(0))
        if method != "full":
            model = apply_qlora(model, quant=quant if method == "qlora" else None, lora=lora, rngs=nnx.Rngs(1))
        return model, nnx.Optimizer(model, tx, wrt=wrt)

    return nnx.eval_shape(build)


def _nbytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _nparams(tree: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def step_memory(
    config: ModelConfig,
    method: str,
    *,
    rank: int = 16,
    alpha: float = 32.0,
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: jnp.dtype = jnp.bfloat16,
    quant: QuantConfig | None = None,
    remat: bool = True,
    loss_chunk: int | None = None,
    remat_group: int = 1,
) -> MethodMemory:
    """Compiles `Trainer`'s train step of `method` for abstract shapes and measures it.

    The step is `bound_train_step`, the one `Trainer.train_step` runs, with
    `make_optimizer`'s AdamW (`TrainConfig` defaults) over the trainable
    variables (`nnx.Param` for "full", `nnx.LoRAParam` otherwise).

    Args:
        config: The architecture.
        method: "full", "lora" or "qlora".
        rank: LoRA rank (all linear layers but the head get adapters).
        alpha: LoRA alpha.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        dtype: Dtype of the base weights and the compute.
        quant: Quantization for "qlora"; default NF4, block 64, double quant.
        remat: Rematerialize each layer in the backward pass.
        loss_chunk: Compute the loss with `chunked_cross_entropy` over chunks
            of this many tokens (None: from the whole `[batch, seq, vocab]` logits).
        remat_group: With `remat`, keep every `remat_group`-th layer's input only
            (`CausalLM`'s `remat_group`).

    Returns:
        A `MethodMemory`.

    Example:
        >>> from qlora_jax._src.memory import step_memory
        >>> from qlora_jax.models import ModelConfig
        >>> cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
        ...                   num_kv_heads=2)
        >>> m = step_memory(cfg, "qlora", rank=4, seq_len=16)
        >>> round(m.linear_bytes_per_param, 4), m.trainable_params
        (0.5161, 16384)
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {METHODS}")
    quant = quant or QuantConfig(fmt="nf4", block_size=64, double_quant=True)
    lora = LoraConfig(rank=rank, alpha=alpha, targets="all-linear")
    model, optimizer = _abstract_model(config, method, quant, lora, dtype, remat, remat_group)
    trainable = nnx.state(model, optimizer.wrt)
    opt_state = nnx.state(optimizer)

    linear = nnx.state(model, FrozenWeight) if method != "full" else _linear_kernels(model)
    quantized = nnx.state(model, QuantizedWeight)
    linear_params = linear_param_count(config)
    linear_bytes = _nbytes(quantized) if method == "qlora" else linear_params * np.dtype(dtype).itemsize
    all_params = _nparams(nnx.state(model, nnx.Param)) + (_nparams(linear) if method != "full" else 0)
    other_params = config.num_params - linear_params
    other_bytes = other_params * np.dtype(dtype).itemsize
    m = _nparams(trainable) if method != "full" else 0
    if method == "full":
        formula = (2 + 2 + 4) * (linear_params + other_params)
    elif method == "lora":
        formula = 2 * linear_params + 16 * m + other_bytes
    else:
        formula = int(0.5 * linear_params) + 16 * m + other_bytes
    del all_params

    batch = {
        "input_ids": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32),
        "targets": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32),
        "weights": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32),
    }
    step = bound_train_step(model, optimizer)  # the step Trainer runs
    compiled = step.lower(batch, micro_batches=1, loss_chunk=loss_chunk).compile()
    analysis = compiled.memory_analysis()
    return MethodMemory(
        method=method, linear_params=linear_params, linear_bytes=int(linear_bytes), other_params=other_params,
        other_bytes=int(other_bytes), trainable_params=_nparams(trainable), trainable_bytes=_nbytes(trainable),
        gradient_bytes=_nbytes(trainable), optimizer_bytes=_nbytes(opt_state), formula_bytes=int(formula),
        argument_bytes=int(analysis.argument_size_in_bytes), output_bytes=int(analysis.output_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes), temp_bytes=int(analysis.temp_size_in_bytes),
    )


def _linear_kernels(model) -> Any:
    return [v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if path[-1] == "kernel"]


def linear_param_count(config: ModelConfig) -> int:
    d, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
    per_layer = d * config.num_heads * hd * 2 + 2 * d * config.num_kv_heads * hd + 3 * d * f
    return config.num_layers * per_layer

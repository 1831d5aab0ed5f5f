"""A train step writes out only what it changes: adapters, optimizer state, RNG counts — never the frozen base.

NNX's default `nnx.jit` hands every variable of its arguments back as a new output, so a step would write a
second copy of the whole packed base (and its float embeddings and head) every time; on a model that fills most
of the memory that is the difference between fitting and not. Checked twice: on the compiled step's
`memory_analysis()` (outputs against the bytes of what may change), and on the real peak RSS of steps in a fresh
process (NNX's default step as the negative control, which must fail the same bound).
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import qlora_jax as qj
from qlora_jax._src.train.step import _train_step, bound_train_step
from qlora_jax.models import CausalLM, ModelConfig

SCRIPT = Path(__file__).parent / "scripts" / "step_rss.py"


def _nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _model_and_batch():
    cfg = ModelConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=4,
                      num_kv_heads=4)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    model = qj.apply_qlora(model, quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=1, dropout=0.1),
                           rngs=nnx.Rngs(1))
    ids = np.arange(16, dtype=np.int32).reshape(1, 16)
    return model, {"input_ids": ids, "targets": (ids + 1) % 1024, "weights": np.ones((1, 16), np.float32)}


def _readme_step(model, optimizer, batch):
    """The README's NNX step."""
    def loss_fn(model, batch):
        logits = model(batch["input_ids"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
    optimizer.update(model, grads)
    return loss


@pytest.mark.parametrize("flavour", ["function", "trainer", "readme", "nnx-jit-default"])
def test_compiled_step_outputs_only_what_it_changes(flavour):
    model, batch = _model_and_batch()
    config = qj.train.TrainConfig(total_steps=4)
    optimizer = nnx.Optimizer(model, qj.train.make_optimizer(config), wrt=nnx.LoRAParam)
    if flavour == "function":
        lowered = _train_step.lower(model, optimizer, batch)
    elif flavour == "trainer":
        lowered = bound_train_step(model, optimizer).lower(batch, micro_batches=1, loss_chunk=config.loss_chunk)
    elif flavour == "readme":
        lowered = nnx.jit(_readme_step, graph_updates=False, donate_argnums=1).lower(model, optimizer, batch)
    else:
        lowered = nnx.jit(_readme_step).lower(model, optimizer, batch)
    analysis = lowered.compile().memory_analysis()
    outputs = analysis.output_size_in_bytes - analysis.alias_size_in_bytes  # written anew, not in place
    changing = _nbytes(nnx.state(model, nnx.Any(nnx.LoRAParam, nnx.RngState))) + _nbytes(nnx.state(optimizer))
    frozen = _nbytes(nnx.state(model, nnx.Not(nnx.Any(nnx.LoRAParam, nnx.RngState))))
    assert frozen > 10 * changing  # the check below can tell the two apart
    if flavour == "nnx-jit-default":  # the control: NNX's default writes the frozen base out again
        assert outputs >= frozen
    else:
        assert outputs <= changing + 1024, (outputs, changing, frozen)  # + the metrics' scalars


# The control (NNX's default jit writes the base out every step) also runs, compiled, in the test above; its real
# process run is slow (-m slow), as is the README's step (the same step as the trainer's).
@pytest.mark.parametrize("flavour", ["trainer", pytest.param("readme", marks=pytest.mark.slow),
                                     pytest.param("nnx-jit-default", marks=pytest.mark.slow)])
def test_real_steps_do_not_grow_the_process_by_the_frozen_base(flavour):
    result = subprocess.run([sys.executable, str(SCRIPT), flavour], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    growth = r["after"] - r["built"]  # compiled program, temporaries, and any copy of the base kept around
    if flavour == "nnx-jit-default":
        assert growth > r["frozen"], r  # every step writes the whole model again, frozen base included
    else:
        assert growth < 0.9 * r["frozen"], r
        assert r["peak"] - r["before"] < 0.5 * r["frozen"], r

"""The jitted training and evaluation steps: one train step for `train_step`, `Trainer` and the memory report.

A step differentiates only the variables the optimizer was made for
(`nnx.Optimizer`'s `wrt`, e.g. `nnx.LoRAParam`; `nnx.DiffState`), so the
packed 4-bit base is never differentiated or updated. Any optax
transformation works. The loss is the weighted token-level cross entropy
`Σ w·ce / Σ w`; with `micro_batches > 1` the batch is cut into micro-batches
whose gradients of `Σ w·ce` and counts `Σ w` are summed before dividing,
which gives the update of the whole batch.
Dropout keys come from the model's own RNG state (advanced in place), which
`qj.checkpoint` saves, so a resumed run draws the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from qlora_jax._src.train.loss import masked_cross_entropy

__all__ = ["train_step", "eval_step", "evaluate", "BATCH_KEYS", "MODEL_INPUT_KEYS"]

# Keys every batch has, each `[batch, seq]`: token ids, next-token targets, per-token loss weights.
BATCH_KEYS: tuple[str, ...] = ("input_ids", "targets", "weights")
# Optional `[batch, seq]` keys, passed to the model as keyword arguments of the same name.
MODEL_INPUT_KEYS: tuple[str, ...] = ("positions", "segment_ids", "attention_mask")

Batch = Mapping[str, Any]


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch, *, micro_batches: int = 1,
               loss_chunk: int | None = 1024) -> dict[str, jax.Array]:
    """One optimizer update of the `optimizer.wrt` variables (e.g. the adapters) on `batch`, in place.

    The model runs as it is: in training mode (the default; `model.train()`)
    its adapters apply dropout with keys drawn from its RNG state. Works with
    any optax transformation; the update runs under standard dtype promotion,
    so the step works when `jax_numpy_dtype_promotion` is "strict". Each call
    walks the model's and optimizer's graphs in Python; `Trainer.train_step`
    runs the same step bound to its model and optimizer once.

    Args:
        model: A model with the variables `optimizer` updates (e.g.
            `nnx.LoRAParam` adapters after `apply_qlora`) called as
            `model(input_ids, positions=..., segment_ids=...)` → logits
            `[batch, seq, vocab]`.
        optimizer: An `nnx.Optimizer` of `model`, e.g.
            `nnx.Optimizer(model, make_optimizer(config), wrt=nnx.LoRAParam)`
            or one of any optax transformation.
        batch: `input_ids`, `targets` (the next token), `weights` (0 for
            tokens without loss) and optionally `positions`, `segment_ids`,
            `attention_mask`; arrays `[batch, seq]` (numpy or jax), with
            `batch` divisible by `micro_batches`.
        micro_batches: Gradient accumulation: the batch runs as this many
            equal slices of rows, one after another, whose gradients are
            summed into one update of the whole batch (a static argument;
            `Trainer` passes `TrainConfig.grad_accum`).
        loss_chunk: With a model that has `hidden_states` and
            `logits_from_hidden` (as `CausalLM`), the loss is computed over
            chunks of this many tokens (`chunked_cross_entropy`), so the
            logits of only one chunk exist at once; None: from the whole
            logits (static; `Trainer` passes `TrainConfig.loss_chunk`).

    Returns:
        Scalars (jax arrays, not yet synchronized): `loss` (weighted mean
        token cross entropy), `grad_norm` (global norm before clipping),
        `tokens` (`Σ weights`) and, when the optimizer state holds one
        `learning_rate` hyperparameter (`optax.inject_hyperparams`, as in
        `make_optimizer`), `lr`: the learning rate of this update.

    Raises:
        ValueError: A missing or unknown batch key, arrays of different
            shapes, `micro_batches` not a positive integer, or a batch size
            not divisible by it.

    Example:
        >>> import numpy as np, optax, qlora_jax as qj
        >>> from flax import nnx
        >>> class TinyLM(nnx.Module):  # any model called as model(input_ids, ...) -> logits
        ...     def __init__(self, rngs):
        ...         self.embed = nnx.Embed(16, 64, rngs=rngs)
        ...         self.proj = nnx.Linear(64, 64, rngs=rngs)
        ...         self.lm_head = nnx.Linear(64, 16, rngs=rngs)
        ...     def __call__(self, input_ids, **kwargs):
        ...         return self.lm_head(self.proj(self.embed(input_ids)))
        >>> model = qj.apply_qlora(TinyLM(nnx.Rngs(0)), quant=qj.QuantConfig(), lora=qj.LoraConfig(rank=4),
        ...                        rngs=nnx.Rngs(1))
        >>> config = qj.train.TrainConfig(total_steps=10, lr=1e-3, warmup_ratio=0.0)
        >>> optimizer = nnx.Optimizer(model, qj.train.make_optimizer(config), wrt=nnx.LoRAParam)
        >>> ids = np.arange(16, dtype=np.int32).reshape(2, 8)
        >>> batch = {"input_ids": ids, "targets": (ids + 1) % 16, "weights": np.ones((2, 8), np.float32)}
        >>> metrics = qj.train.train_step(model, optimizer, batch, micro_batches=2)
        >>> sorted(metrics), float(metrics["tokens"]), round(float(metrics["lr"]), 6), int(optimizer.step[...])
        (['grad_norm', 'loss', 'lr', 'tokens'], 16.0, 0.001, 1)
        >>> sgd = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.LoRAParam)  # any optax transformation
        >>> sorted(qj.train.train_step(model, sgd, batch))  # no learning rate in its state: no `lr`
        ['grad_norm', 'loss', 'tokens']
    """
    batch = check_batch(batch, micro_batches)
    return _train_step(model, optimizer, batch, micro_batches=micro_batches, loss_chunk=loss_chunk)


def eval_step(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    """The loss on one batch without dropout; the model (and its RNG state) is left as it was.

    Args:
        model: As `train_step`; evaluated as after `model.eval()`, through a
            view (`nnx.with_attributes`), so its mode is unchanged.
        batch: As `train_step`.

    Returns:
        Scalars: `loss` (weighted mean), `loss_sum` (`Σ w·ce`) and `tokens` (`Σ w`).

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlora_jax.train import eval_step
        >>> class Uniform(nnx.Module):  # logits 0: ce = log(vocab) for every token
        ...     def __call__(self, input_ids, **kwargs):
        ...         return np.zeros((*input_ids.shape, 4), np.float32)
        >>> ids = np.zeros((1, 3), np.int32)
        >>> out = eval_step(Uniform(), {"input_ids": ids, "targets": ids, "weights": np.ones((1, 3), np.float32)})
        >>> round(float(out["loss"]), 4), float(out["tokens"])
        (1.3863, 3.0)
    """
    loss_sum, tokens = _eval_sums(_eval_view(model), check_batch(batch, 1))
    return {"loss": loss_sum / jnp.where(tokens > 0, tokens, 1.0), "loss_sum": loss_sum, "tokens": tokens}


def evaluate(model: nnx.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """The weighted mean loss over every token of `batches`, without dropout.

    Args:
        model: As `eval_step` (its mode and RNG state are left unchanged).
        batches: Batches as `train_step`'s (any iterable; shapes may vary).

    Returns:
        `loss` (`Σ w·ce / Σ w` over all batches), `perplexity` (`exp(loss)`)
        and `tokens` (`Σ w`), as Python floats.

    Raises:
        ValueError: No batches, or no token with a non-zero weight.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlora_jax.train import evaluate
        >>> class Uniform(nnx.Module):
        ...     def __call__(self, input_ids, **kwargs):
        ...         return np.zeros((*input_ids.shape, 4), np.float32)
        >>> ids = np.zeros((2, 3), np.int32)
        >>> batch = {"input_ids": ids, "targets": ids, "weights": np.ones((2, 3), np.float32)}
        >>> {k: round(v, 4) for k, v in evaluate(Uniform(), [batch, batch]).items()}
        {'loss': 1.3863, 'perplexity': 4.0, 'tokens': 12.0}
    """
    view = _eval_view(model)
    loss_sum, tokens, n = np.float64(0.0), np.float64(0.0), 0
    pending = []
    for batch in batches:
        pending.append(_eval_sums(view, check_batch(batch, 1)))  # dispatched asynchronously
        n += 1
    for batch_loss, batch_tokens in pending:
        loss_sum += np.float64(batch_loss)
        tokens += np.float64(batch_tokens)
    if n == 0:
        raise ValueError("evaluate: batches is empty")
    if tokens <= 0:
        raise ValueError(f"evaluate: the {n} batches have no token with a non-zero weight")
    loss = float(loss_sum / tokens)
    return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": float(tokens)}


def _loss_sums(model: nnx.Module, batch: dict[str, jax.Array],
               loss_chunk: int | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """`Σ w·ce` (differentiated) and, as auxiliary output, `(Σ w·ce, Σ w)`.

    With `loss_chunk` and a model that has `hidden_states` and
    `logits_from_hidden` (as `CausalLM`), the loss is `chunked_cross_entropy`
    over chunks of `loss_chunk` tokens; otherwise `model(...)`'s logits go to
    `masked_cross_entropy`.
    """
    from qlora_jax._src.train.loss import chunked_cross_entropy

    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    if loss_chunk is not None and hasattr(model, "hidden_states") and hasattr(model, "logits_from_hidden"):
        hidden = model.hidden_states(batch["input_ids"], **inputs)  # [batch, seq, hidden]
        loss_sum, weight_sum = chunked_cross_entropy(hidden, model.logits_from_hidden, batch["targets"],
                                                     batch["weights"], chunk_size=loss_chunk)
    else:
        logits = model(batch["input_ids"], **inputs)  # [batch, seq, vocab]
        loss_sum, weight_sum = masked_cross_entropy(logits, batch["targets"], batch["weights"])
    return loss_sum, (loss_sum, weight_sum)


def _train_step_impl(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict[str, jax.Array], *,
                     micro_batches: int = 1, loss_chunk: int | None = 1024) -> dict[str, jax.Array]:
    mesh = _explicit_mesh(nnx.state((model, optimizer)), batch)
    if mesh is None:
        return _train_step_body(model, optimizer, batch, micro_batches=micro_batches, loss_chunk=loss_chunk)
    # Arrays sharded on a mesh with Explicit axes (`jax.make_mesh`'s default since JAX 0.7) carry their sharding in
    # their types, and every operation must then say how its output is sharded. The step runs with those axes as
    # Auto (`jax.sharding.auto_axes`: XLA propagates shardings, as on an Auto mesh) and hands back what it changed
    # (trained variables, optimizer state, RNG counts) with the shardings they came in with.
    changed = _changed_by_step(optimizer)
    graphdef, state, rest = nnx.split((model, optimizer), changed, ...)

    def body(state: nnx.State, rest: nnx.State, batch: dict[str, jax.Array]):
        model, optimizer = nnx.merge(graphdef, state, rest)
        metrics = _train_step_body(model, optimizer, batch, micro_batches=micro_batches, loss_chunk=loss_chunk)
        return metrics, nnx.state((model, optimizer), changed)

    specs = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, state)
    with jax.sharding.use_abstract_mesh(mesh):  # the arrays' mesh, also where no mesh was set as the context
        metrics, state = jax.sharding.auto_axes(body, out_sharding=(PartitionSpec(), specs))(state, rest, batch)
    nnx.update((model, optimizer), state)
    return metrics


def _explicit_mesh(*trees: Any) -> jax.sharding.AbstractMesh | None:
    """The mesh with Explicit axes the traced computation runs on (the context's, else the arrays'), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        meshes = (getattr(jax.typeof(leaf).sharding, "mesh", None) for leaf in jax.tree.leaves(trees)
                  if isinstance(leaf, jax.Array))
        mesh = next((m for m in meshes if m is not None and not m.empty), mesh)
    return None if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types else mesh


def _changed_by_step(optimizer: nnx.Optimizer) -> Any:
    """What a train step writes (an NNX filter): the trained variables, the RNG state, the optimizer's state."""
    return nnx.Any(optimizer.wrt, nnx.RngState, nnx.OptState)


def _train_step_body(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict[str, jax.Array], *,
                     micro_batches: int = 1, loss_chunk: int | None = 1024) -> dict[str, jax.Array]:
    def loss_fn(model: nnx.Module, batch: dict[str, jax.Array]):
        return _loss_sums(model, batch, loss_chunk=loss_chunk)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True)
    if micro_batches == 1:
        (_, (loss_sum, weight_sum)), grads = grad_fn(model, batch)
    else:
        micro = {k: v.reshape(micro_batches, v.shape[0] // micro_batches, *v.shape[1:])
                 for k, v in batch.items()}  # [micro_batches, micro_batch, seq]

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def accumulate(carry, micro_batch):
            model, grads, loss_sum, weight_sum = carry
            (_, (micro_loss, micro_weight)), micro_grads = grad_fn(model, micro_batch)
            return model, jax.tree.map(jnp.add, grads, micro_grads), loss_sum + micro_loss, weight_sum + micro_weight

        zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, optimizer.wrt))
        zero = jnp.zeros((), jnp.float32)
        _, grads, loss_sum, weight_sum = accumulate((model, zeros, zero, zero), micro)
    denom = jnp.where(weight_sum > 0, weight_sum, 1.0)  # an all-masked batch gives zero gradients, not NaN
    grads = jax.tree.map(lambda g: (g.astype(jnp.float32) / denom).astype(g.dtype), grads)  # in each grad's dtype
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and float moments
        optimizer.update(model, grads)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "tokens": weight_sum}
    lr = _learning_rate(optimizer)
    if lr is not None:
        metrics["lr"] = lr
    return metrics


def _learning_rate(optimizer: nnx.Optimizer) -> jax.Array | None:
    """The `learning_rate` hyperparameter in `optimizer`'s state (the latest update's), or None.

    Set by `optax.inject_hyperparams` (as in `make_optimizer`); None when the
    state holds no such value or more than one.
    """
    state = nnx.as_pure(optimizer.opt_state)
    try:
        value = optax.tree_utils.tree_get(state, "learning_rate",
                                          filtering=lambda _, v: isinstance(v, (jax.Array, np.ndarray)))
    except KeyError:  # several learning rates (e.g. two injected transformations): none is the step's
        return None
    return None if value is None else jnp.asarray(value)


# `graph_updates=False`: the step hands back only the variables it changes (adapters, optimizer state, RNG
# counts); with NNX's default every variable of the model, the packed base included, would be written out anew.
_train_step = nnx.jit(_train_step_impl, static_argnames=("micro_batches", "loss_chunk"), graph_updates=False)


def bound_train_step(model: nnx.Module, optimizer: nnx.Optimizer) -> Callable[..., dict[str, jax.Array]]:
    """The train step for this model and optimizer, called as `step(batch, *, micro_batches=1, loss_chunk=1024)`.

    The one jitted step of the library: `Trainer` runs it and the memory
    report (`step_memory`) compiles it (`step.lower(batch, ...)`, also for
    a model and optimizer made with `nnx.eval_shape`). It computes what
    `train_step` computes, but flattens the model's and optimizer's graphs
    once (`nnx.jit_partial`) instead of on every call. The structure is
    fixed when this is called: variables keep being read and updated in
    place, but later changes to the modules themselves (`model.eval()`, new
    submodules) are not seen; call it again after them. `Trainer` does.

    The model's and optimizer's arrays are donated: XLA writes the new
    adapters, moments and RNG counts into the old buffers and hands the
    frozen arrays back as they are (aliased), so a step allocates no second
    copy of what it changes. Arrays taken from the model before a step are
    invalid after it (a NumPy view keeps its buffer from being donated).
    """
    return nnx.jit_partial(_train_step_impl, model, optimizer, static_argnames=("micro_batches", "loss_chunk"),
                           graph=True, graph_updates=False, donate_argnums=(0,))


@nnx.jit(graph_updates=False)
def _eval_sums(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    mesh = _explicit_mesh(nnx.state(model), batch)
    if mesh is None:
        return _loss_sums(model, batch)[1]
    graphdef, state = nnx.split(model)  # with the mesh's axes as Auto, as the train step

    def body(state: nnx.State, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return _loss_sums(nnx.merge(graphdef, state), batch)[1]

    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(body, out_sharding=PartitionSpec())(state, batch)


def _eval_view(model: nnx.Module) -> nnx.Module:
    """The model with dropout off (as `model.eval()`), sharing its variables."""
    return nnx.with_attributes(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


def check_batch(batch: Batch, micro_batches: int, name: str = "micro_batches") -> dict[str, Any]:
    """`batch` as a dict, checked: its keys, `[batch, seq]` shapes, and rows divisible by `micro_batches`.

    `name` is how the error messages call `micro_batches` (e.g. "TrainConfig.grad_accum").
    """
    if isinstance(micro_batches, (bool, np.bool_)) or not isinstance(micro_batches, (int, np.integer)) \
            or micro_batches < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {micro_batches!r}")
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected a mapping of arrays, got {type(batch).__name__}")
    missing = [k for k in BATCH_KEYS if k not in batch]
    unknown = sorted(set(batch) - set(BATCH_KEYS) - set(MODEL_INPUT_KEYS))
    if missing or unknown:
        problem = f"missing {missing}" if missing else f"unknown keys {unknown}"
        raise ValueError(f"batch: {problem}; a batch holds {list(BATCH_KEYS)} and optionally "
                         f"{list(MODEL_INPUT_KEYS)}, each [batch, seq]")
    shape = tuple(np.shape(batch["input_ids"]))
    if len(shape) != 2:
        raise ValueError(f"batch['input_ids']: expected [batch, seq], got shape {shape}")
    for key, value in batch.items():
        if tuple(np.shape(value)) != shape:
            raise ValueError(f"batch[{key!r}]: shape {tuple(np.shape(value))} differs from input_ids' {shape}")
    if shape[0] % micro_batches:
        raise ValueError(f"batch: {shape[0]} rows cannot be split into {name}={micro_batches} equal micro-batches")
    return dict(batch)

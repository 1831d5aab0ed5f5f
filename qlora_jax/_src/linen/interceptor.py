"""`qlora_interceptor`: run the `nn.Dense` layers of an unmodified Linen model as QLoRA layers.

Linen modules are code, not data, so a model cannot be rewritten in place as
NNX models are. Instead `convert_params` rewrites the variables (the kernel of
each converted layer moves to the `"frozen"` collection, packed; adapters are
added to `"params"`), and this interceptor, registered with
`nn.intercept_methods`, computes every `nn.Dense` / `nn.DenseGeneral` whose
kernel it finds in `"frozen"` with `dense_forward` instead of the layer's own
code. Which layers are converted is therefore decided once, by the variables;
layers with a float kernel in `"params"` run unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import numpy as np
from flax.linen import dtypes as linen_dtypes

from qlora_jax._src.config import LoraConfig, QuantConfig
from qlora_jax._src.linen.layers import FROZEN, QLoRABase, compute_dtype, dense_forward

__all__ = ["SUPPORTED_MODULES", "qlora_interceptor", "unsupported_reason"]

# Linen module types that convert_params converts and qlora_interceptor computes (exact types).
SUPPORTED_MODULES: dict[type, str] = {
    nn.Dense: "kernel [in, out]; adapter lora_a [in, r], lora_b [r, out]",
    nn.DenseGeneral: "kernel [*in, *features] (no batch_dims); adapter on the flattened axes",
}


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a Linen `nn.Dense` / `nn.DenseGeneral` cannot be computed faithfully, or None.

    Example:
        >>> import flax.linen as nn
        >>> from qlora_jax.linen import unsupported_reason
        >>> unsupported_reason(nn.Dense(4)) is None, unsupported_reason(nn.DenseGeneral(4, batch_dims=(0,)))
        (True, 'it has batch_dims (0,)')
    """
    if type(module) not in SUPPORTED_MODULES:
        return f"{type(module).__name__} is not supported (supported: nn.Dense, nn.DenseGeneral)"
    if module.dot_general is not None or module.dot_general_cls is not None:
        return "it has a custom dot_general"
    if module.promote_dtype is not linen_dtypes.promote_dtype:
        return "it has a custom promote_dtype"
    if isinstance(module, nn.DenseGeneral) and tuple(np.atleast_1d(module.batch_dims)):
        return f"it has batch_dims {tuple(int(d) for d in np.atleast_1d(module.batch_dims))}"
    return None


def qlora_interceptor(
    *,
    quant: QuantConfig | None,
    lora: LoraConfig | None,
    deterministic: bool | None = None,
) -> nn.module.Interceptor:
    """A Linen method interceptor that computes converted `nn.Dense` layers as QLoRA layers.

    Use it around `model.apply` with the variables from `convert_params`
    (pass the same configs), **inside** the function you `jax.jit` (the
    interceptor acts when the model is traced)::

        with nn.intercept_methods(qlora_interceptor(quant=quant, lora=lora, deterministic=False)):
            y = model.apply(variables, x, rngs={"dropout": key})

    For each call of an `nn.Dense` / `nn.DenseGeneral` whose kernel is in the
    `"frozen"` collection, it returns `dense_forward`: the frozen kernel
    (packed: `qdot_general`; float: exactly the layer's own dot), the bias,
    and, if the layer has `lora_a` / `lora_b` params, `s · B(A(dropout(x)))`.
    The compute dtype is `quant.compute_dtype`, else the layer's `dtype`.
    Every other module call runs unchanged (so `model.init` under it gives
    ordinary float params).

    Args:
        quant: The `QuantConfig` given to `convert_params` (its `compute_dtype`
            is used), or None.
        lora: The `LoraConfig` given to `convert_params` (rank, alpha, rslora,
            dropout), or None when no layer has an adapter.
        deterministic: Turns the adapter dropout off (evaluation). Required when
            `lora.dropout > 0`; with False, the "dropout" rng stream of
            `apply` draws the masks.

    Returns:
        An interceptor for `nn.intercept_methods`.

    Raises:
        TypeError: Configs of the wrong type.
        ValueError: `deterministic` missing while `lora.dropout > 0`. When the
            model runs: a layer with a frozen kernel that is not a supported
            `nn.Dense` / `nn.DenseGeneral`, adapters of the wrong rank or
            without a `LoraConfig`, or a converted layer whose kernel cannot be
            found (inside `nn.scan` / `nn.vmap`, list `"frozen"` in
            `variable_axes`); each message names the layer path.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, qlora_jax as qj
        >>> from qlora_jax.linen import convert_params, qlora_interceptor
        >>> model = nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(128)])
        >>> x = jnp.ones((2, 128))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> quant, lora = qj.QuantConfig(), qj.LoraConfig(rank=8)
        >>> variables, report = convert_params(params, quant=quant, lora=lora, rng=jax.random.key(1))
        >>> report.paths
        ('layers_0', 'layers_2')
        >>> with nn.intercept_methods(qlora_interceptor(quant=quant, lora=lora)):
        ...     y = model.apply(variables, x)
        >>> y.shape
        (2, 128)
    """
    if quant is not None and not isinstance(quant, QuantConfig):
        raise TypeError(f"quant: expected a QuantConfig or None, got {type(quant).__name__}")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise TypeError(f"lora: expected a LoraConfig or None, got {type(lora).__name__}")
    if deterministic is not None and not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"deterministic: expected a bool or None, got {deterministic!r}")
    if lora is not None and lora.dropout > 0 and deterministic is None:
        raise ValueError(f"qlora_interceptor: LoraConfig.dropout={lora.dropout} needs deterministic=True "
                         "(evaluation, no dropout) or deterministic=False (training, draws from the 'dropout' rng)")

    def interceptor(next_fun: Any, args: tuple, kwargs: dict, context: nn.module.InterceptorContext) -> Any:
        module = context.module
        if context.method_name != "__call__" or isinstance(module, QLoRABase):
            return next_fun(*args, **kwargs)
        if not module.has_variable(FROZEN, "kernel"):
            if (type(module) in SUPPORTED_MODULES and not module.is_mutable_collection("params")
                    and not module.has_variable("params", "kernel")):
                raise ValueError(f"{_path(module)}: this {type(module).__name__} has no kernel, neither in 'params' "
                                 f"nor in {FROZEN!r}; pass all of convert_params' variables to apply (inside nn.scan "
                                 f"or nn.vmap, the {FROZEN!r} collection must be listed in variable_axes)")
            return next_fun(*args, **kwargs)
        return _converted_call(module, args, kwargs, quant, lora, deterministic)

    return interceptor


def _path(module: nn.Module) -> str:
    return "/".join(module.path) or type(module).__name__


def _converted_call(module: nn.Module, args: tuple, kwargs: dict, quant: QuantConfig | None,
                    lora: LoraConfig | None, deterministic: bool | None) -> Any:
    path = _path(module)
    reason = unsupported_reason(module)
    if reason is not None:
        raise ValueError(f"{path}: its kernel is in the {FROZEN!r} collection, but qlora_interceptor cannot compute "
                         f"it: {reason}. Leave it out of convert_params (pass layers=dense_layers(model, ...))")
    if len(args) + len(kwargs) != 1:
        raise TypeError(f"{path}: {type(module).__name__} takes one input, got {len(args)} positional and "
                        f"keyword arguments {sorted(kwargs)}")
    inputs = args[0] if args else next(iter(kwargs.values()))
    kernel = nn.meta.unbox(module.get_variable(FROZEN, "kernel"))
    bias = nn.meta.unbox(module.get_variable("params", "bias")) if module.use_bias else None
    if module.use_bias and bias is None:
        raise ValueError(f"{path}: use_bias=True but 'params' has no bias for this layer")
    has_a, has_b = module.has_variable("params", "lora_a"), module.has_variable("params", "lora_b")
    if has_a != has_b:
        raise ValueError(f"{path}: 'params' has {'lora_a' if has_a else 'lora_b'} without "
                         f"{'lora_b' if has_a else 'lora_a'}")
    adapter, rng = None, None
    if has_a:
        if lora is None:
            raise ValueError(f"{path}: the layer has adapters (lora_a, lora_b) but qlora_interceptor got lora=None; "
                             "pass the LoraConfig given to convert_params")
        adapter = (nn.meta.unbox(module.get_variable("params", "lora_a")),
                   nn.meta.unbox(module.get_variable("params", "lora_b")))
        if adapter[0].shape[-1] != lora.rank:
            raise ValueError(f"{path}: lora_a has shape {tuple(adapter[0].shape)}, rank {adapter[0].shape[-1]}, but "
                             f"LoraConfig.rank={lora.rank}")
        if lora.dropout > 0 and not deterministic:
            rng = module.make_rng("dropout")
    magnitude = None  # DoRA's, from convert_params with LoraConfig(use_dora=True)
    if module.has_variable("params", "lora_magnitude_vector"):
        magnitude = nn.meta.unbox(module.get_variable("params", "lora_magnitude_vector"))
    axis = (-1,) if type(module) is nn.Dense else tuple(int(a) for a in np.atleast_1d(module.axis))
    return dense_forward(inputs, kernel, bias, adapter, axis=axis, dtype=compute_dtype(quant, module.dtype),
                         precision=module.precision, scale=lora.scale if lora is not None else 1.0,
                         dropout_rate=lora.dropout if lora is not None else 0.0, dropout_rng=rng,
                         magnitude=magnitude, name=path)

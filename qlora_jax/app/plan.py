"""Will a fine-tuning step fit? A plan made before anything is loaded.

`plan_fit` compiles the train step for abstract shapes (`step_memory`:
`nnx.eval_shape` and `memory_analysis()`, no weight read, nothing allocated)
for candidate settings in order of preference, fastest first, and returns the
first whose need fits the memory available:

1. the whole batch in one step, without rematerialization;
2. the whole batch with each layer rematerialized in the backward pass;
3. the same, keeping only every `REMAT_GROUP`-th layer's input
   (`CausalLM(remat_group=...)`: one more forward pass, for long sequences);
4. micro-batches of `batch_size / k` rows (every `k` dividing `batch_size`,
   smallest first) with `k`-step gradient accumulation, so the effective
   batch stays `batch_size` rows: the same three settings in that order.

The need of a candidate is the compiled step's peak (`compiled_total`), plus,
with gradient accumulation, the accumulated gradients and the batch's other
rows, plus an allowance for what lives outside the step (`need_bytes`).
Where nothing fits, `DoesNotFit` says what is needed and which single change
of the settings would fit (a 4-bit base, rematerialization, a shorter
sequence), each checked by compiling it.

The compiled step has plain LoRA adapters. DoRA (`use_dora`) and the inits
that read the weight (`weight_init`: PiSSA, OLoRA, LoftQ) are counted on top
by `adapter_method_bytes`: DoRA's magnitudes with their gradients and AdamW
moments and its forward extra; the weight inits' whole float32 projections
and decompositions while the checkpoint streams, a need of the load, not of
the step (a candidate needs the larger of the two).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from qlora_jax._src.config import QuantConfig
from qlora_jax._src.memory import METHODS, MethodMemory, step_memory
from qlora_jax._src.models.config import ModelConfig

__all__ = ["REMAT_GROUP", "RESERVE_BYTES", "RESERVE_FRACTION", "Candidate", "DoesNotFit", "Plan",
           "adapter_method_bytes", "available_memory", "need_bytes", "plan_fit", "plan_table"]

_logger = logging.getLogger("qlora_jax")

# The allowance on top of the compiled step (see `need_bytes`).
RESERVE_BYTES = 512 * 2**20  # the runtime outside the step: XLA's and the kernels' workspaces, the data pipeline
RESERVE_FRACTION = 0.10  # allocator fragmentation, the loader's one full-precision tensor at a time, dropout masks
_MIN_SEQ_LEN = 128  # the shortest sequence length suggested
REMAT_GROUP = 4  # layers per recomputed group, the planner's last rematerialization setting
_BATCH_BYTES_PER_TOKEN = 12  # input_ids and targets (int32), weights (float32)
_LOADER_WORKERS = 2  # from_pretrained's threads reading and quantizing projections (its `_WORKERS`)
# What one weight-reading init holds per projection being initialized, in float32 copies of the projection: the
# whole kernel, its decomposition's factors (U [in, k] and V [k, out], at most two copies together) and the residual.
_INIT_COPIES = 4


def _projection_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """`(in, out)` of one decoder layer's linear projections (all-linear adapters; each expert's for MoE)."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    mlp = [(h, config.intermediate_size)] * 2 + [(config.intermediate_size, h)]
    return [(h, q), (h, kv), (h, kv), (q, h)] + mlp * max(1, config.num_experts)


def adapter_method_bytes(config: ModelConfig, *, rank: int, use_dora: bool = False,
                         weight_init: bool = False, quantized: bool = True) -> tuple[int, int]:
    """What DoRA and the weight-reading inits add to a LoRA plan: `(step_bytes, load_bytes)`.

    `step_bytes` (DoRA; 0 without): each targeted projection's magnitude
    vector, one float32 value per output, trained (parameter, gradient and
    the two AdamW moments: 16 bytes per output), plus the forward's extra,
    the r-row product `A·W` `[r, out]` in float32 kept for the backward.
    `load_bytes` (PiSSA, OLoRA, LoftQ; 0 without): the loader
    (`from_pretrained`) reads each targeted projection whole in float32 and
    decomposes it while the checkpoint streams, on up to `_WORKERS` (2)
    threads at once, each holding about four float32 copies of the largest
    projection (kernel, SVD or QR factors, residual); this is held on top of
    the model's weights while loading, before the optimizer exists. Over a
    float base (`quantized=False`) `apply_qlora` computes it after loading,
    one layer at a time, the residuals of all layers of a projection stacked
    before they replace its kernels: the largest projection's stack plus
    three copies for one layer's decomposition.
    Projections as adapted by "all-linear" (attention and MLP, each expert's).

    Args:
        config: The architecture.
        rank: LoRA rank.
        use_dora: DoRA adapters.
        weight_init: An init that reads the weight ("pissa", "pissa_niter_N", "olora", "loftq").
        quantized: A quantized base (the init streams while loading), else float (`apply_qlora` after loading).

    Returns:
        `(step_bytes, load_bytes)`.

    Example:
        >>> from qlora_jax.models import ModelConfig
        >>> cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        ...                   num_kv_heads=2)
        >>> adapter_method_bytes(cfg, rank=4, use_dora=True)  # 2 layers x 512 outputs x (16 + 4*4) bytes
        (32768, 0)
        >>> adapter_method_bytes(cfg, rank=4, weight_init=True)  # 2 threads x 4 copies x 64*128*4 bytes
        (0, 262144)
        >>> adapter_method_bytes(cfg, rank=4, weight_init=True, quantized=False)  # (2 layers + 3) x 64*128*4 bytes
        (0, 163840)
    """
    shapes = _projection_shapes(config)
    outputs = config.num_layers * sum(o for _, o in shapes)
    step = outputs * (16 + 4 * rank) if use_dora else 0
    largest = 4 * max(i * o for i, o in shapes)
    copies = _LOADER_WORKERS * _INIT_COPIES if quantized else config.num_layers + _INIT_COPIES - 1
    load = copies * largest if weight_init else 0
    return step, load


def need_bytes(step_bytes: int) -> int:
    """What a step that compiles to `step_bytes` needs in all: the step plus the allowance.

    The allowance is `RESERVE_FRACTION` (10%) of the step, for the
    allocator's fragmentation and what the compiled step does not see (the
    loader's one full-precision tensor at a time, dropout masks, the real
    trainer's gradient clipping), plus `RESERVE_BYTES` (512 MiB) for the
    runtime around the step (the kernels' workspaces, the data pipeline).

    Example:
        >>> need_bytes(10 * 2**30) / 2**30
        11.5
    """
    return int(step_bytes + RESERVE_FRACTION * step_bytes) + RESERVE_BYTES


def available_memory(device: jax.Device | None = None) -> int:
    """The memory a run on `device` (default: the first device) can use now.

    On a GPU or TPU: the allocator's limit less what is in use
    (`memory_stats()["bytes_limit"] - ["bytes_in_use"]`). On a CPU: the
    host's `MemAvailable` (`/proc/meminfo`), or `os.sysconf`'s available
    pages where there is no `/proc`.

    Raises:
        ValueError: The device reports nothing (pass `available_bytes` to `plan_fit`).

    Example:
        >>> available_memory() > 0
        True
    """
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            raise ValueError(f"{device}: memory_stats() reports no bytes_limit; pass available_bytes")
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in KiB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError) as e:
        raise ValueError(f"the host's available memory is unknown ({e}); pass available_bytes") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    """One setting the planner compiled, and what it needs.

    Attributes:
        micro_batch: Rows per compiled step.
        grad_accum: Micro-batches per optimizer update (`micro_batch * grad_accum` is the batch).
        remat: Whether each layer is rematerialized in the backward pass.
        step_bytes: The compiled micro-batch step's peak (`MethodMemory.compiled_total`).
        extra_bytes: With gradient accumulation: the accumulated gradients and the batch's other rows; with DoRA,
            its magnitudes' state and forward extra; with a weight-reading init, what loading needs beyond the
            step, if more (`adapter_method_bytes`).
        need_bytes: `need_bytes(step_bytes + extra_bytes)`, what the setting needs in all.
        fits: Whether `need_bytes` is at most what was available.
    """

    micro_batch: int
    grad_accum: int
    remat: bool
    step_bytes: int
    extra_bytes: int
    need_bytes: int
    fits: bool
    remat_group: int = 1  # with remat: every `remat_group`-th layer's input kept (`CausalLM`)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """The setting `plan_fit` picked.

    Attributes:
        remat: Rematerialize each layer in the backward pass.
        remat_group: With `remat`, keep every `remat_group`-th layer's input only (`CausalLM`'s).
        micro_batch: Rows per step.
        grad_accum: Micro-batches per optimizer update; `micro_batch * grad_accum` is the requested batch.
        need_bytes: What the pick needs (step and allowance, see `need_bytes`).
        available_bytes: What was available.
        candidates: Every setting compiled, in the order tried; the last is the pick.
    """

    remat: bool
    micro_batch: int
    grad_accum: int
    need_bytes: int
    available_bytes: int
    candidates: tuple[Candidate, ...]
    remat_group: int = 1

    def describe(self) -> str:
        """One line: the pick and its need, e.g. for a log.

        Example:
            >>> Plan(remat=True, micro_batch=2, grad_accum=2, need_bytes=2**30, available_bytes=2**32,
            ...      candidates=()).describe()
            'remat on, micro-batch 2 x 2 (grad accumulation), needs 1.0 GiB of 4.0 GiB available'
        """
        batch = (f"micro-batch {self.micro_batch} x {self.grad_accum} (grad accumulation)" if self.grad_accum > 1
                 else f"batch {self.micro_batch} in one step")
        return (f"{_remat_label(self.remat, self.remat_group)}, {batch}, needs {_gib(self.need_bytes)} of "
                f"{_gib(self.available_bytes)} available")

    def to_dict(self) -> dict[str, Any]:
        """The pick as plain values (what `finetune` records in run_config.json).

        Example:
            >>> Plan(remat=False, micro_batch=4, grad_accum=1, need_bytes=1, available_bytes=2,
            ...      candidates=()).to_dict()
            {'remat': False, 'remat_group': 1, 'micro_batch': 4, 'grad_accum': 1, 'need_bytes': 1, 'available_bytes': 2}
        """
        return {"remat": self.remat, "remat_group": self.remat_group, "micro_batch": self.micro_batch,
                "grad_accum": self.grad_accum, "need_bytes": self.need_bytes, "available_bytes": self.available_bytes}


class DoesNotFit(ValueError):
    """No setting tried fits the memory available.

    Attributes:
        need_bytes: The least any setting tried needs.
        available_bytes: What was available.
        suggestions: Single changes of the settings that were compiled and fit, as
            `{setting: value}` in the order tried: "method" ("qlora" or "lora"),
            "remat" (True) or "seq_len" (the longest halving of it that fits).
        candidates: Every setting compiled, in the order tried.

    `str()` names the changes as `setting=value`; `message(spell)` and
    `spelled(spell)` let a command line name its own flags.

    Example:
        >>> e = DoesNotFit(need_bytes=27 * 2**30, available_bytes=23 * 2**30, suggestions={"seq_len": 1024})
        >>> str(e)
        'needs 27.0 GiB, 23.0 GiB available; try seq_len=1024'
        >>> e.message(lambda setting, value: f"--{setting.replace('_', '-')} {value}")
        'needs 27.0 GiB, 23.0 GiB available; try --seq-len 1024'
    """

    def __init__(self, *, need_bytes: int, available_bytes: int, suggestions: dict[str, Any],
                 candidates: tuple[Candidate, ...] = (), spell: Callable[[str, Any], str] | None = None):
        self.need_bytes = need_bytes
        self.available_bytes = available_bytes
        self.suggestions = dict(suggestions)
        self.candidates = candidates
        super().__init__(self.message(spell))

    def spelled(self, spell: Callable[[str, Any], str]) -> DoesNotFit:
        """The same refusal, whose `str()` writes each suggestion as `spell(setting, value)`."""
        return DoesNotFit(need_bytes=self.need_bytes, available_bytes=self.available_bytes,
                          suggestions=self.suggestions, candidates=self.candidates, spell=spell)

    def message(self, spell: Callable[[str, Any], str] | None = None) -> str:
        """The one-line refusal, with each suggestion written by `spell(setting, value)`."""
        spell = spell or (lambda setting, value: f"{setting}={value!r}")
        text = f"needs {_gib(self.need_bytes)}, {_gib(self.available_bytes)} available"
        if self.suggestions:
            return text + "; try " + ", ".join(spell(k, v) for k, v in self.suggestions.items())
        return text + "; no 4-bit base, rematerialization or shorter sequence alone fits either"


def plan_fit(
    config: ModelConfig,
    method: str,
    *,
    batch_size: int,
    seq_len: int,
    rank: int = 16,
    alpha: float = 32.0,
    dtype: Any = np.float32,
    quant: QuantConfig | None = None,
    available_bytes: int | None = None,
    remat: bool | None = None,
    grad_accum: int = 1,
    loss_chunk: int | None = None,
    remat_group: int | None = None,
    use_dora: bool = False,
    weight_init: bool = False,
) -> Plan:
    """The fastest setting of a fine-tuning step that fits the memory available.

    Compiles the step abstractly (`step_memory`; nothing is loaded or
    allocated) for the candidates in order of preference and stops at the
    first whose need fits: the whole batch without, then with
    rematerialization of every layer, then of groups of `REMAT_GROUP` layers
    (when the model has more); then micro-batches of `batch_size / k` rows with
    `k`-step gradient accumulation (`k` dividing `batch_size`, ascending),
    in the same three settings. A candidate needs its compiled
    step's peak, plus with accumulation the accumulated gradients and the
    batch's other rows, plus `need_bytes`'s allowance (10% + 512 MiB).

    Args:
        config: The architecture.
        method: "full", "lora" (16-bit or 32-bit frozen base) or "qlora".
        batch_size: Rows per optimizer update (the effective batch).
        seq_len: Tokens per row.
        rank: LoRA rank (adapters on all linear layers but the head).
        alpha: LoRA alpha.
        dtype: Base weights and compute dtype.
        quant: The 4-bit format of "qlora" (default NF4, block 64, double quant).
        available_bytes: Memory to fit in; default `available_memory()` of the first device.
        remat: None tries both; True or False only candidates with or without rematerialization.
        grad_accum: The accumulation to start from (micro-batches of at most
            `batch_size / grad_accum` rows); must divide `batch_size`.
        loss_chunk: Passed to `step_memory` (chunked cross-entropy) when set.
        remat_group: With rematerialization: None tries 1 then `REMAT_GROUP`; a number only that one.
        use_dora: DoRA adapters (`adapter_method_bytes`: the magnitudes' state and forward extra, per step).
        weight_init: An init that reads the weight (PiSSA, OLoRA, LoftQ): the loader's float32 projections and
            decompositions on top of the weights while loading (`adapter_method_bytes`).

    Returns:
        A `Plan`.

    Raises:
        DoesNotFit: Nothing fits; says the least need and which single change would fit.
        ValueError: Bad settings.

    Example:
        >>> from qlora_jax.models import ModelConfig
        >>> cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        ...                   num_kv_heads=2)
        >>> plan = plan_fit(cfg, "qlora", batch_size=2, seq_len=16, rank=4, available_bytes=2**30)
        >>> plan.remat, plan.micro_batch, plan.grad_accum, len(plan.candidates)
        (False, 2, 1, 1)
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {METHODS}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {value!r} is not a positive integer")
    if batch_size % grad_accum:
        raise ValueError(f"grad_accum: {grad_accum} does not divide batch_size {batch_size}")
    available = available_memory() if available_bytes is None else int(available_bytes)
    measure = _Measure(config, method, rank=rank, alpha=alpha, dtype=dtype, quant=quant, batch_size=batch_size,
                       seq_len=seq_len, loss_chunk=loss_chunk, available=available,
                       adapter_bytes=adapter_method_bytes(config, rank=rank, use_dora=use_dora and method != "full",
                                                          weight_init=weight_init and method != "full",
                                                          quantized=method == "qlora"))
    groups = (remat_group,) if remat_group is not None else (1, REMAT_GROUP)[:1 + (config.num_layers > REMAT_GROUP)]
    remats = [(False, 1)] * (remat is not True) + [(True, g) for g in groups] * (remat is not False)
    order = [(k, r, g) for k in _divisors(batch_size) if k >= grad_accum for r, g in remats]
    # The least need reported, and where single changes are tried: the smallest micro-batch, every layer's input kept
    # (groups of layers need less only for long sequences).
    frugal = next((c for c in reversed(order) if c[2] == 1), order[-1])
    tried: list[Candidate] = []
    weights_fit = True
    for k, r, g in order:
        candidate, memory = measure(batch_size // k, r, remat_group=g)
        tried.append(candidate)
        _logger.info("memory plan: micro-batch %d x %d, %s: needs %s of %s", batch_size // k, k, _remat_label(r, g),
                     _gib(candidate.need_bytes), _gib(available))
        if candidate.fits:
            return Plan(remat=r, remat_group=g, micro_batch=batch_size // k, grad_accum=k,
                        need_bytes=candidate.need_bytes, available_bytes=available, candidates=tuple(tried))
        weights_fit = measure.floor(memory, batch_size // k, seq_len) <= available
        if not weights_fit:  # the weights and optimizer state alone do not fit: no candidate can
            if (k, r, g) != frugal:
                tried.append(measure(batch_size // frugal[0], frugal[1], remat_group=frugal[2])[0])  # the least need
            break
    raise DoesNotFit(need_bytes=min(c.need_bytes for c in tried), available_bytes=available,
                     suggestions=_suggestions(measure, frugal, remat, weights_fit), candidates=tuple(tried))


class _Measure:
    """Compiles candidates of one configuration; remembers nothing but its settings."""

    def __init__(self, config: ModelConfig, method: str, *, batch_size: int, seq_len: int, available: int,
                 adapter_bytes: tuple[int, int] = (0, 0), **settings: Any):
        self.config, self.method, self.batch_size, self.seq_len = config, method, batch_size, seq_len
        self.available, self.settings = available, settings
        self.dora_bytes, self.init_bytes = adapter_bytes  # `adapter_method_bytes`

    def __call__(self, micro_batch: int, remat: bool, remat_group: int = 1, **changes: Any,
                 ) -> tuple[Candidate, MethodMemory]:
        method = changes.get("method", self.method)
        seq_len = changes.get("seq_len", self.seq_len)
        settings = dict(self.settings)
        if settings["loss_chunk"] is None:
            del settings["loss_chunk"]  # step_memory's own default
        if method != "qlora":
            settings["quant"] = None
        memory = step_memory(self.config, method, batch_size=micro_batch, seq_len=seq_len, remat=remat,
                             remat_group=remat_group if remat else 1, **settings)
        dora = self.dora_bytes if method != "full" else 0
        extra = dora
        if micro_batch < self.batch_size:  # the accumulated gradients and the batch's other rows
            extra += memory.gradient_bytes + _BATCH_BYTES_PER_TOKEN * (self.batch_size - micro_batch) * seq_len
        if self.init_bytes and method != "full":  # while loading: the weights, no optimizer state, no batch
            weights = memory.argument_bytes - memory.optimizer_bytes - _BATCH_BYTES_PER_TOKEN * micro_batch * seq_len
            extra = max(extra, weights + self.init_bytes - memory.compiled_total)
        need = need_bytes(memory.compiled_total + extra)
        candidate = Candidate(micro_batch=micro_batch, grad_accum=self.batch_size // micro_batch, remat=remat,
                              remat_group=remat_group if remat else 1, step_bytes=memory.compiled_total,
                              extra_bytes=extra, need_bytes=need,
                              fits=need <= self.available)
        return candidate, memory

    @staticmethod
    def floor(memory: MethodMemory, micro_batch: int, seq_len: int) -> int:
        """A lower bound of the need of every candidate with these weights: the step's inputs but the batch
        (weights, adapters, optimizer state), as a step never needs less than its inputs."""
        return need_bytes(memory.argument_bytes - _BATCH_BYTES_PER_TOKEN * micro_batch * seq_len)


def _suggestions(measure: _Measure, frugal: tuple[int, bool, int], remat: bool | None, weights_fit: bool,
                 ) -> dict[str, Any]:
    """Single changes that fit, each compiled at the most frugal candidate (the smallest micro-batch)."""
    micro, frugal_remat, group = measure.batch_size // frugal[0], frugal[1], frugal[2]
    found: dict[str, Any] = {}
    for cheaper in {"full": ("lora", "qlora"), "lora": ("qlora",), "qlora": ()}[measure.method]:
        if measure(micro, frugal_remat, remat_group=group, method=cheaper)[0].fits:
            found["method"] = cheaper
            break
    if remat is False and measure(micro, True)[0].fits:
        found["remat"] = True
    seq_len = measure.seq_len // 2
    while weights_fit and seq_len >= _MIN_SEQ_LEN:  # the longest halving that fits
        candidate, memory = measure(micro, frugal_remat, remat_group=group, seq_len=seq_len)
        if candidate.fits:
            found["seq_len"] = seq_len
            break
        weights_fit = measure.floor(memory, micro, seq_len) <= measure.available
        seq_len //= 2
    return found


def _divisors(n: int) -> Iterator[int]:
    return (k for k in range(1, n + 1) if n % k == 0)


def plan_table(candidates: tuple[Candidate, ...] | list[Candidate]) -> str:
    """A Markdown table of the candidates tried (GiB).

    Example:
        >>> print(plan_table([Candidate(micro_batch=4, grad_accum=1, remat=False, step_bytes=2**30, extra_bytes=0,
        ...                             need_bytes=need_bytes(2**30), fits=True)]))
        | micro-batch | grad accumulation | remat | step (GiB) | + accumulation (GiB) | need (GiB) | fits |
        |---|---|---|---|---|---|---|
        | 4 | 1 | off | 1.00 | 0.00 | 1.60 | yes |
    """
    lines = ["| micro-batch | grad accumulation | remat | step (GiB) | + accumulation (GiB) | need (GiB) | fits |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {c.micro_batch} | {c.grad_accum} | {_remat_label(c.remat, c.remat_group)[6:]} | "
              f"{c.step_bytes / 2**30:.2f} | "
              f"{c.extra_bytes / 2**30:.2f} | {c.need_bytes / 2**30:.2f} | {'yes' if c.fits else 'no'} |"
              for c in candidates]
    return "\n".join(lines)


def _remat_label(remat: bool, group: int) -> str:
    if not remat:
        return "remat off"
    return "remat on" if group == 1 else f"remat on (groups of {group})"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if abs(n) >= 2**30 else f"{n / 2**30:.2f} GiB"

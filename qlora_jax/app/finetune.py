"""A fine-tuning run from files: checkpoint + JSONL in, adapter + checkpoints + metrics out.

What `qlora-jax finetune` runs; usable from Python as `run_finetune(FinetuneArgs(...))`.
Before any weight is read, the step is planned to fit the memory available
(`plan_fit`: rematerialization, then micro-batches with gradient
accumulation that keep the rows per step), or the run is refused with what
it needs, before anything is written.
The output directory holds `run_config.json` (the settings as given, and the
memory plan applied),
`checkpoints/` (Orbax: adapters, optimizer, RNG and data position),
`metrics.jsonl` (one line per step and per evaluation), `loss.png` (matplotlib:
loss and learning rate per step), the final PEFT adapter in `adapter/`, and
with `report_to` TensorBoard event files in `tensorboard/` and a W&B run in
`wandb/` (`qlora_jax.app.report_to`).
With an init that reads the weight (`init`: PiSSA, OLoRA, LoftQ) the base
is a residual and `adapter/` applies over it, not over the original
checkpoint: `adapter_initial/` keeps the adapter at step 0, and PiSSA/OLoRA
runs also write `adapter_over_original/` (`save_peft_adapter_over_original`,
PEFT's conversion to a plain rank-2r LoRA adapter over the original
weights); `save_residual_base` writes the residual base itself to
`residual_base/` (LoftQ's pair for PEFT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere

from qlora_jax._src.checkpoint import DamagedCheckpointWarning
from qlora_jax._src.config import INITS, LoraConfig, QuantConfig, pissa_niter
from qlora_jax._src.data import Batcher, iter_rows, load_examples
from qlora_jax._src.formats.qarray import BLOCK_SIZES, FORMATS
from qlora_jax._src.models.config import ModelConfig
from qlora_jax._src.models.loading import checkpoint_dir, from_pretrained, load_config, load_tokenizer
from qlora_jax._src.models.peft_convert import save_peft_adapter_over_original, save_residual_base
from qlora_jax._src.models.peft_io import save_peft_adapter
from qlora_jax._src.models.safetensors_io import SafetensorsReader
from qlora_jax._src.sharding import make_mesh, shard_batch, shard_model
from qlora_jax._src.train import TrainConfig, Trainer
from qlora_jax._src.train.config import SCHEDULES
from qlora_jax.app.plan import DoesNotFit, Plan, plan_fit
from qlora_jax.app.plot import plot_loss
from qlora_jax.app.report_to import ReportTo, check_report_to

__all__ = ["FinetuneArgs", "initialize_distributed", "run_finetune"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneArgs:
    """Settings of a run; defaults follow the QLoRA paper's recipe (NF4 + double
    quant, adapters on all linear layers, lr 2e-4 constant with 3% warmup, max
    grad norm 0.3, AdamW without weight decay, r = 64, alpha = 16, dropout 0.05).

    Example:
        >>> from qlora_jax.app.finetune import FinetuneArgs
        >>> FinetuneArgs(model="m", data="d.jsonl", output="out").rank
        64
    """

    model: str
    data: str
    output: str
    eval_data: str | None = None
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"
    lr: float = 2e-4
    steps: int | None = None
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    warmup_ratio: float = 0.03
    schedule: str = "constant"
    max_grad_norm: float | None = 0.3
    eval_every: int = 0
    save_every: int = 0
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    dtype: str = "float32"
    format: str | None = "nf4"
    block_size: int = 64
    double_quant: bool = True
    remat: bool = False
    pack: bool = True
    mesh: str | None = None  # e.g. "data=2,fsdp=4" (see qj.make_mesh); None: one device
    strategy: str = "fsdp"  # how the model is sharded over the mesh (see qj.shard_model)
    fit: bool = True  # plan remat and micro-batches to fit the memory before loading (one device, one process)
    available_bytes: int | None = None  # memory the plan fits in; None: the device's free memory (host: MemAvailable)
    text_field: str | None = None  # the data's columns, when not named as a schema or a common layout (iter_rows)
    prompt_field: str | None = None
    completion_field: str | None = None
    messages_field: str | None = None
    report_to: str | tuple[str, ...] = "none"  # "tensorboard", "wandb", "tensorboard,wandb" (app.report_to)
    use_dora: bool = False  # DoRA adapters (LoraConfig.use_dora)
    init: str = "default"  # adapter init (LoraConfig.init): default, gaussian, pissa, pissa_niter_N, olora, loftq
    loftq_iter: int = 1  # LoftQ's alternations (LoraConfig.loftq_iter)
    save_residual_base: bool = False  # with a weight-reading init: write the residual base to residual_base/


# Settings added after run_config.json existed: a run recorded without them had their defaults.
_ADDED_DEFAULTS = {"use_dora": False, "init": "default", "loftq_iter": 1, "save_residual_base": False}


def _check_output(args: FinetuneArgs) -> Path:
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        if args.resume:
            if not (out / "run_config.json").is_file():
                raise ValueError(f"--resume: {out} holds no run (no run_config.json)")
        elif not args.overwrite:
            raise ValueError(f"--output: {out} already holds files (another run?); pass --resume to continue it "
                             "or --overwrite to replace it")
    elif args.resume:
        raise ValueError(f"--resume: {out} holds no run to resume")
    return out


def _data_fields(args: FinetuneArgs) -> dict[str, str | None]:
    return {k: getattr(args, k) for k in ("text_field", "prompt_field", "completion_field", "messages_field")}


def _check_data(args: FinetuneArgs, rows: int = 64) -> None:
    """Reads the first `rows` rows of `--data` and `--eval-data` through `iter_rows` (every row is checked when
    the data is tokenized, still before anything is written)."""
    for source in (args.data, args.eval_data):
        if source is not None:
            for _ in zip(range(rows), iter_rows(source, **_data_fields(args)), strict=False):
                pass


def _check_settings(args: FinetuneArgs) -> None:
    """Refuses a setting out of range, naming its flag; reads nothing.

    Example:
        >>> _check_settings(FinetuneArgs(model="m", data="d.jsonl", output="out", steps=0))
        Traceback (most recent call last):
        ...
        ValueError: --steps: must be an integer >= 1, got 0
    """
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def check(name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(f"{flag(name)}: must be {expected}, got {getattr(args, name)!r}")

    def is_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

    def is_number(value: Any) -> bool:
        return is_int(value) or (isinstance(value, (float, np.floating)) and np.isfinite(value))

    for name, minimum in (("steps", 1), ("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("seq_len", 1),
                          ("rank", 1), ("eval_every", 0), ("save_every", 0), ("seed", 0)):
        value = getattr(args, name)
        if name != "steps" or value is not None:
            check(name, is_int(value) and value >= minimum, f"an integer >= {minimum}")
    for name in ("alpha", "lr"):
        check(name, is_number(getattr(args, name)) and getattr(args, name) > 0, "a positive number")
    check("dropout", is_number(args.dropout) and 0 <= args.dropout < 1, "a number in [0, 1)")
    check("warmup_ratio", is_number(args.warmup_ratio) and 0 <= args.warmup_ratio <= 1, "a number in [0, 1]")
    if args.max_grad_norm is not None:
        check("max_grad_norm", is_number(args.max_grad_norm) and args.max_grad_norm > 0, "a positive number")
    check("schedule", args.schedule in SCHEDULES, f"one of {SCHEDULES}")
    check("dtype", args.dtype in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16")
    check("format", args.format is None or args.format in FORMATS, f"one of {sorted(FORMATS)} or None")
    if args.format is not None:  # any layer shape: blocks cross rows where they do not divide the input size
        check("block_size", args.block_size in BLOCK_SIZES and not isinstance(args.block_size, bool),
              f"one of {BLOCK_SIZES}")
    check("use_dora", isinstance(args.use_dora, (bool, np.bool_)), "True or False")
    check("init", isinstance(args.init, str) and (args.init in INITS and args.init != "pissa_niter_N"
                                                  or pissa_niter(args.init) is not None),
          f"one of {', '.join(i for i in INITS if i != 'pissa_niter_N')} or pissa_niter_N with an integer N >= 1 "
          "(e.g. pissa_niter_4)")
    check("loftq_iter", is_int(args.loftq_iter) and args.loftq_iter >= 1, "an integer >= 1")
    if args.loftq_iter != 1 and args.init != "loftq":
        raise ValueError(f"--loftq-iter: {args.loftq_iter} is for --init loftq only, got --init {args.init}")
    if args.init == "loftq" and args.format is None:
        raise ValueError("--init loftq: needs a quantized base (LoftQ picks the 4-bit base and the adapter "
                         "together), not --format none")
    if args.save_residual_base and not _weight_init(args):
        raise ValueError(f"--save-residual-base: only with an init that reads the weight (pissa, pissa_niter_N, "
                         f"olora, loftq), got --init {args.init}")
    if args.save_residual_base and args.use_dora:
        raise ValueError("--save-residual-base: not with --use-dora (a DoRA layer's base is not what a zero "
                         "adapter leaves)")


def _weight_init(args: FinetuneArgs) -> bool:
    """Whether `args.init` reads the base weight (PiSSA, OLoRA, LoftQ): `adapter/` then applies over a residual."""
    return args.init in ("pissa", "olora", "loftq") or pissa_niter(args.init) is not None


def run_finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Runs the fine-tuning described by `args`; returns a summary dict.

    Everything that can be checked without reading a weight is checked
    before anything is written: the settings, the model's config and
    safetensors headers, the tokenizer, the data and the memory plan. A run
    that cannot start leaves `output` as it was; `run_config.json` is written
    once the model is loaded.

    Raises:
        FileNotFoundError: A missing model or data file, or a `model` that
            names no directory and no hub id that resolves.
        ValueError: Bad settings (named by their flags), a truncated
            safetensors file (named), an empty dataset, a sequence length
            above the model's maximum, an output directory that holds another
            run (unless `resume` or `overwrite`), or a run whose settings
            differ from the one being resumed.
        DoesNotFit: (a ValueError) with `fit`, no setting of the step fits the
            memory available; raised before anything is written.

    Example:
        >>> from qlora_jax.app.finetune import FinetuneArgs, run_finetune
        >>> run_finetune(FinetuneArgs(model="/nonexistent", data="d.jsonl", output="/tmp/x"))
        Traceback (most recent call last):
        ...
        FileNotFoundError: /nonexistent: no config.json (not a Hugging Face checkpoint directory)
    """
    _check_settings(args)
    check_report_to(args.report_to)  # a writer's package that is missing: named, with its pip install
    config = load_config(args.model)
    mesh = None if args.mesh is None else make_mesh(args.mesh)
    out = _check_output(args)
    _check_data(args)  # the data's first rows (format, columns, schema), before the memory plan compiles
    main_process = jax.process_index() == 0
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len: {args.seq_len} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    SafetensorsReader(checkpoint_dir(args.model))  # the headers against the file sizes: a truncated file, named
    requested = args  # the settings as given: recorded, and compared on --resume
    plan = _memory_plan(args, config, out) if args.fit and mesh is None and jax.process_count() == 1 else None
    if plan is not None:
        if main_process:
            print(f"memory plan: {plan.describe()}")
        args = dataclasses.replace(args, remat=plan.remat, batch_size=plan.micro_batch, grad_accum=plan.grad_accum)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise ValueError(f"--model: {args.model} has no tokenizer files; the data cannot be tokenized")
    examples, stats = load_examples(args.data, tokenizer, args.seq_len, **_data_fields(args))
    batcher = Batcher(examples, args.batch_size * args.grad_accum, args.seq_len, pack=args.pack, shuffle=True,
                      seed=args.seed, num_epochs=None)
    steps = args.steps or max(1, args.epochs * batcher.num_batches_per_epoch)
    eval_examples = None
    if args.eval_data:
        eval_examples, _ = load_examples(args.eval_data, tokenizer, args.seq_len, **_data_fields(args))

    def eval_batches() -> Batcher:
        return Batcher.for_eval(eval_examples, args.batch_size, args.seq_len, pack=args.pack)

    resolved = {**dataclasses.asdict(requested), "steps": steps, "data_stats": dataclasses.asdict(stats),
                "memory_plan": None if plan is None else plan.to_dict()}
    if args.resume:
        previous = json.loads((out / "run_config.json").read_text())
        # How the step is run (the plan, and what it was made for) may change between sessions; what is trained not.
        changed = {k: (previous.get(k, _ADDED_DEFAULTS.get(k)), v) for k, v in resolved.items()
                   if k not in ("resume", "overwrite", "output", "mesh", "strategy", "fit", "available_bytes",
                                "memory_plan", "report_to", "save_residual_base")
                   and previous.get(k, _ADDED_DEFAULTS.get(k)) != v}
        if changed:
            raise ValueError(f"--resume: settings differ from the run in {out}: {changed}")
    quant = None if args.format is None else QuantConfig(fmt=args.format, block_size=args.block_size,
                                                          double_quant=args.double_quant)
    targets = args.targets if isinstance(args.targets, str) else list(args.targets)
    lora = LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets,
                      use_dora=args.use_dora, init=args.init, loftq_iter=args.loftq_iter)
    train_config = TrainConfig(total_steps=steps, lr=args.lr, schedule=args.schedule,
                               warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
                               grad_accum=args.grad_accum, seed=args.seed)
    model = from_pretrained(args.model, quant=quant, lora=lora, dtype=jnp.dtype(args.dtype), remat=args.remat,
                            rngs=nnx.Rngs(args.seed), progress=True)
    if plan is not None:
        model.remat_group = plan.remat_group  # the planner's pick (1 unless only groups of layers fit)
    trainer = Trainer(model, train_config)
    if mesh is not None:
        shard_model(model, mesh, args.strategy, optimizer=trainer.optimizer)
    # The run starts here: nothing was written to --output before (a run that could not start leaves it as it was).
    _sync("checked the output directory")  # every process has looked at --output before process 0 writes
    out.mkdir(parents=True, exist_ok=True)
    if main_process:
        if not args.resume:
            for name in ("metrics.jsonl", "loss.png"):
                (out / name).unlink(missing_ok=True)
            for name in ("adapter_initial", "adapter_over_original", "residual_base"):  # a replaced run's exports
                shutil.rmtree(out / name, ignore_errors=True)
        _write_json(out / "run_config.json", resolved)
    checkpoints = out / "checkpoints"
    if main_process and _weight_init(args) and not args.resume:  # the factors at step 0, for PEFT's conversion
        save_peft_adapter(model, out / "adapter_initial", base_model_name_or_path=str(args.model))
    if args.resume:
        _resume(trainer, batcher, checkpoints, main_process)
    # Metrics written after the restored checkpoint (a killed run) are dropped.
    logged = _read_metrics(out / "metrics.jsonl")
    history = [r for r in logged if r["step"] <= trainer.step]
    if main_process:
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    report = ReportTo.open(args.report_to if main_process else "none", out, config=resolved,
                           resume_step=trainer.step if args.resume else None,
                           logged_through=max((r["step"] for r in logged), default=0), history=history)
    try:
        return _train(args, trainer, batcher, model, out, checkpoints, steps, history, report, eval_examples,
                      eval_batches, place=lambda batch: batch if mesh is None else shard_batch(batch, mesh))
    finally:
        report.close()


def _train(args: FinetuneArgs, trainer: Trainer, batcher: Batcher, model: Any, out: Path, checkpoints: Path,
           steps: int, history: list[dict[str, Any]], report: ReportTo, eval_examples: Any, eval_batches: Any,
           place: Any) -> dict[str, Any]:
    """The training loop of `run_finetune`, the final evaluation and the adapter; each row to `history`,
    `metrics.jsonl` and `report`."""
    main_process = jax.process_index() == 0

    def log(row: dict[str, Any]) -> None:
        history.append(row)
        if main_process:
            _append_jsonl(out / "metrics.jsonl", row)
            report.log(row)

    bar = tqdm(total=steps, initial=trainer.step, desc="finetune", unit="step", disable=not main_process)
    saved_step = trainer.step if args.resume else -1
    with _StopOnInterrupt() as stop:
        while trainer.step < steps and not stop.requested:
            batch = next(batcher)
            start = time.perf_counter()
            metrics = {k: float(v) for k, v in trainer.train_step(place(batch)).items()}
            seconds = time.perf_counter() - start
            tokens = float(np.sum(batch["weights"]))
            where, peak = peak_memory()
            log({"step": trainer.step, **metrics, "seconds": seconds, "tokens_per_s": tokens / seconds,
                 "peak_memory_gib": peak / 2**30})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens / seconds:.0f}",
                            mem=f"{where} {peak / 2**30:.2f}GiB")
            if eval_examples is not None and args.eval_every and trainer.step % args.eval_every == 0:
                result = trainer.evaluate(eval_batches())
                log({"step": trainer.step, "eval_loss": result["loss"]})
            if args.save_every and trainer.step % args.save_every == 0 and trainer.step < steps:
                trainer.save(checkpoints, batcher.state())
                saved_step = trainer.step
        bar.close()
        if saved_step != trainer.step:
            trainer.save(checkpoints, batcher.state())
        if stop.requested and trainer.step < steps:
            if main_process:
                _plot(out / "loss.png", history)
            print(f"interrupted: saved step {trainer.step} of {steps} in {checkpoints}; continue with --resume",
                  file=sys.stderr)
            raise KeyboardInterrupt(f"finetune interrupted at step {trainer.step}")
    model.eval()
    summary = {"steps": trainer.step, "final_loss": history[-1].get("loss") if history else None}
    if eval_examples is not None:
        result = trainer.evaluate(eval_batches())
        summary["eval_loss"] = result["loss"]
        log({"step": trainer.step, "eval_loss": result["loss"]})
    adapters = nnx.state(model, nnx.LoRAParam)
    if not all(x.is_fully_addressable for x in jax.tree.leaves(adapters)):  # sharded across processes
        nnx.update(model, multihost_utils.process_allgather(adapters, tiled=True))
    if main_process:
        save_peft_adapter(model, out / "adapter", base_model_name_or_path=str(args.model))
        _plot(out / "loss.png", history)
        if _weight_init(args):
            summary["peft_export"] = _export_for_peft(args, model, out)
    return summary


def _export_for_peft(args: FinetuneArgs, model: Any, out: Path) -> str:
    """With a weight-reading init, what PEFT needs beside `adapter/` (which applies over the residual base only);
    returns one line saying what was written and how PEFT loads it."""
    lines = []
    if args.init != "loftq":
        save_peft_adapter_over_original(model, out / "adapter_over_original", initial_adapter=out / "adapter_initial",
                                        base_model_name_or_path=str(args.model))
        lines.append(f"{out / 'adapter_over_original'}: a plain LoRA adapter over the original checkpoint "
                     f"(PeftModel.from_pretrained(original, that directory)"
                     + (f"; over a {args.format} base it differs by the quantization error)" if args.format else ")"))
    if args.save_residual_base:
        save_residual_base(model, out / "residual_base", tokenizer_from=args.model
                           if Path(args.model).is_dir() else None)
        lines.append(f"{out / 'residual_base'}: the residual base (PeftModel.from_pretrained(that checkpoint, "
                     f"{out / 'adapter'}))")
    elif args.init == "loftq":
        lines.append(f"{out / 'adapter'} applies over LoftQ's residual base only: "
                     + ("" if args.use_dora else "write it with --save-residual-base (model-sized) or "
                        "qlora_jax.models.save_residual_base, or ")
                     + f"evaluate with qlora-jax eval --adapter {out}")
    return "; ".join(lines)


def _resume(trainer: Trainer, batcher: Batcher, checkpoints: Path, main_process: bool) -> None:
    """Restores the latest intact checkpoint and the data position; without one, the run starts over.

    A damaged latest checkpoint is skipped for the one before it; both that
    and starting over are said on stderr (the run killed before its first
    checkpoint was complete goes on with `--resume` as well).
    """
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DamagedCheckpointWarning)
        try:
            batcher.restore(trainer.restore(checkpoints))
        except FileNotFoundError as e:  # no checkpoint, or none intact (named); a different config still stops
            notes.append(f"{e}: starting over from step 0")
    for warning in caught:
        if issubclass(warning.category, DamagedCheckpointWarning):
            notes.insert(0, str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if main_process:
        for note in notes:
            print(f"qlora-jax finetune: warning: {note}", file=sys.stderr)


def _memory_plan(args: FinetuneArgs, config: ModelConfig, out: Path) -> Plan:
    """The plan of the run's step (`plan_fit`), made before any weight is read.

    The batch to fit is `batch_size * grad_accum` rows, in micro-batches of at
    most `batch_size`; `remat` asks for rematerialized candidates only. On
    `resume`, the saved run's pick is tried first, so a resumed run keeps its
    numerics where it still fits.

    Raises:
        DoesNotFit: Nothing fits; the message names this command's flags.
    """
    method = "lora" if args.format is None else "qlora"
    quant = None if args.format is None else QuantConfig(fmt=args.format, block_size=args.block_size,
                                                         double_quant=args.double_quant)
    settings = dict(config=config, method=method, batch_size=args.batch_size * args.grad_accum, seq_len=args.seq_len,
                    rank=args.rank, alpha=args.alpha, dtype=jnp.dtype(args.dtype), quant=quant,
                    available_bytes=args.available_bytes, loss_chunk=TrainConfig.loss_chunk,
                    use_dora=args.use_dora, weight_init=_weight_init(args))
    saved = json.loads((out / "run_config.json").read_text()).get("memory_plan") if args.resume else None
    if saved and saved["micro_batch"] * saved["grad_accum"] == settings["batch_size"]:
        try:  # the saved pick is the first candidate; where it no longer fits, a fresh plan is made
            plan = plan_fit(**settings, remat=saved["remat"], grad_accum=saved["grad_accum"],
                            remat_group=saved.get("remat_group", 1))
            if len(plan.candidates) == 1:
                return plan
        except DoesNotFit:
            pass
    try:
        return plan_fit(**settings, remat=True if args.remat else None, grad_accum=args.grad_accum)
    except DoesNotFit as e:
        raise e.spelled(_finetune_flag) from None


def _finetune_flag(setting: str, value: Any) -> str:
    """How `finetune` spells a suggested change."""
    return {"method": "--format nf4", "remat": "--remat", "seq_len": f"--seq-len {value}"}[setting]


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins a multi-process run (`jax.distributed.initialize`) before JAX is used.

    With no arguments JAX detects the cluster (Slurm, Open MPI, Cloud TPU, ...).
    On CPU the processes exchange data over gloo. Call it first, in every
    process; the checkpoint directory must be shared storage.

    Args:
        coordinator: `host:port` of process 0.
        num_processes: The number of processes.
        process_id: This process's index, `0 <= process_id < num_processes`.

    Example:
        Two hosts run `initialize_distributed("10.0.0.1:1234", 2, 0)` and
        `initialize_distributed("10.0.0.1:1234", 2, 1)`. A run of one process
        (its own coordinator), in a fresh Python process as JAX must not have
        started:

        >>> import socket, subprocess, sys
        >>> with socket.socket() as s:  # a free port
        ...     s.bind(("localhost", 0))
        ...     port = s.getsockname()[1]
        >>> code = f'''
        ... import jax
        ... from qlora_jax.app.finetune import initialize_distributed
        ... initialize_distributed("localhost:{port}", num_processes=1, process_id=0)
        ... print(jax.process_count(), jax.process_index())
        ... '''
        >>> run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        >>> print(run.stdout.strip())  # jax.process_count(), jax.process_index()
        1 0
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _plot(path: Path, history: list[dict[str, Any]]) -> None:
    plot_loss(path, history, title="qlora-jax finetune")  # train and eval loss; the learning rate below


class _StopOnInterrupt:
    """Turns the first Ctrl-C (SIGINT) into a request to stop after the current step and its checkpoint.

    A step or a checkpoint save that is under way is never cut short by the
    first Ctrl-C; a second one raises `KeyboardInterrupt` at once (a save cut
    short that way is discarded by Orbax, the previous checkpoint stays).
    Outside the main thread (where Python cannot handle signals), or where
    SIGINT is ignored, it does nothing.
    """

    def __enter__(self) -> _StopOnInterrupt:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not (
                signal.SIG_IGN):  # a process that ignores SIGINT (e.g. started with nohup) keeps ignoring it
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def peak_memory() -> tuple[str, int]:
    """The memory a step row records (`peak_memory_gib`) and the progress bar shows: `("device", bytes)`, the
    device's peak bytes in use where JAX reports them (GPU, TPU), else `("host", bytes)`, this process's peak
    resident host memory (CPU).

    Example:
        >>> where, peak = peak_memory()
        >>> where in ("device", "host") and peak > 0
        True
    """
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
    if peak is not None:
        return "device", int(peak)
    return "host", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_in_use() -> str:
    """`peak_memory()` as the progress bar shows it.

    Example:
        >>> memory_in_use().split()[0] in ("device", "host")
        True
    """
    where, peak = peak_memory()
    return f"{where} {peak / 2**30:.2f}GiB"


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

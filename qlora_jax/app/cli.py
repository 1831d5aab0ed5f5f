"""The `qlora-jax` command line.

Subcommands:

* `finetune --model PATH --data train.jsonl --output DIR`: QLoRA fine-tuning
  (see `qlora-jax finetune --help` for the options, named as in PEFT/HF).
* `generate --model PATH [--adapter DIR] --prompt TEXT`: greedy or sampled
  generation with a KV cache (chat template when the tokenizer has one).
* `export --model PATH --adapter DIR --merged OUT`: a Hugging Face checkpoint
  with the adapter merged into the dequantized base.
* `eval --model PATH [--adapter DIR] --data FILE [--samples N] [--json]`:
  perplexity over the loss-carrying tokens of the data (the training masks),
  the token count, and optional greedy generations (`qlora_jax.app.eval`).
* `memory --model PRESET|PATH`: the memory of one fine-tuning step for full
  fine-tuning, 16-bit LoRA and QLoRA, the paper's formulas next to what the
  compiled step needs (`memory_analysis()` with abstract shapes).
  `memory --model PRESET|PATH --fit [--method qlora|lora|full]` plans one
  method instead: the fastest of rematerialization and micro-batches with
  gradient accumulation that fits the memory available (`--available-gib`,
  default the device's free memory), or exit 2 with what it needs.
* `demo` (also what a bare `qlora-jax` runs): QLoRA next to 32-bit LoRA, end
  to end in a few minutes on a CPU. A small Llama-family stand-in base is
  pre-trained from scratch on a synthetic corpus (cached in `--output`), then
  fine-tuned on reversing words with NF4 + double quant + rank-8 LoRA and with
  LoRA over the float32 base; prints a Markdown table (eval loss, exact-match
  accuracy, base bytes/param, compiled step memory, median step time) and
  writes `loss.png` and `demo.json`. `--model PATH` fine-tunes a Hugging Face
  checkpoint instead; `--quick` is a seconds-long smoke test.
  `demo --formats-only` quantizes a built-in random Gaussian layer stack in
  every format (nf4, fp4, int4, int8; with and without double quantization),
  prints bytes per parameter and the relative MSE against the float32 weights,
  checks that an NF4 kernel survives a bitsandbytes export/import (`to_bnb` /
  `from_bnb`) unchanged, and writes the table to `<output>/quantization.json`.

Example:
    $ qlora-jax demo --output qlora_jax_demo/
    $ qlora-jax demo --formats-only --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere

import qlora_jax as qj
from qlora_jax._src.memory import METHODS, step_memory
from qlora_jax._src.models.config import ModelConfig
from qlora_jax._src.models.loading import load_config
from qlora_jax.app import demo
from qlora_jax.app.eval import EvalArgs, inference_model, main_eval
from qlora_jax.app.finetune import FinetuneArgs, initialize_distributed, run_finetune
from qlora_jax.app.plan import RESERVE_BYTES, RESERVE_FRACTION, DoesNotFit, plan_fit, plan_table
from qlora_jax.app.report import PRESETS, memory_table
from qlora_jax.app.runtime import configure_cpu_for_command

__all__ = ["main"]

DEFAULT_OUTPUT = Path("qlora_jax_demo")


def main(argv: list[str] | None = None) -> int:
    """Runs `qlora-jax`; returns the exit code.

    Args:
        argv: Arguments after the program name; default `sys.argv[1:]`.

    Returns:
        0 on success, 1 when a check fails (argparse exits with 2 on bad usage).

    Example:
        `main([])` runs the demo (minutes). Merging an adapter into its base
        (`checkpoint`: a tiny Llama checkpoint directory with a tokenizer;
        `adapter_dir`: a PEFT adapter saved for it; `tmp`: an empty
        directory):

        >>> main(["export", "--model", str(checkpoint), "--adapter", str(adapter_dir),
        ...       "--merged", str(tmp / "merged")])  # doctest: +ELLIPSIS
        merged checkpoint written to .../merged
        0
        >>> sorted(f.name for f in (tmp / "merged").iterdir())
        ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']

        A usage error (here: no `--adapter`) exits as argparse does:

        >>> main(["export", "--model", str(checkpoint), "--merged", str(tmp / "merged")])
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    parser = _build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:  # a bare `qlora-jax` runs the default job
        args = parser.parse_args(["demo"])
    return args.func(args)


def _build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands.

    Example:
        >>> _build_parser().parse_args(["demo", "--seed", "3"]).seed
        3
    """
    parser = argparse.ArgumentParser(
        prog="qlora-jax", description="QLoRA tooling in JAX. Without a command, runs `demo`.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {qj.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo_cmd = commands.add_parser(
        "demo", help="QLoRA vs 32-bit LoRA on a small built-in model, on this machine, in a few minutes",
        description=("Pre-trains a small Llama-family stand-in base on a synthetic corpus (cached in --output), "
                     "fine-tunes it to reverse words with QLoRA (NF4 + double quant, rank-8 LoRA on all linear "
                     "layers) and with LoRA over the float32 base, and prints eval loss, exact-match accuracy, "
                     "base bytes/param, compiled step memory and median step time; writes loss.png and demo.json. "
                     f"With --formats-only: quantizes a random Gaussian layer stack ({demo.STACK_LAYERS} layers, "
                     f"kernels {' and '.join(demo.shape_str(s) for s in demo.STACK_SHAPES)}) to "
                     f"{', '.join(demo.STACK_FORMATS)} (block {demo.STACK_BLOCK_SIZE}, with and without double "
                     "quantization), prints bytes/param and the relative MSE against the float32 weights, checks "
                     "that an NF4 kernel is unchanged by a bitsandbytes export/import round trip, and writes "
                     "quantization.json."))
    demo_cmd.add_argument("--seed", type=int, default=0, help="seed of the corpus, the base and the adapters, or "
                                                              "of the random weights with --formats-only (default 0)")
    demo_cmd.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                          help=f"folder for loss.png, demo.json and the cached base (default {DEFAULT_OUTPUT}/)")
    demo_cmd.add_argument("--formats-only", action="store_true",
                          help="only the quantization table of a random layer stack (writes quantization.json)")
    demo_cmd.add_argument("--model", default=None,
                          help="a Hugging Face checkpoint directory to fine-tune instead of the stand-in base")
    demo_cmd.add_argument("--quick", action="store_true",
                          help="tiny sizes and a few steps: a smoke test of the pipeline, not a result")
    demo_cmd.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps of the stand-in base")
    demo_cmd.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps per method")
    demo_cmd.set_defaults(func=_run_demo)

    finetune = commands.add_parser(
        "finetune", help="QLoRA fine-tuning of a Hugging Face checkpoint on a dataset",
        description=("Loads the checkpoint quantized (NF4 + double quant by default), adds LoRA adapters, trains "
                     "them on the data's rows ({'text'}, {'prompt','completion'}, {'messages'} or a common layout; "
                     "JSONL, JSON, CSV, Parquet, Arrow, a save_to_disk directory or a hub dataset) and writes a PEFT "
                     "adapter, Orbax checkpoints, metrics.jsonl, loss.png and run_config.json to --output. "
                     "Defaults follow the QLoRA paper."))
    f = FinetuneArgs
    finetune.add_argument("--model", required=True, help="checkpoint directory or hub id (org/name)")
    finetune.add_argument("--data", required=True, help="training data: a .jsonl, .json, .csv, .parquet or .arrow "
                          "file, a datasets save_to_disk directory, or a hub dataset org/name[:split]")
    finetune.add_argument("--output", required=True, help="run directory")
    finetune.add_argument("--eval-data", default=None, help="evaluation data (as --data)")
    for field, what in (("text", "plain text"), ("prompt", "prompts"), ("completion", "completions"),
                        ("messages", "conversations (role/content or ShareGPT from/value)")):
        finetune.add_argument(f"--{field}-field", default=None,
                              help=f"the data's column of {what}, when not named as a schema or a common layout")
    finetune.add_argument("--rank", type=int, default=f.rank, help=f"LoRA rank (default {f.rank})")
    finetune.add_argument("--alpha", type=float, default=f.alpha, help=f"LoRA alpha (default {f.alpha:g})")
    finetune.add_argument("--dropout", type=float, default=f.dropout, help=f"LoRA dropout (default {f.dropout})")
    finetune.add_argument("--targets", nargs="+", default=[f.targets],
                          help="'all-linear' (default), module names (q_proj v_proj ...) or one regex")
    finetune.add_argument("--use-dora", action="store_true",
                          help="DoRA adapters (QDoRA over a 4-bit base): a trained magnitude per output")
    finetune.add_argument("--init", default=f.init, metavar="{default,gaussian,pissa,pissa_niter_N,olora,loftq}",
                          help="adapter init (default: kaiming-uniform A, zero B); pissa, pissa_niter_N (randomized "
                               "SVD, N iterations), olora and loftq read each targeted weight while loading and "
                               "train over the residual base: the run also writes adapter_over_original/ (pissa, "
                               "olora) for PEFT over the original checkpoint")
    finetune.add_argument("--loftq-iter", type=int, default=f.loftq_iter,
                          help="LoftQ's alternations of quantization and SVD (with --init loftq; default 1)")
    finetune.add_argument("--save-residual-base", action="store_true",
                          help="with --init pissa/olora/loftq: also write the residual base (model-sized, float32) "
                               "to --output/residual_base/, the base adapter/ applies to in PEFT")
    finetune.add_argument("--lr", type=float, default=f.lr, help=f"peak learning rate (default {f.lr})")
    finetune.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    finetune.add_argument("--epochs", type=int, default=f.epochs, help=f"epochs when --steps is not given "
                                                                         f"(default {f.epochs})")
    finetune.add_argument("--batch-size", type=int, default=f.batch_size, help=f"rows per micro-batch "
                                                                                 f"(default {f.batch_size})")
    finetune.add_argument("--grad-accum", type=int, default=f.grad_accum, help="micro-batches per step (default 1)")
    finetune.add_argument("--seq-len", type=int, default=f.seq_len, help=f"tokens per row (default {f.seq_len})")
    finetune.add_argument("--warmup-ratio", type=float, default=f.warmup_ratio, help="default 0.03")
    finetune.add_argument("--schedule", choices=["constant", "linear", "cosine"], default=f.schedule)
    finetune.add_argument("--max-grad-norm", type=float, default=f.max_grad_norm, help="default 0.3; 0 disables")
    finetune.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    finetune.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    finetune.add_argument("--resume", action="store_true", help="continue the run in --output")
    finetune.add_argument("--overwrite", action="store_true", help="replace a run in --output")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=f.dtype,
                          help="compute dtype: activations and matmuls, the quantized kernels dequantized to it; "
                               "the weights are kept in float32 (embeddings, norms, lm_head, LoRA factors, the "
                               "projections with --format none) and cast to it where used (default float32; "
                               "bfloat16 is the usual choice on GPU/TPU)")
    finetune.add_argument("--format", choices=["nf4", "fp4", "int4", "int8", "none"], default="nf4",
                          help="base weight format; 'none' trains 16/32-bit LoRA (default nf4)")
    finetune.add_argument("--block-size", type=int, default=f.block_size)
    finetune.add_argument("--no-double-quant", action="store_true")
    finetune.add_argument("--remat", action="store_true", help="rematerialize layers in the backward pass")
    finetune.add_argument("--no-fit", action="store_true",
                          help="do not plan the memory: by default, before any weight is read, the step is compiled "
                               "abstractly and, where the batch does not fit, rematerialization and then smaller "
                               "micro-batches with gradient accumulation (the same rows per step) are used; a run "
                               "that cannot fit is refused (exit 2)")
    finetune.add_argument("--available-gib", type=float, default=None,
                          help="memory the plan fits in (default: the device's free memory; the host's MemAvailable "
                               "on CPU)")
    finetune.add_argument("--no-pack", action="store_true", help="pad each example instead of packing")
    finetune.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=4 or data=2,tensor=4 (axes "
                          "data, fsdp, tensor; sizes multiply to the number of devices of all processes)")
    finetune.add_argument("--strategy", default="fsdp", choices=["fsdp", "tp", "fsdp+tp"],
                          help="how the model is sharded over --mesh (default fsdp)")
    finetune.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0 "
                          "(jax.distributed.initialize)")
    finetune.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    finetune.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    finetune.add_argument("--distributed", action="store_true",
                          help="multi-host with JAX's cluster auto-detection (Slurm, Cloud TPU, ...)")
    finetune.add_argument("--report-to", nargs="+", default=["none"], metavar="NAME",
                          help="also log the metrics (loss, learning rate, grad norm, tokens/s, peak memory, eval "
                               "loss) to tensorboard (event files in --output/tensorboard/), wandb (--output/wandb/; "
                               "offline without an API key or connection) or both (tensorboard,wandb); default none")
    finetune.set_defaults(func=_run_finetune)

    for name, helptext in (("generate", "generate text with a checkpoint and an optional adapter"),
                           ("export", "merge an adapter into the dequantized base; write a Hugging Face checkpoint")):
        sub = commands.add_parser(name, help=helptext, description=helptext)
        sub.add_argument("--model", required=True, help="checkpoint directory or hub id")
        sub.add_argument("--adapter", default=None, required=name == "export",
                         help="PEFT adapter directory, or a finetune --output directory (with the run's settings: a "
                              "PiSSA/OLoRA/LoftQ run's base is computed again as in training)")
        sub.add_argument("--format", choices=["nf4", "fp4", "int4", "int8", "none"], default="nf4",
                         help="base weight format the adapter was trained on (default nf4)")
        sub.add_argument("--block-size", type=int, default=64)
        sub.add_argument("--no-double-quant", action="store_true")
        if name == "generate":
            sub.add_argument("--prompt", required=True)
            sub.add_argument("--max-new-tokens", type=int, default=64)
            sub.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
            sub.add_argument("--top-p", type=float, default=1.0)
            sub.add_argument("--seed", type=int, default=0)
            sub.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                             help="compute dtype of the forward passes and of the KV cache; the weights are kept "
                                  "in float32 (default float32)")
            sub.set_defaults(func=_run_generate)
        else:
            sub.add_argument("--merged", required=True, help="output directory of the merged checkpoint")
            sub.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                             help="dtype of every tensor of the merged checkpoint (the merge W + s * B @ A is "
                                  "computed in float32 and cast once; default float32)")
            sub.set_defaults(func=_run_export)

    evaluate = commands.add_parser(
        "eval", help="perplexity of a checkpoint (+ adapter) on a dataset, over the tokens that carry loss",
        description=("Tokenizes --data as finetune does (the same loss masks, truncation and packing) and prints "
                     "the perplexity exp(mean cross entropy) over the tokens that carry loss, their count and, with "
                     "--samples N, greedy generations from the first N examples' prompts. --adapter takes a PEFT "
                     "adapter directory or a finetune --output directory (whose run_config.json gives the defaults "
                     "of --format, --block-size, double quantization and --seq-len)."))
    evaluate.add_argument("--model", required=True, help="checkpoint directory or hub id")
    evaluate.add_argument("--data", required=True, help="evaluation data (as finetune's --data)")
    for field in ("text", "prompt", "completion", "messages"):
        evaluate.add_argument(f"--{field}-field", default=None, help="as finetune's (default: the run's)")
    evaluate.add_argument("--adapter", default=None, help="PEFT adapter directory or finetune --output directory")
    evaluate.add_argument("--samples", type=int, default=0, help="greedy generations of the first N examples")
    evaluate.add_argument("--max-new-tokens", type=int, default=32, help="tokens per generation (default 32)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    evaluate.add_argument("--seq-len", type=int, default=None,
                          help="tokens per row; longer rows are truncated (default: the run's, else 512 or the "
                               "model's max_position_embeddings if smaller)")
    evaluate.add_argument("--batch-size", type=int, default=4, help="rows per batch (default 4)")
    evaluate.add_argument("--format", choices=["nf4", "fp4", "int4", "int8", "none"], default=None,
                          help="base weight format (default: the run's, else nf4; 'none': the float base)")
    evaluate.add_argument("--block-size", type=int, default=None, help="default: the run's, else 64")
    evaluate.add_argument("--no-double-quant", action="store_true", help="default: the run's, else double quant")
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                          help="compute dtype (default float32)")
    evaluate.add_argument("--no-pack", action="store_true", help="one example per row instead of packed rows")
    evaluate.set_defaults(func=_run_eval)

    memory = commands.add_parser(
        "memory", help="memory of a fine-tuning step: full, 16-bit LoRA and QLoRA, formula and compiled",
        description=("Builds the model abstractly (nothing is allocated), compiles one train step (forward, "
                     "backward w.r.t. the trained variables, AdamW update) for full fine-tuning, 16-bit LoRA and "
                     "QLoRA, and prints the paper-style byte accounting next to compiled.memory_analysis()."))
    memory.add_argument("--model", required=True,
                        help=f"a preset ({', '.join(PRESETS)}), a Hugging Face checkpoint directory or hub id, or "
                             "a config.json")
    memory.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    memory.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    memory.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    memory.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    memory.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="compute dtype, and dtype of the model's float weights: embeddings, norms, lm_head "
                             "and the linear kernels that are not quantized (all of them for full and lora); "
                             "LoRA factors are float32 (default bfloat16)")
    memory.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    memory.add_argument("--no-remat", action="store_true", help="do not rematerialize layers in the backward pass")
    memory.add_argument("--loss-chunk", type=int, default=1024,
                        help="tokens whose logits the loss computes at once (chunked cross entropy; default 1024; "
                             "0: the whole [batch, seq, vocab] logits)")
    memory.add_argument("--fit", action="store_true",
                        help="plan instead: the fastest setting of --method's step that fits (remat, micro-batches "
                             "with gradient accumulation); exit 2 with what it needs when nothing fits")
    memory.add_argument("--method", choices=list(METHODS), default="qlora", help="the method --fit plans "
                                                                                 "(default qlora)")
    memory.add_argument("--use-dora", action="store_true",
                        help="--fit: DoRA adapters (their magnitudes' state and forward extra are added)")
    memory.add_argument("--init", default="default", help="--fit: the adapter init; pissa, pissa_niter_N, olora and "
                                                          "loftq add the loader's float32 projections while loading")
    memory.add_argument("--available-gib", type=float, default=None,
                        help="memory --fit plans for (default: the device's free memory; the host's MemAvailable "
                             "on CPU)")
    memory.set_defaults(func=_run_memory)
    return parser


def _run_finetune(args: argparse.Namespace) -> int:
    """The `finetune` subcommand."""
    targets = args.targets[0] if len(args.targets) == 1 and (args.targets[0] == "all-linear" or any(
        c in args.targets[0] for c in ".*[]()|^$")) else list(args.targets)
    settings = FinetuneArgs(
        model=args.model, data=args.data, output=args.output, eval_data=args.eval_data, rank=args.rank,
        alpha=args.alpha, dropout=args.dropout, targets=targets, lr=args.lr, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len, warmup_ratio=args.warmup_ratio,
        schedule=args.schedule, max_grad_norm=args.max_grad_norm or None, eval_every=args.eval_every,
        save_every=args.save_every, resume=args.resume, overwrite=args.overwrite, seed=args.seed, dtype=args.dtype,
        format=None if args.format == "none" else args.format, block_size=args.block_size,
        double_quant=not args.no_double_quant, remat=args.remat, pack=not args.no_pack, mesh=args.mesh,
        strategy=args.strategy, fit=not args.no_fit,
        available_bytes=None if args.available_gib is None else int(args.available_gib * 2**30),
        report_to=tuple(args.report_to), text_field=args.text_field, prompt_field=args.prompt_field,
        completion_field=args.completion_field, messages_field=args.messages_field, use_dora=args.use_dora,
        init=args.init, loftq_iter=args.loftq_iter, save_residual_base=args.save_residual_base)
    try:
        # Both before the first JAX computation: the distributed runtime, then the CPU setup (which checks the
        # dispatch mode by running a small computation, creating the backends).
        if args.coordinator or args.num_processes or args.process_id is not None or args.distributed:
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        configure_cpu_for_command()  # training steps on the CPU reuse their memory
        summary = run_finetune(settings)
    except (OSError, ValueError, ImportError) as e:  # a user mistake (a setting, a path, a file, a missing extra)
        print(f"qlora-jax finetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    peft_export = summary.pop("peft_export", None)
    print(f"done: {summary}; adapter in {Path(args.output) / 'adapter'}")
    if peft_export:
        print(f"for PEFT: {peft_export}")
    return 0


def _inference_model(args: argparse.Namespace):
    """The checkpoint (quantized as --format says) with the PEFT adapter of --adapter loaded."""
    quant = None if args.format == "none" else qj.QuantConfig(fmt=args.format, block_size=args.block_size,
                                                              double_quant=not args.no_double_quant)
    return inference_model(args.model, args.adapter, quant=quant, dtype=np.dtype(args.dtype))


def _run_eval(args: argparse.Namespace) -> int:
    """The `eval` subcommand (`qlora_jax.app.eval`)."""
    fmt = "nf4" if args.format is None else None if args.format == "none" else args.format
    settings = EvalArgs(model=args.model, data=args.data, adapter=args.adapter, seq_len=args.seq_len,
                        batch_size=args.batch_size, samples=args.samples, max_new_tokens=args.max_new_tokens,
                        format=fmt, format_set=args.format is not None, block_size=args.block_size,
                        double_quant=False if args.no_double_quant else None, dtype=args.dtype,
                        pack=not args.no_pack, text_field=args.text_field, prompt_field=args.prompt_field,
                        completion_field=args.completion_field, messages_field=args.messages_field)
    return main_eval(settings, as_json=args.json)


def _run_generate(args: argparse.Namespace) -> int:
    """The `generate` subcommand."""
    try:
        tokenizer = qj.models.load_tokenizer(args.model)
        if tokenizer is None:
            raise ValueError(f"--model: {args.model} has no tokenizer files")
        model = _inference_model(args)
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(args.prompt)["input_ids"]
        tokens = qj.models.generate(model, np.asarray([ids]), max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                                    seed=args.seed)[0]
    except (FileNotFoundError, ValueError) as e:
        print(f"qlora-jax generate: {e}", file=sys.stderr)
        return 2
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in tokens.tolist():
        tokens = tokens[: tokens.tolist().index(tokenizer.eos_token_id)]
    print(tokenizer.decode(tokens.tolist(), skip_special_tokens=True))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    """The `export` subcommand."""
    try:
        model = _inference_model(args)
        out = qj.models.save_merged(model, args.merged, dtype=np.dtype(args.dtype), tokenizer_from=args.model
                                    if Path(args.model).exists() else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"qlora-jax export: {e}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0


def _memory_config(model: str) -> ModelConfig:
    """A preset, an HF checkpoint directory or hub id, or a config.json path."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_file():
        import transformers

        return ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(str(path.parent)))
    return load_config(model)


def _run_memory(args: argparse.Namespace) -> int:
    """The `memory` subcommand."""
    try:
        config = _memory_config(args.model)
    except (OSError, ValueError) as e:
        print(f"qlora-jax memory: --model {args.model}: {e}", file=sys.stderr)
        return 2
    if args.fit:
        return _run_memory_fit(args, config)
    if args.use_dora or args.init != "default":
        print("qlora-jax memory: --use-dora and --init are planned with --fit only", file=sys.stderr)
        return 2
    print(f"qlora-jax memory: {args.model} ({config.num_params / 1e9:.2f}B parameters), batch {args.batch_size} x "
          f"{args.seq_len} tokens, {args.dtype}, LoRA rank {args.rank} on all linear layers, "
          f"remat {not args.no_remat}, loss chunk {args.loss_chunk or 'off'}; compiled for {jax.default_backend()}\n")
    rows = [step_memory(config, method, rank=args.rank, alpha=args.alpha, batch_size=args.batch_size,
                        seq_len=args.seq_len, dtype=np.dtype(args.dtype), remat=not args.no_remat,
                        loss_chunk=args.loss_chunk or None)
            for method in tqdm(args.methods, desc="compiling", unit="step")]
    print(memory_table(rows))
    print("\nformula: full = (2 + 2 + 4) bytes/param (16-bit weights, gradients, AdamW moments); "
          "lora = 2N + 16M; qlora = 0.5N + 16M; plus the 16-bit embeddings, head and norms. N: linear "
          "parameters, M: adapter parameters. The compiled rows are XLA's memory_analysis() of the step "
          f"on this backend ({jax.default_backend()}; on CPU, 16-bit dots are computed in float32).")
    return 0


def _run_memory_fit(args: argparse.Namespace, config: ModelConfig) -> int:
    """`memory --fit`: the plan's candidates and pick, or the refusal (exit 2)."""
    available = None if args.available_gib is None else int(args.available_gib * 2**30)
    print(f"qlora-jax memory --fit: {args.model} ({config.num_params / 1e9:.2f}B parameters), {args.method}, batch "
          f"{args.batch_size} x {args.seq_len} tokens, {args.dtype}, LoRA rank {args.rank}, loss chunk "
          f"{args.loss_chunk or 'off'}; compiled for {jax.default_backend()}\n")
    try:
        weight_init = qj.LoraConfig(init=args.init).weight_init
    except ValueError as e:
        print(f"qlora-jax memory: --init: {e}", file=sys.stderr)
        return 2
    try:
        fit = plan_fit(config, args.method, batch_size=args.batch_size, seq_len=args.seq_len, rank=args.rank,
                       alpha=args.alpha, dtype=np.dtype(args.dtype), available_bytes=available,
                       remat=False if args.no_remat else None, loss_chunk=args.loss_chunk or None,
                       use_dora=args.use_dora, weight_init=weight_init)
    except DoesNotFit as e:
        print(plan_table(e.candidates) + "\n")
        print(f"qlora-jax memory: {e.message(_memory_flag)}", file=sys.stderr)
        return 2
    print(plan_table(fit.candidates))
    print(f"\nplan: {fit.describe()}\nneed: the compiled step, plus with accumulation the summed gradients and "
          f"the batch's other rows (the + column also holds DoRA's magnitudes, and a weight init's loading beyond "
          f"the step), plus {RESERVE_FRACTION:.0%} and {RESERVE_BYTES / 2**20:.0f} MiB for what runs "
          "outside the step")
    return 0


def _memory_flag(setting: str, value: Any) -> str:
    """How `memory --fit` spells a suggested change."""
    return {"method": f"--method {value}", "remat": "without --no-remat", "seq_len": f"--seq-len {value}"}[setting]


def _run_demo(args: argparse.Namespace) -> int:
    """The `demo` subcommand (`qlora_jax.app.demo`): the fine-tuning comparison, or with `--formats-only` the
    quantization table."""
    if args.formats_only:
        return 0 if demo.run_formats(args.output, args.seed) else 1
    configure_cpu_for_command()  # before JAX starts: training steps on the CPU reuse their memory
    cfg = demo.QUICK if args.quick else demo.DemoConfig()
    overrides = {"seed": args.seed, "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps}
    try:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        result = demo.run_demo(args.output, cfg, model_path=args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"qlora-jax demo: {e}", file=sys.stderr)
        return 2
    qlora = next(r for r in result["rows"] if r["method"].startswith("QLoRA"))
    if qlora["bytes_per_param"] > 0.52:
        print(f"FAILED: the QLoRA base takes {qlora['bytes_per_param']:.4f} bytes/param (> 0.52)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

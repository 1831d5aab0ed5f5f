"""Perplexity of a checkpoint, with or without an adapter, on a dataset: what `qlora-jax eval` runs.

The data goes through the training pipeline unchanged (`load_examples`: the
same tokenization, loss masks, truncation at `seq_len`; `Batcher.for_eval`:
the same packing), and the loss is the library's evaluation step
(`qj.train.eval_step`, no dropout): the perplexity is `exp(Σ w·ce / Σ w)`
over the tokens that carry loss in training (the completion of a
prompt/completion row, the assistant turns of a conversation, every token of
a text row). `--samples N` continues the first N examples greedily from the
tokens before their first loss-carrying token (the prompt as the model read
it in training) and shows the expected continuation beside the generated one.

`--adapter` takes a PEFT adapter directory (`adapter_config.json` +
`adapter_model.safetensors`, as `finetune` writes to `OUTPUT/adapter` and
`peft` saves), or a `finetune --output` directory, whose `adapter/` is used
and whose `run_config.json` gives the defaults of `--format`,
`--block-size`, `--double-quant` and `--seq-len` (the base is then
quantized as it was in training). A run whose adapter init read the weight
(`--init pissa`, `pissa_niter_N`, `olora`, `loftq`) trained over a residual
base: it is computed again while loading, with the run's init and seed (the
same residual and the same random draws), and the adapter applies over it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere

from qlora_jax._src.config import LoraConfig, QuantConfig
from qlora_jax._src.data import Batcher, Example, load_examples
from qlora_jax._src.formats.qarray import BLOCK_SIZES, FORMATS
from qlora_jax._src.models.generate import generate
from qlora_jax._src.models.loading import checkpoint_dir, from_pretrained, load_config, load_tokenizer
from qlora_jax._src.models.peft_io import load_peft_adapter
from qlora_jax._src.models.safetensors_io import SafetensorsReader
from qlora_jax._src.train import eval_step

__all__ = ["EvalArgs", "eval_table", "inference_model", "main_eval", "resolve_adapter", "run_eval"]

DEFAULT_SEQ_LEN = 512  # finetune's default


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalArgs:
    """Settings of an evaluation; None means "the run's setting, else the default" (see `resolve_adapter`).

    Example:
        >>> from qlora_jax.app.eval import EvalArgs
        >>> EvalArgs(model="m", data="d.jsonl").batch_size
        4
    """

    model: str  # checkpoint directory or hub id
    data: str  # dataset (what finetune's --data takes: a file, a save_to_disk directory, a hub dataset)
    adapter: str | None = None  # PEFT adapter directory or finetune --output directory; None: the base alone
    seq_len: int | None = None  # tokens per row; None: the run's seq_len, else 512 or the model's maximum if less
    batch_size: int = 4  # rows per evaluation batch
    samples: int = 0  # greedy generations of the first examples
    max_new_tokens: int = 32  # tokens per generation
    format: str | None = "nf4"  # base weight format; None: float base. Overridden by a run's unless `format_set`
    block_size: int | None = None  # None: the run's, else 64
    double_quant: bool | None = None  # None: the run's, else True
    dtype: str = "float32"  # compute dtype
    pack: bool = True  # pack several examples per row, as finetune's evaluation does
    text_field: str | None = None  # the data's columns, when not named as a schema or a common layout; None: the
    prompt_field: str | None = None  # run's (a finetune --output directory as `adapter`), else found by name
    completion_field: str | None = None
    messages_field: str | None = None
    progress: bool = True  # progress bars (loading, evaluation) on stderr
    format_set: bool = False  # `format` was given explicitly (a run directory's format does not replace it)


def resolve_adapter(path: str | os.PathLike) -> tuple[Path, dict[str, Any] | None]:
    """The PEFT adapter directory that `path` names, and the `run_config.json` of its finetune run, if any.

    A run's own `adapter/` comes with the run's settings too: an adapter
    trained over a LoftQ base records `init_lora_weights: true` (PEFT's
    convention), so only the run says which base it needs.

    Args:
        path: A PEFT adapter directory (`adapter_config.json`), or a
            `finetune --output` directory (`run_config.json` and `adapter/`).

    Returns:
        `(adapter directory, run settings or None)`.

    Raises:
        FileNotFoundError: `path` is neither (the message says what is missing).

    Example:
        >>> from qlora_jax.app.eval import resolve_adapter
        >>> resolve_adapter(tmp)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: --adapter: ... is neither a PEFT adapter directory (no adapter_config.json) nor a ...
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--adapter: {path}: no such directory")

    def run_config(run_dir: Path) -> dict[str, Any]:
        try:
            return json.loads((run_dir / "run_config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--adapter: {run_dir / 'run_config.json'}: invalid JSON: {e.msg}") from None

    if (path / "adapter_config.json").is_file():
        in_run = path.name == "adapter" and (path.parent / "run_config.json").is_file()
        return path, run_config(path.parent) if in_run else None
    if (path / "run_config.json").is_file() and (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter", run_config(path)
    raise FileNotFoundError(f"--adapter: {path} is neither a PEFT adapter directory (no adapter_config.json) nor a "
                            "finetune --output directory (no run_config.json and adapter/adapter_config.json)")


def inference_model(model: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                    quant: QuantConfig | None = None, dtype: Any = jnp.float32, progress: bool = False,
                    run: dict[str, Any] | None = None) -> Any:
    """A checkpoint loaded for inference (`quant`: quantized on load), with a PEFT adapter, in eval mode.

    The adapter layers are made from `adapter_config.json` (rank, alpha,
    target modules, rsLoRA) and filled by `load_peft_adapter`.

    Args:
        model: A checkpoint directory or hub id.
        adapter: A PEFT adapter directory or a finetune run directory (see
            `resolve_adapter`), or None for the base alone.
        quant: How to quantize the base's projections; None keeps them float.
        dtype: Compute dtype.
        progress: A progress bar over the tensors read.
        run: The `run_config.json` of the finetune run that trained `adapter`; None: the run `resolve_adapter`
            finds, if any. An `init` that reads the weight (PiSSA, OLoRA, LoftQ) is computed again while loading,
            with the run's `loftq_iter`, `dropout` and `seed` (the same residual base and draws), before the
            adapter replaces the initial factors.

    Returns:
        The `CausalLM`, after `model.eval()`.

    Raises:
        FileNotFoundError: A missing checkpoint or adapter file (named).
        ValueError: An adapter this model cannot take (per-module ranks, unknown targets; named), or a LoftQ
            run's adapter over another quantization than the run's (LoftQ's base depends on it).

    Example:
        (`checkpoint`: a tiny Llama checkpoint; `adapter_dir`: a PEFT adapter saved for it.)

        >>> import qlora_jax as qj
        >>> from qlora_jax.app.eval import inference_model
        >>> m = inference_model(checkpoint, adapter_dir, quant=qj.QuantConfig())
        >>> float(abs(qj.models.adapter_layers(m)["model.layers.0.self_attn.q_proj"].lora_b[...]).max()) > 0
        True
    """
    lora = None
    if adapter is not None and run is None:
        adapter, run = resolve_adapter(adapter)
    if adapter is not None:
        config_path = Path(adapter) / "adapter_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: missing (not a PEFT adapter directory)")
        if (run or {}).get("init") == "loftq":  # LoftQ's base depends on the quantization: only the run's fits
            trained = (None if run.get("format") is None else
                       (run["format"], run.get("block_size", 64), bool(run.get("double_quant", True))))
            asked = None if quant is None else (quant.fmt, quant.block_size, bool(quant.double_quant))
            if asked != trained:
                raise ValueError(f"{config_path}: trained over a LoftQ base quantized as {_quant_name(trained)}, "
                                 f"not {_quant_name(asked)}; pass the run's --format, --block-size and double "
                                 "quantization")
        cfg = json.loads(config_path.read_text())
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ValueError(f"{config_path}: per-module rank_pattern/alpha_pattern are not supported")
        targets = cfg.get("target_modules")
        run = run or {}
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init in ("pissa", "olora") and "init" not in run:
            run = {**run, "init": init}  # as PEFT: the init computed again from the checkpoint, its residual the base
        elif isinstance(init, str) and init != "gaussian" and "init" not in run:
            raise ValueError(f"{config_path}: init_lora_weights {init!r}: this adapter applies over the residual "
                             "base its run computed (random draws), not over the original checkpoint; pass the "
                             "finetune run directory as --adapter, or its adapter_over_original/")
        lora = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(run.get("dropout", 0.0)),
                          targets=sorted(targets) if isinstance(targets, list) else targets,
                          rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
                          init=run.get("init", "default"), loftq_iter=run.get("loftq_iter", 1))
    loaded = from_pretrained(model, quant=quant, lora=lora, dtype=jnp.dtype(dtype), progress=progress,
                             rngs=nnx.Rngs((run or {}).get("seed", 0)))
    if adapter is not None:
        load_peft_adapter(loaded, adapter)
    loaded.eval()
    return loaded


def _quant_name(quant: tuple[str, int, bool] | None) -> str:
    if quant is None:
        return "none (a float base)"
    fmt, block_size, double_quant = quant
    return f"{fmt}, block size {block_size}, {'with' if double_quant else 'no'} double quantization"


def _settings(args: EvalArgs, run: dict[str, Any] | None, max_positions: int) -> tuple[QuantConfig | None, int]:
    """The base's quantization and the sequence length: the flags, else the run's, else the defaults; checked."""
    run = run or {}

    def pick(value: Any, key: str, default: Any) -> Any:
        return value if value is not None else run.get(key, default)

    fmt = run.get("format", args.format) if run and not args.format_set else args.format
    block_size = pick(args.block_size, "block_size", 64)
    double_quant = pick(args.double_quant, "double_quant", True)
    seq_len = pick(args.seq_len, "seq_len", min(DEFAULT_SEQ_LEN, max_positions))
    for flag, value, minimum in (("--seq-len", seq_len, 2), ("--batch-size", args.batch_size, 1),
                                 ("--samples", args.samples, 0), ("--max-new-tokens", args.max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{flag}: must be an integer >= {minimum}, got {value!r}")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format: must be one of {sorted(FORMATS)} or none, got {fmt!r}")
    if fmt is not None and block_size not in BLOCK_SIZES:
        raise ValueError(f"--block-size: must be one of {BLOCK_SIZES}, got {block_size!r}")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype: must be float32, bfloat16 or float16, got {args.dtype!r}")
    quant = None if fmt is None else QuantConfig(fmt=fmt, block_size=block_size, double_quant=bool(double_quant))
    return quant, seq_len


def run_eval(args: EvalArgs) -> dict[str, Any]:
    """Evaluates `args.model` (+ `args.adapter`) on `args.data`; returns the result as a JSON-able dict.

    Everything that can be checked without reading a weight is checked first:
    the settings, the adapter directory, the model's config and safetensors
    headers, the tokenizer and the data.

    Returns:
        `perplexity` (`exp(loss)`), `loss` (mean cross entropy over the
        loss-carrying tokens, in nats), `tokens` (how many), `examples`,
        `rows`, `truncated`, `dropped` (rows of the file, examples kept, rows
        cut at `seq_len`, rows left without a loss-carrying token), the
        settings used (`model`, `adapter`, `data`, `format`, `seq_len`) and
        `samples`: `[{"prompt", "expected", "generated"}]` (decoded text).

    Raises:
        FileNotFoundError: A missing model, adapter or data file (named).
        ImportError: A data format that needs the optional `pyarrow`/`datasets`.
        ValueError: A bad setting (named by its flag), a model without a
            tokenizer, a `seq_len` above the model's maximum, a bad data row
            (named `file:line`), an adapter that does not fit the model.

    Example:
        (`checkpoint`: a tiny Llama checkpoint with a character tokenizer; `adapter_dir`: a PEFT adapter saved
        for it; `tmp`: an empty directory.)

        >>> import json
        >>> from qlora_jax.app.eval import EvalArgs, run_eval
        >>> data = tmp / "eval.jsonl"
        >>> _ = data.write_text(json.dumps({"prompt": "abc", "completion": "def"}) + "\\n")
        >>> result = run_eval(EvalArgs(model=str(checkpoint), adapter=str(adapter_dir), data=str(data),
        ...                            seq_len=16, progress=False))
        >>> result["tokens"], result["examples"], round(math.exp(result["loss"]) / result["perplexity"], 6)
        (4.0, 1, 1.0)
    """
    run = None
    adapter = None
    if args.adapter is not None:
        adapter, run = resolve_adapter(args.adapter)
    config = load_config(args.model)
    quant, seq_len = _settings(args, run, config.max_position_embeddings)
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len: {seq_len} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    SafetensorsReader(checkpoint_dir(args.model))  # the headers against the file sizes: a truncated file, named
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise ValueError(f"--model: {args.model} has no tokenizer files; the data cannot be tokenized")
    fields = {k: getattr(args, k) if getattr(args, k) is not None else (run or {}).get(k)
              for k in ("text_field", "prompt_field", "completion_field", "messages_field")}
    examples, stats = load_examples(args.data, tokenizer, seq_len, **fields)
    model = inference_model(args.model, adapter, quant=quant, dtype=args.dtype, progress=args.progress, run=run)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = Batcher.for_eval(examples, args.batch_size, seq_len, pack=args.pack, pad_id=pad_id)
    loss_sum, tokens = 0.0, 0.0
    # `delay`: the bar shows only for an evaluation that takes a while
    for batch in tqdm(batches, total=batches.num_batches, desc="eval", unit="batch", delay=2.0,
                      disable=not args.progress):
        out = eval_step(model, batch)
        loss_sum += float(np.float64(out["loss_sum"]))
        tokens += float(np.float64(out["tokens"]))
    loss = loss_sum / tokens  # tokens > 0: load_examples keeps only examples with a loss-carrying token
    result: dict[str, Any] = {
        "perplexity": math.exp(loss), "loss": loss, "tokens": tokens, "examples": stats.num_examples,
        "rows": stats.num_rows, "truncated": stats.num_truncated, "dropped": stats.num_dropped,
        "model": str(args.model), "adapter": None if adapter is None else str(adapter), "data": str(args.data),
        "format": None if quant is None else quant.fmt, "seq_len": seq_len, "samples": []}
    if args.samples:
        result["samples"] = _samples(model, tokenizer, examples[:args.samples], args.max_new_tokens, pad_id)
    return result


def _samples(model: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int,
             pad_id: int) -> list[dict[str, str]]:
    """Greedy continuations of each example's prompt (its tokens before the first loss-carrying one), in one
    left-padded batch."""
    prompts, expected = [], []
    for ex in examples:
        first = 1 + int(np.argmax(ex.loss_mask[1:]))  # the first predicted token that carries loss
        rest = ex.loss_mask[first:]
        stop = first + (int(np.argmin(rest)) if not rest.all() else len(rest))  # the end of that loss run
        prompts.append(ex.input_ids[:first])
        expected.append(ex.input_ids[first:stop])
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    eos = tokenizer.eos_token_id
    new = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                   pad_token_id=pad_id)
    out = []
    for p, e, tokens in zip(prompts, expected, new.tolist(), strict=True):
        if eos is not None and eos in tokens:
            tokens = tokens[:tokens.index(eos)]
        out.append({"prompt": tokenizer.decode(p.tolist(), skip_special_tokens=True),
                    "expected": tokenizer.decode(e.tolist(), skip_special_tokens=True),
                    "generated": tokenizer.decode(tokens, skip_special_tokens=True)})
    return out


def eval_table(result: dict[str, Any]) -> str:
    """`run_eval`'s result as a Markdown table, then the samples.

    Example:
        >>> from qlora_jax.app.eval import eval_table
        >>> print(eval_table({"perplexity": 7.389, "loss": 2.0, "tokens": 12.0, "examples": 3, "rows": 3,
        ...                   "truncated": 0, "dropped": 0, "samples": [{"prompt": "2+2=", "expected": "4",
        ...                   "generated": "5"}]}))
        | metric | value |
        |---|---|
        | perplexity | 7.3890 |
        | mean loss (nats/token) | 2.0000 |
        | loss tokens | 12 |
        | examples | 3 of 3 rows (0 truncated, 0 dropped) |
        <BLANKLINE>
        sample 1
          prompt:    '2+2='
          expected:  '4'
          generated: '5'
    """
    lines = ["| metric | value |", "|---|---|", f"| perplexity | {result['perplexity']:.4f} |",
             f"| mean loss (nats/token) | {result['loss']:.4f} |", f"| loss tokens | {result['tokens']:.0f} |",
             f"| examples | {result['examples']} of {result['rows']} rows ({result['truncated']} truncated, "
             f"{result['dropped']} dropped) |"]
    for i, sample in enumerate(result["samples"], start=1):
        lines += ["", f"sample {i}"] + [f"  {k + ':':<10} {sample[k]!r}" for k in ("prompt", "expected", "generated")]
    return "\n".join(lines)


def main_eval(args: EvalArgs, as_json: bool = False) -> int:
    """Runs `run_eval` and prints its result (a table, or one JSON object with `as_json`); returns the exit code:
    0, or 2 with a one-line error on stderr for a bad input.

    Example:
        >>> from qlora_jax.app.eval import EvalArgs, main_eval
        >>> main_eval(EvalArgs(model="/nonexistent", data="d.jsonl"))
        2
    """
    try:
        result = run_eval(args)
    except (OSError, ValueError, ImportError) as e:  # a setting, a path, a file, a missing extra: one line
        print(f"qlora-jax eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if as_json else eval_table(result))
    return 0

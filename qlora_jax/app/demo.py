"""The built-in `qlora-jax demo`: QLoRA next to 32-bit LoRA on a small model, end to end on a CPU.

No released model can be downloaded here, so the demo makes its own stand-in:
a small Llama-family `CausalLM` over a character vocabulary, pre-trained from
scratch (every weight, `qj.train.Trainer(..., wrt=nnx.Param)`) on a synthetic
corpus of "copy" lines and word lists, and cached with `qj.checkpoint` under a
hash of its settings. It then fine-tunes that base on a task the corpus never
shows, reversing a word (`"reverse stone = enots"`), twice with the same data,
seed and schedule:

* QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314): the
  linear layers stored in NF4 with double quantization, rank-8 adapters on
  every linear layer but the head;
* LoRA over the float32 base (`quant=None`), the baseline.

The demo is built on the library: its character vocabulary is a Hugging Face
fast tokenizer (`char_tokenizer`), its corpus and task are rows that
`qj.data.tokenize_examples` tokenizes and `qj.data.Batcher` packs, and every
update is a `qj.train.Trainer` step. The loss is on the answer tokens only.
Each method is scored by its eval loss and by exact-match accuracy of greedy
`generate` on held-out words, next to the bytes per parameter of its frozen
base and the memory of its compiled train step (`step_memory`).

`run_formats` is the other half of `qlora-jax demo` (`--formats-only`): every
format on a random Gaussian layer stack, and a bitsandbytes round trip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import statistics
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere

import qlora_jax as qj
from qlora_jax._src.memory import linear_param_count, step_memory
from qlora_jax.app.plot import plot_curves

__all__ = [
    "QUICK",
    "SYMBOLS",
    "VOCAB_SIZE",
    "DemoConfig",
    "MethodResult",
    "TaskData",
    "char_tokenizer",
    "pretrain_base",
    "pretrain_batches",
    "results_table",
    "reverse_task",
    "run_demo",
    "run_formats",
    "task_data",
]

# Bumped whenever the pre-training recipe changes, so that old cached bases are not reused.
_CACHE_VERSION = 2
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# The stand-in base's vocabulary: one token per character, after pad, bos and eos (ids 0, 1, 2).
SYMBOLS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", *" .:=>", *_LETTERS, *"0123456789")
VOCAB_SIZE = 64  # the embedding's rows: SYMBOLS padded to a multiple of 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Sizes and steps of the demo; `QUICK` is a reduced copy for tests.

    Example:
        >>> DemoConfig().model_config().num_params > QUICK.model_config().num_params
        True
    """

    hidden_size: int = 128  # residual width of the stand-in base (a multiple of 64: NF4 blocks run along it)
    intermediate_size: int = 384  # SwiGLU width (a multiple of 64)
    num_layers: int = 2  # decoder layers
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention)
    seq_len: int = 64  # tokens per packed row
    batch_size: int = 32  # rows per step
    pretrain_steps: int = 500  # full pre-training updates of the base
    pretrain_lr: float = 3e-3  # peak AdamW learning rate of the pre-training (cosine decay after a 5% warmup)
    finetune_steps: int = 300  # adapter updates per method
    finetune_lr: float = 4e-3  # peak adapter learning rate (constant after a 3% warmup)
    rank: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA alpha
    eval_words: int = 200  # held-out words scored by exact match
    min_word: int = 3  # shortest word
    max_word: int = 6  # longest word
    seed: int = 0  # seeds the corpus, the base's initialization, the batch order and the adapters

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "seq_len"):
            if getattr(self, name) % 64:
                raise ValueError(f"DemoConfig.{name}: must be a multiple of 64, got {getattr(self, name)}")
        for name in ("num_layers", "batch_size", "pretrain_steps", "finetune_steps", "rank", "eval_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name}: must be at least 1, got {getattr(self, name)}")
        # The longest example is a list of five words: "words: " + 5 words + 4 spaces + "." + bos + eos.
        if not 1 <= self.min_word <= self.max_word or 5 * self.max_word + 14 > self.seq_len:
            raise ValueError(f"DemoConfig.min_word/max_word: need 1 <= min_word <= max_word and the longest example "
                             f"(5 * max_word + 14 characters) to fit seq_len {self.seq_len}")

    def model_config(self, vocab_size: int = VOCAB_SIZE) -> qj.models.ModelConfig:
        """The stand-in base's architecture.

        Example:
            >>> QUICK.model_config().hidden_size, QUICK.model_config().vocab_size
            (64, 64)
        """
        return qj.models.ModelConfig(vocab_size=vocab_size, hidden_size=self.hidden_size,
                                     intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                                     num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                     max_position_embeddings=256)

    def pretrain_config(self) -> qj.train.TrainConfig:
        """The pre-training's optimizer: AdamW with weight decay, clipped, cosine decay after a 5% warmup.

        Example:
            >>> DemoConfig().pretrain_config().warmup_steps
            25
        """
        return qj.train.TrainConfig(total_steps=self.pretrain_steps, lr=self.pretrain_lr, schedule="cosine",
                                    warmup_ratio=0.05, max_grad_norm=1.0, weight_decay=0.01, seed=self.seed)

    def finetune_config(self, steps: int) -> qj.train.TrainConfig:
        """The adapters' optimizer: AdamW, clipped, constant after a 3% warmup.

        Example:
            >>> DemoConfig().finetune_config(300).schedule, DemoConfig().finetune_config(300).warmup_steps
            ('constant', 9)
        """
        return qj.train.TrainConfig(total_steps=steps, lr=self.finetune_lr, warmup_ratio=0.03, max_grad_norm=1.0,
                                    seed=self.seed)

    def base_key(self) -> str:
        """A hash of everything the pre-trained base depends on (its cache directory's name).

        Example:
            >>> DemoConfig().base_key() == DemoConfig(finetune_steps=10).base_key() != QUICK.base_key()
            True
        """
        fields = {k: getattr(self, k) for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                                 "num_kv_heads", "seq_len", "batch_size", "pretrain_steps",
                                                 "pretrain_lr", "min_word", "max_word", "seed")}
        text = json.dumps({"version": _CACHE_VERSION, "vocab": SYMBOLS, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# The reduced settings of `qlora-jax demo --quick` (a smoke test, not a result).
QUICK = DemoConfig(hidden_size=64, intermediate_size=128, seq_len=64, batch_size=8, pretrain_steps=30,
                   finetune_steps=20, eval_words=32)


def char_tokenizer() -> Any:
    """The stand-in base's tokenizer: one token per character of `SYMBOLS` (same ids), `<bos>` in front.

    A `transformers.PreTrainedTokenizerFast`, so `qj.data.tokenize_examples`
    reads it like any Hugging Face tokenizer (character offsets, the `<bos>`
    it adds, `<eos>` appended). A character outside `SYMBOLS` is an error.

    Returns:
        The tokenizer; `pad_token_id`, `bos_token_id`, `eos_token_id` are 0, 1, 2.

    Example:
        >>> tok = char_tokenizer()
        >>> tok("abc = cba")["input_ids"][:4], tok.decode(tok("abc = cba")["input_ids"], skip_special_tokens=True)
        ([1, 8, 9, 10], 'abc = cba')
    """
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tokenizer_models

    tok = Tokenizer(tokenizer_models.WordLevel({s: i for i, s in enumerate(SYMBOLS)}))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character a token
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.decoder = decoders.Fuse()  # characters joined without spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>")


# ---------------------------------------------------------------- data


def _words(rng: np.random.Generator, n: int, cfg: DemoConfig) -> list[str]:
    lengths = rng.integers(cfg.min_word, cfg.max_word + 1, n)
    return ["".join(rng.choice(list(_LETTERS), k)) for k in lengths]


def _held_out(word: str) -> bool:
    """One word in eight, by hash, is kept out of the fine-tuning data (and scored)."""
    return zlib.crc32(word.encode()) % 8 == 0


def reverse_task(word: str) -> tuple[str, str]:
    """The fine-tuning task: `(prompt, answer)` for reversing `word`.

    Example:
        >>> reverse_task("stone")
        ('reverse stone = ', 'enots')
    """
    return f"reverse {word} = ", word[::-1]


def _pretrain_line(rng: np.random.Generator, cfg: DemoConfig) -> str:
    """A corpus line: a copy example (`"copy stone > stone."`) or a list of words."""
    if rng.random() < 0.5:
        word = _words(rng, 1, cfg)[0]
        return f"copy {word} > {word}."
    return "words: " + " ".join(_words(rng, int(rng.integers(2, 6)), cfg)) + "."


def _tokenize(rows: list[dict[str, str]], tok: Any, seq_len: int) -> list[qj.data.Example]:
    """`qj.data.tokenize_examples`, refusing to cut an example short."""
    examples, stats = qj.data.tokenize_examples(rows, tok, seq_len)
    if stats.num_truncated or stats.num_dropped:
        raise ValueError(f"seq_len: {stats.num_truncated} of {stats.num_rows} demo examples are longer than "
                         f"seq_len={seq_len} tokens ({stats.max_length} the longest)")
    return examples


def _batches(batcher: qj.data.Batcher, n: int | None = None) -> list[dict[str, np.ndarray]]:
    """The first `n` batches of `batcher` (all with None), each holding `batch_size` rows of examples."""
    batches = list(itertools.islice(batcher, n))
    if n is not None and (len(batches) < n or batcher.num_rows < n * batcher.batch_size):
        raise ValueError(f"the demo data fill {batcher.num_rows} rows, fewer than {n} batches need")
    return batches


def pretrain_batches(cfg: DemoConfig, tok: Any) -> list[dict[str, np.ndarray]]:
    """`cfg.pretrain_steps` packed batches of corpus lines, the loss on every token.

    Lines are drawn until they hold `pretrain_steps * batch_size * seq_len`
    tokens (so they fill at least that many rows) and served once, shuffled.

    Example:
        >>> batches = pretrain_batches(dataclasses.replace(QUICK, pretrain_steps=2), char_tokenizer())
        >>> len(batches), batches[0]["input_ids"].shape
        (2, (8, 64))
    """
    rng = np.random.default_rng([cfg.seed, 1])
    need = cfg.pretrain_steps * cfg.batch_size * cfg.seq_len
    examples: list[qj.data.Example] = []
    while sum(len(e) for e in examples) < need:
        examples += _tokenize([{"text": _pretrain_line(rng, cfg)} for _ in range(256)], tok, cfg.seq_len)
    batcher = qj.data.Batcher(examples, cfg.batch_size, cfg.seq_len, seed=cfg.seed, pad_id=tok.pad_token_id)
    return _batches(batcher, cfg.pretrain_steps)


@dataclasses.dataclass(frozen=True)
class TaskData:
    """The fine-tuning task: packed train batches, eval batches and held-out prompts with answers."""

    train: list[dict[str, np.ndarray]]  # `finetune_steps` batches of train words
    eval: list[dict[str, np.ndarray]]  # the held-out words, as train batches (loss on the answer)
    prompts: list[list[int]]  # token ids of each held-out prompt, as the model reads it
    answers: list[str]  # the expected answer of each


def task_data(cfg: DemoConfig, tok: Any) -> TaskData:
    """Reverse-the-word examples: train words and held-out words never overlap.

    Rows `{"prompt": "reverse stone = ", "completion": "enots"}` go through
    `qj.data.tokenize_examples` (loss on the completion and the eos) and
    `qj.data.Batcher`; a held-out prompt is its example's tokens before the
    first one with loss.

    Example:
        >>> data = task_data(QUICK, char_tokenizer())
        >>> len(data.train) == QUICK.finetune_steps, len(data.answers) == QUICK.eval_words
        (True, True)
        >>> data.prompts[0][:9] == char_tokenizer()("reverse ")["input_ids"]
        True
    """
    rng = np.random.default_rng([cfg.seed, 2])
    need = cfg.finetune_steps * cfg.batch_size * cfg.seq_len
    train: list[qj.data.Example] = []
    eval_words: list[str] = []
    while sum(len(e) for e in train) < need or len(eval_words) < cfg.eval_words:
        train_words = []
        for word in _words(rng, 256, cfg):
            if not _held_out(word):
                train_words.append(word)
            elif word not in eval_words and len(eval_words) < cfg.eval_words:
                eval_words.append(word)
        train += _tokenize([_task_row(w) for w in train_words], tok, cfg.seq_len)
    held_out = _tokenize([_task_row(w) for w in eval_words], tok, cfg.seq_len)
    batcher = qj.data.Batcher(train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, pad_id=tok.pad_token_id)
    return TaskData(
        train=_batches(batcher, cfg.finetune_steps),
        eval=_batches(qj.data.Batcher.for_eval(held_out, cfg.batch_size, cfg.seq_len, pad_id=tok.pad_token_id)),
        prompts=[e.input_ids[:int(np.argmax(e.loss_mask))].tolist() for e in held_out],
        answers=[reverse_task(w)[1] for w in eval_words])


def _task_row(word: str) -> dict[str, str]:
    prompt, answer = reverse_task(word)
    return {"prompt": prompt, "completion": answer}


# ---------------------------------------------------------------- the stand-in base


def pretrain_base(cfg: DemoConfig, *, progress: bool = True) -> tuple[qj.models.CausalLM, list[float]]:
    """Pre-trains the stand-in base from scratch: every weight, `Trainer(..., wrt=nnx.Param)`.

    Args:
        cfg: The sizes, steps and seed (`cfg.pretrain_config()` is the optimizer).
        progress: Show a progress bar.

    Returns:
        The model and its loss per step.

    Example:
        >>> model, losses = pretrain_base(dataclasses.replace(QUICK, pretrain_steps=2), progress=False)
        >>> len(losses), model.config.hidden_size
        (2, 64)
    """
    model = qj.models.CausalLM(cfg.model_config(), rngs=nnx.Rngs(cfg.seed))
    trainer = qj.train.Trainer(model, cfg.pretrain_config(), wrt=nnx.Param)
    batches = pretrain_batches(cfg, char_tokenizer())
    losses = [float(trainer.train_step(batch)["loss"])
              for batch in tqdm(batches, desc="pre-training the stand-in base", unit="step", disable=not progress)]
    return model, losses


def _save_base(path: Path, model: qj.models.CausalLM) -> None:
    """Saves every variable of `model` as a `qj.checkpoint` in `path` (complete or absent, never half written)."""
    qj.checkpoint.save(path, model, include_base=True)


def _load_base(path: Path, config: qj.models.ModelConfig) -> qj.models.CausalLM:
    """A `CausalLM` with the variables `save_base` wrote; raises `ValueError` when they do not fit `config`."""
    model = qj.models.CausalLM(config, rngs=nnx.Rngs(0))
    try:
        qj.checkpoint.restore(path, model)
    except ValueError as e:
        raise ValueError(f"{path}: does not hold the demo's model (delete it to rebuild it): {e}") from e
    return model


# ---------------------------------------------------------------- fine-tuning and scoring


def _accuracy(model: qj.models.CausalLM, tok: Any, prompts: Sequence[list[int]], answers: Sequence[str],
              max_new_tokens: int) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy answers (prompts left-padded and batched); returns it and the answers."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    out = qj.models.generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=pad_id)
    texts = [_decode(tok, row.tolist()).strip() for row in out]
    return sum(t == a for t, a in zip(texts, answers, strict=True)) / len(answers), texts


def _decode(tok: Any, ids: list[int]) -> str:
    """The text of `ids` up to the first eos, without special tokens."""
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    return tok.decode(ids, skip_special_tokens=True)


@dataclasses.dataclass
class MethodResult:
    """One row of the demo's table."""

    method: str
    eval_loss: float
    accuracy: float
    bytes_per_param: float  # bytes per parameter of the frozen linear base weights
    base_linear_bytes: int  # bytes of those weights
    step_memory_bytes: int | None = None  # compiled train step: arguments + temporaries + outputs not aliased
    median_step_s: float | None = None
    losses: list[float] = dataclasses.field(default_factory=list)
    samples: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (word, expected, answer)


def _finetune(make_base: Callable[[], qj.models.CausalLM], method: str, data: TaskData, tok: Any, cfg: DemoConfig,
              max_new_tokens: int, *, progress: bool = True) -> tuple[MethodResult, qj.models.CausalLM]:
    """Adds adapters to a fresh base (`"qlora"`: NF4 + double quant; `"lora"`: float32), trains and scores them."""
    model = make_base()
    quant = qj.QuantConfig(fmt="nf4", block_size=64, double_quant=True) if method == "qlora" else None
    model = qj.apply_qlora(model, quant=quant, lora=qj.LoraConfig(rank=cfg.rank, alpha=cfg.alpha, dropout=0.0),
                           rngs=nnx.Rngs(cfg.seed + 1))
    frozen = qj.nnx.QuantizedWeight if quant is not None else qj.nnx.FrozenWeight
    nbytes = sum(int(a.nbytes) for a in jax.tree.leaves(nnx.state(model, frozen)))
    trainer = qj.train.Trainer(model, cfg.finetune_config(len(data.train)))
    losses, times = [], []
    label = "QLoRA (NF4 + DQ)" if method == "qlora" else "LoRA (32-bit base)"
    for batch in tqdm(data.train, desc=f"fine-tuning {label}", unit="step", disable=not progress):
        start = time.perf_counter()
        losses.append(float(trainer.train_step(batch)["loss"]))  # float() waits for the step
        times.append(time.perf_counter() - start)
    eval_loss = trainer.evaluate(data.eval)["loss"]
    acc, texts = _accuracy(model, tok, data.prompts, data.answers, max_new_tokens)
    name = "QLoRA: NF4 + double quant base, rank-8 LoRA" if method == "qlora" else "LoRA: float32 base, rank-8 LoRA"
    result = MethodResult(method=name, eval_loss=eval_loss, accuracy=acc,
                          bytes_per_param=nbytes / linear_param_count(model.config), base_linear_bytes=nbytes,
                          median_step_s=statistics.median(times[1:] or times), losses=losses,
                          samples=_samples(data, texts))
    return result, model


def _samples(data: TaskData, texts: list[str], n: int = 3) -> list[tuple[str, str, str]]:
    return [(a[::-1], a, t) for a, t in zip(data.answers[:n], texts[:n], strict=True)]


def _base_result(model: qj.models.CausalLM, data: TaskData, tok: Any, max_new_tokens: int) -> MethodResult:
    """The base model without fine-tuning, scored like the fine-tuned ones."""
    nbytes = sum(int(v.nbytes) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                 if path[-1] == "kernel" and "lm_head" not in path)  # [layers, in, out] stacked kernels
    nparams = linear_param_count(model.config)
    acc, texts = _accuracy(model, tok, data.prompts, data.answers, max_new_tokens)
    return MethodResult(method="base model, no fine-tuning", eval_loss=qj.train.evaluate(model, data.eval)["loss"],
                        accuracy=acc, bytes_per_param=nbytes / nparams, base_linear_bytes=nbytes,
                        samples=_samples(data, texts))


def results_table(rows: Sequence[MethodResult]) -> str:
    """The results as a Markdown table.

    Example:
        >>> row = MethodResult("QLoRA", 0.1234, 0.95, 0.5161, 2048, 3 * 2**20, 0.0123)
        >>> print(results_table([row]).splitlines()[2])
        | QLoRA | 0.1234 | 95.0% | 0.5161 | 2.0 | 3.00 | 12.3 |
    """
    lines = ["| method | eval loss | task accuracy | base weight bytes/param | base linear weights (KiB) "
             "| compiled step memory (MiB) | median step (ms) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = "-" if r.step_memory_bytes is None else f"{r.step_memory_bytes / 2**20:.2f}"
        step = "-" if r.median_step_s is None else f"{r.median_step_s * 1e3:.1f}"
        lines.append(f"| {r.method} | {r.eval_loss:.4f} | {r.accuracy:.1%} | {r.bytes_per_param:.4f} "
                     f"| {r.base_linear_bytes / 1024:.1f} | {mem} | {step} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the whole demo


def run_demo(output: str | Path, cfg: DemoConfig = DemoConfig(), *, model_path: str | None = None,
             progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the demo and writes `loss.png` and `demo.json` into `output`; returns what `demo.json` holds.

    Args:
        output: Folder for the results and the cached base (created if needed).
        cfg: Sizes and steps (`QUICK` for a smoke test).
        model_path: A Hugging Face checkpoint directory (with a fast tokenizer)
            to fine-tune instead of the stand-in base (only the fine-tuning
            comparison runs).
        progress: Show progress bars.
        log: Where the text goes.

    Returns:
        The results: `rows` (one dict per method), `base` (cache directory,
        whether it was reused), `settings`, `seconds`.

    Example:
        The full demo takes minutes on a CPU and `run_demo(output, QUICK)`
        (what `qlora-jax demo --quick` runs, tested in tests/test_cli.py)
        about half a minute. A `model_path` without tokenizer files (here an
        empty directory, `tmp`) is refused before anything is trained:

        >>> run_demo(tmp / "demo", QUICK, model_path=str(tmp))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --model: ... has no tokenizer files
    """
    t0 = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    base_info: dict[str, Any]
    timings: dict[str, float] = {}
    if model_path is None:
        tok = char_tokenizer()
        config = cfg.model_config()
        cache = output / f"base_{cfg.base_key()}"
        log("qlora-jax demo: QLoRA vs 32-bit LoRA on a small Llama-family model, on this machine's "
            f"{jax.default_backend().upper()}.")
        log(f"The base model is a STAND-IN for a released model (none can be downloaded here): a "
            f"{config.num_params / 1e6:.2f}M-parameter Llama-style decoder ({cfg.num_layers} layers, hidden "
            f"{cfg.hidden_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, {VOCAB_SIZE}-symbol "
            f"character vocabulary) pre-trained from scratch for {cfg.pretrain_steps} steps on synthetic "
            "'copy' lines and word lists. Use --model PATH for a real checkpoint.")
        reused = qj.checkpoint.latest_step(cache) is not None
        pretrain_losses: list[float] = []
        if reused:
            log(f"reusing the cached base {cache}")
        else:
            model, pretrain_losses = pretrain_base(cfg, progress=progress)
            _save_base(cache, model)
            timings["pretrain"] = time.perf_counter() - t0
            log(f"pre-trained the base (loss {pretrain_losses[0]:.3f} -> {pretrain_losses[-1]:.3f}); cached in {cache}")
        base_info = {"stand_in": True, "cache": str(cache), "reused": reused, "pretrain_losses": pretrain_losses,
                     "params": config.num_params}

        def make_base() -> qj.models.CausalLM:
            return _load_base(cache, config)
    else:
        tok = qj.models.load_tokenizer(model_path)
        if tok is None:
            raise ValueError(f"--model: {model_path} has no tokenizer files")
        if tok.eos_token_id is None:
            raise ValueError("--model: the tokenizer has no eos token, which the demo's answers end with")

        def make_base() -> qj.models.CausalLM:
            return qj.models.from_pretrained(model_path)

        config = make_base().config
        base_info = {"stand_in": False, "model": str(model_path), "params": config.num_params}
        log(f"qlora-jax demo: QLoRA vs 32-bit LoRA on {model_path} ({config.num_params / 1e6:.1f}M parameters)")

    data = task_data(cfg, tok)
    max_new = max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in data.answers) + 1
    log(f"fine-tuning task (not in the pre-training corpus): reverse a word, e.g. {reverse_task('stone')}; "
        f"{len(data.train)} steps of {cfg.batch_size} x {cfg.seq_len} packed tokens, loss on the answer only; "
        f"accuracy = exact match of greedy answers on {len(data.answers)} held-out words")

    rows = []
    if model_path is None:
        t = time.perf_counter()
        rows.append(_base_result(make_base(), data, tok, max_new))
        timings["base_eval"] = time.perf_counter() - t
    curves = {}
    for method in ("qlora", "lora"):
        t = time.perf_counter()
        result, _ = _finetune(make_base, method, data, tok, cfg, max_new, progress=progress)
        timings[method] = time.perf_counter() - t
        t = time.perf_counter()
        mem = step_memory(config, method, rank=cfg.rank, alpha=cfg.alpha, batch_size=cfg.batch_size,
                          seq_len=cfg.seq_len, dtype=jnp.float32, remat=False)
        result.step_memory_bytes = mem.compiled_total
        timings[f"{method}_memory"] = time.perf_counter() - t
        rows.append(result)
        curves["qlora" if method == "qlora" else "lora 32-bit"] = (list(range(1, len(result.losses) + 1)),
                                                                     result.losses)

    plot_curves(output / "loss.png", curves, title="qlora-jax demo: reverse the word", xlabel="step",
                ylabel="training loss")
    seconds = time.perf_counter() - t0
    log("\n" + results_table(rows) + "\n")
    for r in rows:
        shown = ", ".join(f"{w} -> {got or '(empty)'}" for w, _, got in r.samples)
        log(f"{r.method}: {shown}")
    log("\nbase weight bytes/param: the frozen linear kernels as stored (NF4 + double quant: 4-bit codes, 8-bit "
        "block scales, float32 second-level scales); compiled step memory: XLA's memory_analysis() of one "
        f"train step (arguments + temporaries + outputs not aliased) on {jax.default_backend()}.")
    result = {
        "task": "reverse the word", "base": base_info,
        "settings": dataclasses.asdict(cfg), "model": dataclasses.asdict(config),
        "rows": [dataclasses.asdict(r) for r in rows],
        "seconds": seconds, "timings": timings,
    }
    (output / "demo.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {output / 'loss.png'} and {output / 'demo.json'}; total time {seconds:.1f} s")
    return result


# ---------------------------------------------------------------- --formats-only: every format on random weights

# One "layer" of the random stack is an MLP pair: up [d_model, d_ff] and down [d_ff, d_model].
STACK_LAYERS = 2
STACK_SHAPES: tuple[tuple[int, int], ...] = ((1024, 2816), (2816, 1024))
STACK_FORMATS: tuple[str, ...] = ("nf4", "fp4", "int4", "int8")
STACK_BLOCK_SIZE = 64


def run_formats(output: str | Path, seed: int = 0, *, log: Callable[[str], None] = print) -> bool:
    """Quantizes a random Gaussian layer stack in every format; writes `quantization.json` into `output`.

    Prints bytes per parameter and the relative MSE against the float32
    weights of each format (with and without double quantization), and
    whether an NF4 kernel survives a bitsandbytes export/import
    (`to_bnb` / `from_bnb`) unchanged.

    Args:
        output: Folder for `quantization.json` (created if needed).
        seed: Seed of the random weights.
        log: Where the text goes.

    Returns:
        Whether the bitsandbytes round trip dequantized to identical values.

    Example:
        (`tmp`: an empty directory; about 15 seconds on a CPU.)

        >>> run_formats(tmp, seed=0)  # doctest: +ELLIPSIS
        qlora-jax demo: 4 random Gaussian kernels (2 layers of 1024x2816 + 2816x1024, ...), block size 64
        <BLANKLINE>
        | format | double_quant | bytes/param | relative MSE |
        |---|---|---|---|
        | nf4 | False | 0.5625 | 8.460e-03 |
        | nf4 | True | 0.5159 | 8.464e-03 |
        | fp4 | False | 0.5625 | 1.487e-02 |
        | fp4 | True | 0.5159 | 1.487e-02 |
        | int4 | False | 0.5625 | 1.157e-02 |
        | int4 | True | 0.5159 | 1.158e-02 |
        | int8 | False | 1.0625 | 3.516e-05 |
        | int8 | True | 1.0159 | 3.948e-05 |
        <BLANKLINE>
        bitsandbytes round trip (nf4, double_quant, ..., kernel 1024x2816): dequantizes to identical values
        wrote .../quantization.json
        True
    """
    kernels = stack_kernels(seed)
    log(f"qlora-jax demo: {len(kernels)} random Gaussian kernels ({STACK_LAYERS} layers of "
        f"{' + '.join(shape_str(s) for s in STACK_SHAPES)}, {sum(k.size for k in kernels):,} float32 weights, "
        f"seed {seed}), block size {STACK_BLOCK_SIZE}\n")
    rows = quantization_rows(kernels)
    log(markdown_table(rows) + "\n")
    identical = bnb_round_trip_identical(kernels[0])
    log(f"bitsandbytes round trip (nf4, double_quant, to_bnb -> from_bnb, kernel {shape_str(kernels[0].shape)}): "
        + ("dequantizes to identical values" if identical else "MISMATCH: dequantized values differ"))
    path = write_results(Path(output), seed, rows, identical)
    log(f"wrote {path}")
    return identical


def stack_kernels(seed: int) -> list[jax.Array]:
    """The random stack's float32 standard-normal kernels `[in, out]`, layer by layer.

    Example:
        >>> [k.shape for k in stack_kernels(0)][:2]
        [(1024, 2816), (2816, 1024)]
    """
    keys = jax.random.split(jax.random.key(seed), STACK_LAYERS * len(STACK_SHAPES))
    shapes = [s for _ in range(STACK_LAYERS) for s in STACK_SHAPES]
    return [jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes, strict=True)]


def quantization_rows(kernels: Sequence[jax.Array]) -> list[dict[str, Any]]:
    """Bytes/param and relative MSE of the whole stack per format and double_quant.

    Example:
        >>> rows = quantization_rows([jnp.ones((64, 64))])
        >>> rows[0]["format"], rows[0]["bytes_per_param"]
        ('nf4', 0.5625)
    """
    cases = [(fmt, dq) for fmt in STACK_FORMATS for dq in (False, True)]
    return [_measure(kernels, fmt, dq) for fmt, dq in tqdm(cases, desc="quantizing", unit="format")]


def _measure(kernels: Sequence[jax.Array], fmt: str, double_quant: bool) -> dict[str, Any]:
    """One table row: totals over all kernels of one format."""
    nbytes, sq_err, sq_norm = 0, 0.0, 0.0
    for kernel in kernels:
        q = qj.quantize(kernel, fmt, STACK_BLOCK_SIZE, double_quant)
        nbytes += q.nbytes
        err, norm = _squared_error(q, kernel)
        sq_err, sq_norm = sq_err + float(err), sq_norm + float(norm)
    return {"format": fmt, "double_quant": double_quant, "bytes_per_param": nbytes / sum(k.size for k in kernels),
            "relative_mse": sq_err / sq_norm}


@jax.jit
def _squared_error(q: qj.QuantizedArray, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`sum((dequantize(q) - kernel)**2)` and `sum(kernel**2)`."""
    err = qj.dequantize(q, jnp.float32) - kernel
    return jnp.sum(err * err), jnp.sum(kernel * kernel)


def bnb_round_trip_identical(kernel: jax.Array) -> bool:
    """Whether `from_bnb(to_bnb(q))` dequantizes bit for bit like `q` (NF4, double quant).

    Example:
        >>> bnb_round_trip_identical(jnp.ones((128, 64)))
        True
    """
    q = qj.quantize(kernel, "nf4", STACK_BLOCK_SIZE, double_quant=True)
    back = qj.from_bnb(qj.to_bnb(q))
    a, b = np.asarray(qj.dequantize(q)), np.asarray(qj.dequantize(back))
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table.

    Example:
        >>> print(markdown_table([{"format": "nf4", "double_quant": True, "bytes_per_param": 0.5159,
        ...                        "relative_mse": 0.00846}]).splitlines()[2])
        | nf4 | True | 0.5159 | 8.460e-03 |
    """
    lines = ["| format | double_quant | bytes/param | relative MSE |", "|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['double_quant']} | {r['bytes_per_param']:.4f} | {r['relative_mse']:.3e} |"
              for r in rows]
    return "\n".join(lines)


def write_results(output: Path, seed: int, rows: Sequence[dict[str, Any]], round_trip: bool) -> Path:
    """Writes `quantization.json` into `output` (created if needed); returns its path.

    Example:
        (`tmp`: an empty directory.)

        >>> path = write_results(tmp / "formats", 0, [], True)
        >>> path.relative_to(tmp).as_posix(), json.loads(path.read_text())["bnb_round_trip_identical"]
        ('formats/quantization.json', True)
    """
    output.mkdir(parents=True, exist_ok=True)
    path = output / "quantization.json"
    result = {"seed": seed, "block_size": STACK_BLOCK_SIZE, "layers": STACK_LAYERS,
              "kernel_shapes": [shape_str(s) for _ in range(STACK_LAYERS) for s in STACK_SHAPES],
              "rows": list(rows), "bnb_round_trip_identical": round_trip}
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def shape_str(shape: Sequence[int]) -> str:
    """`(1024, 2816)` as `"1024x2816"`.

    Example:
        >>> shape_str((1024, 2816))
        '1024x2816'
    """
    return "x".join(str(d) for d in shape)

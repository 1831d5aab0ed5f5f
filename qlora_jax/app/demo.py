"""The built-in `qlora-jax demo`: QLoRA next to 32-bit LoRA on a small model, end to end on a CPU.

No released model can be downloaded here, so the demo makes its own stand-in:
a small Llama-family `CausalLM` over a character vocabulary, pre-trained from
scratch (every weight, AdamW) on a synthetic corpus of "copy" lines and word
lists, and cached as an `.npz` file keyed by a hash of its settings. It then
fine-tunes that base on a task the corpus never shows, reversing a word
(`"reverse stone = enots"`), twice with the same data, seed and schedule:

* QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314): the
  linear layers stored in NF4 with double quantization, rank-8 adapters on
  every linear layer but the head;
* LoRA over the float32 base (`quant=None`), the baseline.

The loss is on the answer tokens only. Each method is scored by its eval loss
and by exact-match accuracy of greedy `generate` on held-out words, next to
the bytes per parameter of its frozen base and the memory of its compiled
train step (`step_memory`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from qlora_jax._src.config import LoraConfig, QuantConfig
from qlora_jax._src.memory import linear_param_count, step_memory
from qlora_jax._src.models.config import ModelConfig
from qlora_jax._src.models.generate import generate
from qlora_jax._src.models.llama import CausalLM
from qlora_jax._src.nn.variables import FrozenWeight, QuantizedWeight
from qlora_jax._src.surgery.apply import apply_qlora
from qlora_jax._src.train.config import TrainConfig
from qlora_jax._src.train.loss import masked_cross_entropy
from qlora_jax._src.train.trainer import Trainer
from qlora_jax.app.plot import plot_curves

__all__ = ["DemoConfig", "CharVocab", "QUICK", "reverse_task", "pack", "run_demo", "results_table"]

# Bumped whenever the pre-training recipe changes, so that old cached bases are not reused.
_CACHE_VERSION = 1
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


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
    pretrain_steps: int = 300  # full pre-training updates of the base
    pretrain_lr: float = 3e-3  # peak AdamW learning rate of the pre-training (cosine decay)
    finetune_steps: int = 300  # adapter updates per method
    finetune_lr: float = 4e-3  # peak adapter learning rate (constant after a 3% warmup)
    rank: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA alpha
    eval_words: int = 200  # held-out words scored by exact match
    min_word: int = 3  # shortest word
    max_word: int = 6  # longest word
    seed: int = 0  # seeds the corpus, the base's initialization and the adapters

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "seq_len"):
            if getattr(self, name) % 64:
                raise ValueError(f"DemoConfig.{name}: must be a multiple of 64, got {getattr(self, name)}")
        for name in ("num_layers", "batch_size", "pretrain_steps", "finetune_steps", "rank", "eval_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name}: must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.min_word <= self.max_word or 2 * self.max_word + 12 > self.seq_len:
            raise ValueError(f"DemoConfig.min_word/max_word: need 1 <= min_word <= max_word and an example "
                             f"(~2 * max_word + 12 tokens) that fits seq_len {self.seq_len}")

    def model_config(self, vocab_size: int = 64) -> ModelConfig:
        """The stand-in base's architecture."""
        return ModelConfig(vocab_size=vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, max_position_embeddings=256)

    def base_key(self) -> str:
        """A hash of everything the pre-trained base depends on (its cache file name)."""
        fields = {k: getattr(self, k) for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                                 "num_kv_heads", "seq_len", "batch_size", "pretrain_steps",
                                                 "pretrain_lr", "min_word", "max_word", "seed")}
        text = json.dumps({"version": _CACHE_VERSION, "vocab": CharVocab.SYMBOLS, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# The reduced settings of `qlora-jax demo --quick` (a smoke test, not a result).
QUICK = DemoConfig(hidden_size=64, intermediate_size=128, seq_len=64, batch_size=8, pretrain_steps=30,
                   finetune_steps=20, eval_words=32)


class Tokenizer(Protocol):
    """What the demo needs of a tokenizer (`CharVocab`, or a wrapped Hugging Face one)."""

    pad_id: int
    eos_id: int

    def encode(self, text: str, *, bos: bool) -> list[int]: ...  # noqa: D102

    def decode(self, ids: Sequence[int]) -> str: ...  # noqa: D102


class CharVocab:
    """The stand-in base's vocabulary: one token per character, plus pad, bos and eos (64 ids).

    Example:
        >>> vocab = CharVocab()
        >>> vocab.decode(vocab.encode("abc = cba", bos=True))
        'abc = cba'
    """

    SYMBOLS = ("<pad>", "<bos>", "<eos>", *" .:=>", *_LETTERS, *"0123456789")
    pad_id, bos_id, eos_id = 0, 1, 2
    size = 64  # SYMBOLS padded to a multiple of 64

    def __init__(self) -> None:
        """Builds the character table."""
        self._index = {s: i for i, s in enumerate(self.SYMBOLS)}

    def encode(self, text: str, *, bos: bool) -> list[int]:
        """Token ids of `text`, after `<bos>` when `bos`; unknown characters raise `ValueError`."""
        unknown = sorted(set(text) - set(self._index))
        if unknown:
            raise ValueError(f"text: characters {unknown} are not in the demo vocabulary")
        return [self.bos_id] * bos + [self._index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` up to the first `<eos>`, without special tokens."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i > self.eos_id and i < len(self.SYMBOLS):
                out.append(self.SYMBOLS[i])
        return "".join(out)


class _HFTokenizer:
    """A `transformers` tokenizer seen through the `Tokenizer` protocol."""

    def __init__(self, tokenizer: Any):
        if tokenizer.eos_token_id is None:
            raise ValueError("--model: the tokenizer has no eos token, which the demo's answers end with")
        self._tok = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

    def encode(self, text: str, *, bos: bool) -> list[int]:
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        if bos and self._tok.bos_token_id is not None:
            ids = [int(self._tok.bos_token_id), *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._tok.decode(ids, skip_special_tokens=True)


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


Example = tuple[list[int], list[float]]  # token ids (bos ... eos) and the loss weight of predicting each id


def _prompt_answer_example(tok: Tokenizer, prompt: str, answer: str) -> Example:
    """Ids of prompt + answer + eos, with loss only on the answer and eos."""
    p = tok.encode(prompt, bos=True)
    a = tok.encode(answer, bos=False) + [tok.eos_id]
    return p + a, [0.0] * len(p) + [1.0] * len(a)


def pack(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """Packs examples into rows of `seq_len` tokens (segment ids, positions restarting per example).

    The input of each example is its ids but the last, the targets its ids but
    the first, weighted by the weight of the target; padding has weight 0 and
    segment id 0.

    Args:
        examples: `(ids, weights)` pairs, `len(ids) == len(weights) <= seq_len + 1`.
        seq_len: Tokens per row.
        pad_id: Token id of the padding.

    Returns:
        Rows as dicts of `[seq_len]` arrays: `input_ids`, `targets`, `weights`,
        `positions`, `segment_ids`.

    Example:
        >>> rows = pack([([1, 5, 6, 2], [0, 0, 1, 1]), ([1, 7, 2], [0, 1, 1])], seq_len=8)
        >>> len(rows), rows[0]["input_ids"].tolist(), rows[0]["segment_ids"].tolist()
        (1, [1, 5, 6, 1, 7, 0, 0, 0], [1, 1, 1, 2, 2, 0, 0, 0])
        >>> rows[0]["targets"].tolist(), rows[0]["weights"].tolist()
        ([5, 6, 2, 7, 2, 0, 0, 0], [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    """
    rows: list[dict[str, np.ndarray]] = []
    row: dict[str, list] = {}

    def flush() -> None:
        if row.get("input_ids"):
            n = seq_len - len(row["input_ids"])
            fill = {"input_ids": pad_id, "targets": pad_id, "weights": 0.0, "positions": 0, "segment_ids": 0}
            rows.append({k: np.asarray(v + [fill[k]] * n, np.float32 if k == "weights" else np.int32)
                         for k, v in row.items()})
        row.clear()
        row.update({k: [] for k in ("input_ids", "targets", "weights", "positions", "segment_ids")})

    flush()
    for ids, weights in examples:
        n = len(ids) - 1
        if n > seq_len:
            raise ValueError(f"examples: an example of {len(ids)} tokens does not fit seq_len {seq_len}")
        if len(row["input_ids"]) + n > seq_len:
            flush()
        segment = (row["segment_ids"][-1] if row["segment_ids"] else 0) + 1
        row["input_ids"] += ids[:-1]
        row["targets"] += ids[1:]
        row["weights"] += [float(w) for w in weights[1:]]
        row["positions"] += list(range(n))
        row["segment_ids"] += [segment] * n
    flush()
    return rows


def _batches(rows: list[dict[str, np.ndarray]], batch_size: int, drop_last: bool = True) -> list[dict[str, np.ndarray]]:
    stop = len(rows) - len(rows) % batch_size if drop_last else len(rows)
    return [{k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
            for i in range(0, stop, batch_size)]


def _pretrain_batches(cfg: DemoConfig, vocab: CharVocab) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng([cfg.seed, 1])
    rows: list[dict[str, np.ndarray]] = []
    while len(rows) < cfg.pretrain_steps * cfg.batch_size:
        lines = [_pretrain_line(rng, cfg) for _ in range(256)]
        rows += pack([(ids, [1.0] * len(ids)) for ids in (vocab.encode(t, bos=True) + [vocab.eos_id]
                                                             for t in lines)], cfg.seq_len, vocab.pad_id)
    return _batches(rows[: cfg.pretrain_steps * cfg.batch_size], cfg.batch_size)


@dataclasses.dataclass(frozen=True)
class TaskData:
    """The fine-tuning task: packed train batches, eval batches and held-out prompts with answers."""

    train: list[dict[str, np.ndarray]]
    eval: list[dict[str, np.ndarray]]
    prompts: list[list[int]]
    answers: list[str]


def task_data(cfg: DemoConfig, tok: Tokenizer) -> TaskData:
    """Reverse-the-word examples: train words and held-out words never overlap.

    Example:
        >>> data = task_data(QUICK, CharVocab())
        >>> len(data.train) == QUICK.finetune_steps, len(data.answers) == QUICK.eval_words
        (True, True)
    """
    rng = np.random.default_rng([cfg.seed, 2])
    train_words: list[str] = []
    eval_words: list[str] = []
    seen: set[str] = set()
    rows: list[dict[str, np.ndarray]] = []
    while len(rows) < cfg.finetune_steps * cfg.batch_size or len(eval_words) < cfg.eval_words:
        for word in _words(rng, 256, cfg):
            if _held_out(word):
                if word not in seen and len(eval_words) < cfg.eval_words:
                    eval_words.append(word)
                    seen.add(word)
            else:
                train_words.append(word)
        rows = pack([_prompt_answer_example(tok, *reverse_task(w)) for w in train_words], cfg.seq_len, tok.pad_id)
    examples = [_prompt_answer_example(tok, *reverse_task(w)) for w in eval_words]
    return TaskData(train=_batches(rows[: cfg.finetune_steps * cfg.batch_size], cfg.batch_size),
                    eval=_batches(pack(examples, cfg.seq_len, tok.pad_id), cfg.batch_size, drop_last=False),
                    prompts=[tok.encode(reverse_task(w)[0], bos=True) for w in eval_words],
                    answers=[reverse_task(w)[1] for w in eval_words])


# ---------------------------------------------------------------- the stand-in base


@nnx.jit
def _pretrain_step(model: CausalLM, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]) -> jax.Array:
    def loss_fn(model: CausalLM) -> jax.Array:
        logits = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        loss_sum, weight_sum = masked_cross_entropy(logits, batch["targets"], batch["weights"])
        return loss_sum / jnp.maximum(weight_sum, 1.0)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and float moments
        optimizer.update(model, grads)
    return loss


def pretrain_base(cfg: DemoConfig, *, progress: bool = True) -> tuple[CausalLM, list[float]]:
    """Pre-trains the stand-in base from scratch (all weights, AdamW, cosine schedule).

    Returns:
        The model and its loss per step.

    Example:
        >>> model, losses = pretrain_base(dataclasses.replace(QUICK, pretrain_steps=2), progress=False)
        >>> len(losses), model.config.hidden_size
        (2, 64)
    """
    vocab = CharVocab()
    model = CausalLM(cfg.model_config(vocab.size), rngs=nnx.Rngs(cfg.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.pretrain_lr, max(1, cfg.pretrain_steps // 20),
                                                  cfg.pretrain_steps, cfg.pretrain_lr * 0.05)
    with jax.numpy_dtype_promotion("standard"):
        optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                                     optax.adamw(schedule, weight_decay=0.01)), wrt=nnx.Param)
    losses = []
    for batch in tqdm(_pretrain_batches(cfg, vocab), desc="pre-training the stand-in base", unit="step",
                      disable=not progress):
        losses.append(float(_pretrain_step(model, optimizer, batch)))
    return model, losses


def _flat_params(model: nnx.Module) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def save_base(path: Path, model: CausalLM) -> None:
    """Writes the model's parameters to an `.npz` file (written to a temporary name, then renamed)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in _flat_params(model).items()})
    tmp.replace(path)


def load_base(path: Path, config: ModelConfig) -> CausalLM:
    """A `CausalLM` with the parameters `save_base` wrote; raises `ValueError` when they do not fit `config`."""
    model = CausalLM(config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    with np.load(path) as saved:
        names = [jax.tree_util.keystr(p) for p, _ in leaves]
        if sorted(names) != sorted(saved.files):
            raise ValueError(f"{path}: its parameters do not match the demo model (delete the file to rebuild it)")
        arrays = []
        for name, (_, leaf) in zip(names, leaves, strict=True):
            if saved[name].shape != leaf.shape:
                raise ValueError(f"{path}: {name} has shape {saved[name].shape}, expected {leaf.shape}")
            arrays.append(jnp.asarray(saved[name], leaf.dtype))
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, arrays))
    return model


# ---------------------------------------------------------------- fine-tuning and scoring


def accuracy(model: CausalLM, tok: Tokenizer, prompts: Sequence[list[int]], answers: Sequence[str],
             max_new_tokens: int) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy answers (prompts left-padded and batched); returns it and the answers."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), tok.pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    out = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_id,
                   pad_token_id=tok.pad_id)
    texts = [tok.decode(row.tolist()).strip() for row in out]
    return sum(t == a for t, a in zip(texts, answers, strict=True)) / len(answers), texts


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


def _linear_bytes(model: nnx.Module, config: ModelConfig, kind: type[nnx.Variable]) -> tuple[int, int]:
    """Bytes of the frozen linear base weights (variables of type `kind`) and their logical parameter count."""
    nbytes = sum(int(a.nbytes) for a in jax.tree.leaves(nnx.state(model, kind)))
    return nbytes, linear_param_count(config)


def finetune(make_base: Callable[[], CausalLM], method: str, data: TaskData, tok: Tokenizer, cfg: DemoConfig,
             max_new_tokens: int, *, progress: bool = True) -> tuple[MethodResult, CausalLM]:
    """Adds adapters to a fresh base (`"qlora"`: NF4 + double quant; `"lora"`: float32), trains and scores them."""
    model = make_base()
    quant = QuantConfig(fmt="nf4", block_size=64, double_quant=True) if method == "qlora" else None
    model = apply_qlora(model, quant=quant, lora=LoraConfig(rank=cfg.rank, alpha=cfg.alpha, dropout=0.0),
                        rngs=nnx.Rngs(cfg.seed + 1))
    nbytes, nparams = _linear_bytes(model, model.config, QuantizedWeight if quant is not None else FrozenWeight)
    trainer = Trainer(model, TrainConfig(total_steps=len(data.train), lr=cfg.finetune_lr, warmup_ratio=0.03,
                                         max_grad_norm=1.0, seed=cfg.seed))
    losses, times = [], []
    label = "QLoRA (NF4 + DQ)" if method == "qlora" else "LoRA (32-bit base)"
    for batch in tqdm(data.train, desc=f"fine-tuning {label}", unit="step", disable=not progress):
        start = time.perf_counter()
        losses.append(float(trainer.train_step(batch)["loss"]))  # float() waits for the step
        times.append(time.perf_counter() - start)
    eval_loss = trainer.evaluate(data.eval)["loss"]
    acc, texts = accuracy(model, tok, data.prompts, data.answers, max_new_tokens)
    name = "QLoRA: NF4 + double quant base, rank-8 LoRA" if method == "qlora" else "LoRA: float32 base, rank-8 LoRA"
    result = MethodResult(method=name, eval_loss=eval_loss, accuracy=acc, bytes_per_param=nbytes / nparams,
                          base_linear_bytes=nbytes, median_step_s=statistics.median(times[1:] or times),
                          losses=losses, samples=_samples(data, texts))
    return result, model


def _samples(data: TaskData, texts: list[str], n: int = 3) -> list[tuple[str, str, str]]:
    return [(a[::-1], a, t) for a, t in zip(data.answers[:n], texts[:n], strict=True)]


def base_result(model: CausalLM, data: TaskData, tok: Tokenizer, max_new_tokens: int) -> MethodResult:
    """The base model without fine-tuning, scored like the fine-tuned ones."""
    from qlora_jax._src.train.step import evaluate

    nbytes = sum(int(v.nbytes) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                 if path[-1] == "kernel" and "lm_head" not in path)  # [layers, in, out] stacked kernels
    nparams = linear_param_count(model.config)
    acc, texts = accuracy(model, tok, data.prompts, data.answers, max_new_tokens)
    return MethodResult(method="base model, no fine-tuning", eval_loss=evaluate(model, data.eval)["loss"],
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
        model_path: A Hugging Face checkpoint directory to fine-tune instead of
            the stand-in base (only the fine-tuning comparison runs).
        progress: Show progress bars.
        log: Where the text goes.

    Returns:
        The results: `rows` (one dict per method), `base` (cache file,
        whether it was reused), `settings`, `seconds`.

    Example:
        >>> result = run_demo("/tmp/qlora_jax_demo_quick", QUICK)  # doctest: +SKIP
        >>> result["rows"][1]["bytes_per_param"] <= 0.52  # doctest: +SKIP
        True
    """
    t0 = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    base_info: dict[str, Any]
    timings: dict[str, float] = {}
    if model_path is None:
        tok: Tokenizer = CharVocab()
        config = cfg.model_config(CharVocab.size)
        cache = output / f"base_{cfg.base_key()}.npz"
        log("qlora-jax demo: QLoRA vs 32-bit LoRA on a small Llama-family model, on this machine's "
            f"{jax.default_backend().upper()}.")
        log(f"The base model is a STAND-IN for a released model (none can be downloaded here): a "
            f"{config.num_params / 1e6:.2f}M-parameter Llama-style decoder ({cfg.num_layers} layers, hidden "
            f"{cfg.hidden_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, {CharVocab.size}-symbol "
            f"character vocabulary) pre-trained from scratch for {cfg.pretrain_steps} steps on synthetic "
            "'copy' lines and word lists. Use --model PATH for a real checkpoint.")
        reused = cache.is_file()
        pretrain_losses: list[float] = []
        if reused:
            log(f"reusing the cached base {cache}")
        else:
            model, pretrain_losses = pretrain_base(cfg, progress=progress)
            save_base(cache, model)
            timings["pretrain"] = time.perf_counter() - t0
            log(f"pre-trained the base (loss {pretrain_losses[0]:.3f} -> {pretrain_losses[-1]:.3f}); cached in {cache}")
        base_info = {"stand_in": True, "cache": str(cache), "reused": reused, "pretrain_losses": pretrain_losses,
                     "params": config.num_params}

        def make_base() -> CausalLM:
            return load_base(cache, config)
    else:
        from qlora_jax._src.models.loading import from_pretrained, load_tokenizer

        hf_tok = load_tokenizer(model_path)
        if hf_tok is None:
            raise ValueError(f"--model: {model_path} has no tokenizer files")
        tok = _HFTokenizer(hf_tok)

        def make_base() -> CausalLM:
            return from_pretrained(model_path)

        config = make_base().config
        base_info = {"stand_in": False, "model": str(model_path), "params": config.num_params}
        log(f"qlora-jax demo: QLoRA vs 32-bit LoRA on {model_path} ({config.num_params / 1e6:.1f}M parameters)")

    data = task_data(cfg, tok)
    max_new = max(len(tok.encode(a, bos=False)) for a in data.answers) + 1
    log(f"fine-tuning task (not in the pre-training corpus): reverse a word, e.g. {reverse_task('stone')}; "
        f"{len(data.train)} steps of {cfg.batch_size} x {cfg.seq_len} packed tokens, loss on the answer only; "
        f"accuracy = exact match of greedy answers on {len(data.answers)} held-out words")

    rows = []
    if model_path is None:
        t = time.perf_counter()
        rows.append(base_result(make_base(), data, tok, max_new))
        timings["base_eval"] = time.perf_counter() - t
    curves = {}
    for method in ("qlora", "lora"):
        t = time.perf_counter()
        result, _ = finetune(make_base, method, data, tok, cfg, max_new, progress=progress)
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
        "rows": [{k: v for k, v in dataclasses.asdict(r).items()} for r in rows],
        "seconds": seconds, "timings": timings,
    }
    (output / "demo.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {output / 'loss.png'} and {output / 'demo.json'}; total time {seconds:.1f} s")
    return result

"""Fine-tuning data: JSONL validation, loss masks, packing, shuffling and exact resume.

Tokenizers are built offline: a word-level one (whitespace splits, so the
boundaries are trivial) and a byte-level BPE (spaces belong to tokens, as in
Llama 3 and Qwen), both with a BOS added by the post-processor.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as tok_models

from qlora_jax._src.data import (
    Batcher,
    DataStats,
    Example,
    collate,
    count_tokens,
    load_examples,
    load_jsonl,
    pack_examples,
    row_kind,
    tokenize_examples,
)
from qlora_jax.models import CausalLM, ModelConfig

CORPUS = ["the cat sat on the mat", "what is two plus two", "two plus two is four", "hello there how are you",
          "i am fine thanks", "you are a helpful assistant", "tell me a story about the cat"] * 3
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Plain template: no {% generation %} markers, so assistant turns are found by incremental rendering.
PLAIN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
GENERATION_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n"
                       "{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}\n{% else %}"
                       "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "you are a helpful assistant"},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "two plus two is four"},
    {"role": "user", "content": "tell me a story"},
    {"role": "assistant", "content": "the cat sat on the mat"},
]


def _tokenizer(kind: str):
    if kind == "wordlevel":
        tok = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, show_progress=False)
    else:
        tok = Tokenizer(tok_models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>",
                                                additional_special_tokens=SPECIALS[4:])


def finetune_files(tmp, rows=None, tokenizer: str = "wordlevel"):
    """A tiny Llama checkpoint with a `tokenizer` saved beside it, and `train.jsonl` of `rows` (if given), in `tmp`:
    `(checkpoint path, the transformers model, data path or None)`."""
    from test_models import make_checkpoint

    tok = _tokenizer(tokenizer)
    path, hf = make_checkpoint(tmp, "llama-gqa-untied", vocab_size=len(tok))
    tok.save_pretrained(path)
    if rows is None:
        return path, hf, None
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, hf, data


@pytest.fixture(params=["wordlevel", "bpe"])
def tokenizer(request):
    return _tokenizer(request.param)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _weighted_tokens(ex: Example) -> list[int]:
    return ex.input_ids[ex.loss_mask].tolist()


# ----------------------------------------------------------------------------------------------- JSONL validation


def test_load_jsonl_reads_every_schema_and_skips_blank_lines(tmp_path):
    rows = [{"text": "a"}, {"prompt": "p", "completion": "c"}, {"messages": CONVERSATION}]
    path = _write(tmp_path, [rows[0], "", "   ", rows[1], rows[2]])
    assert load_jsonl(path) == rows
    assert [row_kind(r) for r in rows] == ["text", "prompt_completion", "messages"]


BAD_ROWS = {
    "invalid JSON": ('{"text": "a"', "invalid JSON"),
    "not an object": ('["text"]', "expected a JSON object, got list"),
    "unknown key": ({"text": "a", "label": 1}, "match no schema"),
    "missing key": ({"prompt": "a"}, "match no schema"),
    "text not a string": ({"text": 3}, '"text" must be a string, got int'),
    "empty text": ({"text": ""}, '"text" is empty'),
    "whitespace prompt": ({"prompt": " \n", "completion": "c"}, '"prompt" is empty'),
    "empty completion": ({"prompt": "p", "completion": ""}, '"completion" is empty'),
    "messages not a list": ({"messages": "hi"}, '"messages" must be a list, got str'),
    "no messages": ({"messages": []}, '"messages" is empty'),
    "message not an object": ({"messages": ["hi"]}, '"messages"[0] must be an object'),
    "message extra key": ({"messages": [{"role": "user", "content": "a", "name": "x"}]}, '"messages"[0] has keys'),
    "unknown role": ({"messages": [{"role": "tool", "content": "a"}]}, "role 'tool'"),
    "empty content": ({"messages": [{"role": "user", "content": ""}]}, '"messages"[0]["content"] is empty'),
    "content not a string": ({"messages": [{"role": "user", "content": ["a"]}]}, "must be a string, got list"),
    "no assistant": ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
    "starts with assistant": ({"messages": [{"role": "assistant", "content": "a"}]}, "starts with a system or user"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_every_bad_row_is_an_error_naming_file_and_line(tmp_path, case):
    bad, message = BAD_ROWS[case]
    path = _write(tmp_path, [{"text": "fine"}, "", bad, {"text": "fine"}])
    with pytest.raises(ValueError, match="data.jsonl:3: ") as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def test_invalid_utf8_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: not valid UTF-8"):
        load_jsonl(path)


def test_missing_file_and_empty_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl", _tokenizer("wordlevel"), 16)
    with pytest.raises(ValueError, match="empty.jsonl: empty dataset"):
        load_jsonl(_write(tmp_path, ["", " "], name="empty.jsonl"))
    (tmp_path / "zero.jsonl").write_text("")
    with pytest.raises(ValueError, match="zero.jsonl: empty dataset"):
        load_jsonl(tmp_path / "zero.jsonl")
    with pytest.raises(ValueError, match="empty dataset"):
        tokenize_examples([], _tokenizer("wordlevel"), 16)
    with pytest.raises(ValueError, match="empty dataset"):
        Batcher([], batch_size=2, seq_len=8)


# ------------------------------------------------------------------------------------------------- loss masks


def test_text_rows_get_bos_and_eos_and_loss_everywhere(tokenizer):
    [ex], stats = tokenize_examples([{"text": "hello there how are you"}], tokenizer, 64)
    expected = [tokenizer.bos_token_id, *_ids(tokenizer, "hello there how are you"), tokenizer.eos_token_id]
    assert ex.input_ids.tolist() == expected
    assert ex.loss_mask[1:].all()
    assert stats == DataStats(num_rows=1, num_examples=1, num_tokens=len(expected), num_loss_tokens=len(expected) - 1,
                              num_truncated=0, num_truncated_tokens=0, num_dropped=0, max_length=len(expected))
    # A text that already ends with EOS does not get a second one; add_eos=False adds none.
    [ex2], _ = tokenize_examples([{"text": "hello there</s>"}], tokenizer, 64)
    assert ex2.input_ids.tolist().count(tokenizer.eos_token_id) == 1
    [ex3], _ = tokenize_examples([{"text": "hello there"}], tokenizer, 64, add_eos=False)
    assert ex3.input_ids[-1] != tokenizer.eos_token_id


def test_prompt_tokens_carry_no_loss_and_completion_tokens_do(tokenizer):
    prompt, completion = "what is two plus two", " two plus two is four"
    [ex], _ = tokenize_examples([{"prompt": prompt, "completion": completion}], tokenizer, 64)
    # Independent reference: the prompt and the completion tokenized on their own.
    prompt_ids = [tokenizer.bos_token_id, *_ids(tokenizer, prompt)]
    completion_ids = [*_ids(tokenizer, completion), tokenizer.eos_token_id]
    assert ex.input_ids.tolist() == prompt_ids + completion_ids
    assert ex.loss_mask.tolist() == [False] * len(prompt_ids) + [True] * len(completion_ids)
    # In the batch: exactly the completion tokens are weighted targets.
    batch = collate([[ex]], batch_size=1, seq_len=64)
    weighted = batch["targets"][0][batch["weights"][0] > 0].tolist()
    assert weighted == completion_ids


def test_a_token_merged_across_the_prompt_boundary_carries_loss():
    tokenizer = _tokenizer("bpe")
    [ex], _ = tokenize_examples([{"prompt": "the cat sat on the m", "completion": "at"}], tokenizer, 64)
    joint = _ids(tokenizer, "the cat sat on the mat")
    assert tokenizer.convert_ids_to_tokens(joint[-1]) == "Ġmat"  # " m" + "at" is one token
    assert ex.input_ids.tolist() == [tokenizer.bos_token_id, *joint, tokenizer.eos_token_id]
    assert _weighted_tokens(ex) == [joint[-1], tokenizer.eos_token_id]


@pytest.mark.parametrize("template", ["plain", "generation"])
def test_only_assistant_tokens_carry_loss(tokenizer, template):
    tokenizer.chat_template = PLAIN_TEMPLATE if template == "plain" else GENERATION_TEMPLATE
    [ex], _ = tokenize_examples([{"messages": CONVERSATION}], tokenizer, 128)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert ex.input_ids.tolist() == _ids(tokenizer, rendered)  # the template writes the BOS; no EOS is added
    # Independent reference: each assistant reply and its end-of-turn token, tokenized alone (the plain
    # template's turn also ends with the newline it writes after <|end|>).
    end = "<|end|>\n" if template == "plain" else "<|end|>"
    expected = [t for m in CONVERSATION if m["role"] == "assistant" for t in _ids(tokenizer, m["content"] + end)]
    assert _weighted_tokens(ex) == expected
    # The header, system and user tokens carry none.
    assistant_header = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert not ex.loss_mask[ex.input_ids == assistant_header].any()
    for m in CONVERSATION:
        if m["role"] != "assistant":
            ids = _ids(tokenizer, "\n" + m["content"] + "<|end|>")
            starts = [i for i in range(len(ex)) if ex.input_ids[i:i + len(ids)].tolist() == ids]
            assert len(starts) == 1, m
            assert not ex.loss_mask[starts[0]:starts[0] + len(ids)].any(), m


def test_chat_template_problems_are_errors_naming_the_line(tmp_path):
    tokenizer = _tokenizer("wordlevel")
    path = _write(tmp_path, [{"text": "fine"}, {"messages": CONVERSATION}])
    with pytest.raises(ValueError, match=r"data.jsonl:2: a messages row needs a chat template"):
        load_examples(path, tokenizer, 64)
    tokenizer.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}" \
                              "{% endif %}" + PLAIN_TEMPLATE
    with pytest.raises(ValueError, match=r"data.jsonl:2: the chat template failed.*no system role"):
        load_examples(path, tokenizer, 64)
    # A template whose render of the first turns is not a prefix of the whole conversation's.
    tokenizer.chat_template = "{{ messages | length }}" + PLAIN_TEMPLATE
    with pytest.raises(ValueError, match=r"data.jsonl:2: the chat template does not render .* as a prefix"):
        load_examples(path, tokenizer, 64)
    tokenizer.chat_template = GENERATION_TEMPLATE.replace("{% generation %}{{ m['content'] }}<|end|>",
                                                          "{{ m['content'] }}<|end|>{% generation %}")
    with pytest.raises(ValueError, match=r"data.jsonl:2: .*generation %\} blocks cover no token"):
        load_examples(path, tokenizer, 64)
    # Errors in tokenize_examples name the 0-based row.
    with pytest.raises(ValueError, match=r"row 1: \"text\" is empty"):
        tokenize_examples([{"text": "a"}, {"text": ""}], tokenizer, 64)


def test_long_rows_are_truncated_and_rows_without_loss_are_dropped_and_counted(tokenizer, tmp_path):
    long_text = " ".join(["the cat sat on the mat"] * 4)
    rows = [{"text": long_text}, {"prompt": long_text, "completion": " four"}, {"text": "hello there"}]
    examples, stats = tokenize_examples(rows, tokenizer, seq_len=8)
    full = [tokenizer.bos_token_id, *_ids(tokenizer, long_text), tokenizer.eos_token_id]
    assert examples[0].input_ids.tolist() == full[:8]
    assert len(examples) == 2  # the prompt fills all 8 tokens: no completion left, the row is dropped
    assert (stats.num_rows, stats.num_examples, stats.num_truncated, stats.num_dropped) == (3, 2, 2, 1)
    prompt_row = len(full) + len(_ids(tokenizer, " four"))  # BOS, prompt, completion, EOS
    assert stats.num_truncated_tokens == (len(full) - 8) + (prompt_row - 8)
    assert stats.max_length == prompt_row
    assert stats.num_tokens == sum(len(e) for e in examples)
    path = _write(tmp_path, [{"prompt": long_text, "completion": " four"}])
    with pytest.raises(ValueError, match=f"^{path}: no example left: all 1 rows .* seq_len=8"):
        load_examples(path, tokenizer, 8)


def test_example_validates_its_arrays():
    with pytest.raises(ValueError, match="loss_mask: shape"):
        Example([1, 2], [True])
    with pytest.raises(ValueError, match="input_ids: expected a non-empty 1-D"):
        Example([], [])
    with pytest.raises(ValueError, match="input_ids: expected non-negative int32"):
        Example([1.5], [True])


# ----------------------------------------------------------------------------------------------------- batching


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(3, 50, n), rng.random(n) < 0.7) for n in lengths]


def _check_batch_invariants(batch, seq_len):
    seg, pos, ids, tgt, w = (batch[k] for k in ("segment_ids", "positions", "input_ids", "targets", "weights"))
    for k, dtype in (("input_ids", np.int32), ("targets", np.int32), ("weights", np.float32),
                     ("positions", np.int32), ("segment_ids", np.int32)):
        assert batch[k].dtype == dtype and batch[k].shape == seg.shape, k
    assert seg.shape[1] == seq_len
    # A weighted target is the next token of the same segment; padding and segment ends carry no weight.
    nxt_same = np.zeros_like(w, bool)
    nxt_same[:, :-1] = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
    assert not (w[~nxt_same] > 0).any()
    assert (tgt[:, :-1][nxt_same[:, :-1]] == ids[:, 1:][nxt_same[:, :-1]]).all()
    # Segments are numbered 1, 2, ... left to right, padding (0) only at the end, positions restart at 0.
    for row_seg, row_pos in zip(seg, pos, strict=True):
        real = row_seg[row_seg > 0]
        assert (row_seg[len(real):] == 0).all()
        assert (np.diff(real) >= 0).all() and (real.size == 0 or real[0] == 1) and (np.diff(real) <= 1).all()
        for s in np.unique(real):
            assert row_pos[row_seg == s].tolist() == list(range(int((row_seg == s).sum())))


def test_pack_examples_is_best_fit_decreasing_and_uses_each_example_once():
    assert pack_examples([3, 6, 2, 5, 4], seq_len=8) == [[1, 2], [3, 0], [4]]
    lengths = np.random.default_rng(0).integers(1, 33, 500).tolist()
    rows = pack_examples(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 32 for row in rows)
    assert len(rows) <= 1.1 * sum(lengths) / 32  # close to the bound
    with pytest.raises(ValueError, match="example 1: 9 tokens, expected 1 to seq_len=8"):
        pack_examples([3, 9], 8)


def test_packed_batches_have_correct_segments_positions_and_targets():
    examples = _examples([5, 9, 3, 12, 7, 2, 16, 4, 8, 1, 6])
    batcher = Batcher(examples, batch_size=3, seq_len=16, seed=1)
    batches = list(batcher)
    assert len(batches) == batcher.num_batches_per_epoch == batcher.num_batches
    seen = []
    for batch in batches:
        _check_batch_invariants(batch, 16)
        for row_ids, row_seg in zip(batch["input_ids"], batch["segment_ids"], strict=True):
            seen += [tuple(row_ids[row_seg == s].tolist()) for s in np.unique(row_seg[row_seg > 0])]
    assert sorted(seen) == sorted(tuple(e.input_ids.tolist()) for e in examples)  # each example once per epoch
    # Weighted targets are exactly each example's loss-carrying tokens.
    assert sum(float(b["weights"].sum()) for b in batches) == sum(e.num_loss_tokens for e in examples)
    assert sum(count_tokens(b) for b in batches) == sum(len(e) for e in examples)
    assert batcher.tokens_per_batch * batcher.num_batches_per_epoch == sum(len(e) for e in examples)
    assert 0 < batcher.fill <= 1


def test_padded_batches_mask_padding():
    examples = _examples([5, 9, 3])
    [batch] = Batcher.for_eval(examples, batch_size=4, seq_len=10, pack=False)
    assert sorted(batch) == ["attention_mask", "input_ids", "positions", "targets", "weights"]
    for r, ex in enumerate(examples):
        n = len(ex)
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (10 - n)
        assert batch["input_ids"][r, :n].tolist() == ex.input_ids.tolist()
        assert batch["targets"][r, :n - 1].tolist() == ex.input_ids[1:].tolist()
        assert batch["weights"][r].tolist() == ex.loss_mask[1:].tolist() + [0.0] * (11 - n)
        assert batch["positions"][r, :n].tolist() == list(range(n))
    assert not batch["attention_mask"][3].any() and not batch["weights"][3].any()  # the empty filler row
    assert count_tokens(batch) == 17


def test_packing_does_not_let_examples_attend_to_each_other():
    tokenizer = _tokenizer("bpe")
    rows = [{"text": "the cat sat on the mat"}, {"prompt": "what is two plus two", "completion": " four"},
            {"text": "hello there how are you"}]
    examples, _ = tokenize_examples(rows, tokenizer, 32)
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    packed = collate([examples], batch_size=1, seq_len=32)
    assert packed["segment_ids"].max() == 3
    logits = model(jnp.asarray(packed["input_ids"]), positions=jnp.asarray(packed["positions"]),
                   segment_ids=jnp.asarray(packed["segment_ids"]))
    padded = collate([[e] for e in examples], batch_size=3, seq_len=32, pack=False)
    logits_padded = model(jnp.asarray(padded["input_ids"]), positions=jnp.asarray(padded["positions"]),
                          attention_mask=jnp.asarray(padded["attention_mask"]))
    # Reference: each example alone in its own row, right-padded, with no mask at all (causal attention
    # keeps the padding after it from reaching it), at default positions.
    alone = np.zeros((3, 32), np.int32)
    for r, ex in enumerate(examples):
        alone[r, :len(ex)] = ex.input_ids
    logits_alone = model(jnp.asarray(alone))
    start = 0
    for r, ex in enumerate(examples):
        n = len(ex)
        np.testing.assert_allclose(logits[0, start:start + n], logits_alone[r, :n], atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits_padded[r, :n], logits_alone[r, :n], atol=1e-5, rtol=0)
        start += n


def _row_orders(batcher):
    return [tuple(b["input_ids"][:, 0].tolist()) + tuple(b["input_ids"].sum(1).tolist()) for b in batcher]


def test_shuffle_is_deterministic_by_seed_and_differs_per_epoch():
    examples = _examples(range(1, 41))
    kw = dict(batch_size=4, seq_len=40, pack=False, num_epochs=2)
    first = _row_orders(Batcher(examples, seed=3, **kw))
    assert first == _row_orders(Batcher(examples, seed=3, **kw))
    assert first != _row_orders(Batcher(examples, seed=4, **kw))
    assert first[:10] != first[10:]  # each epoch is reshuffled
    assert sorted(first[:10]) != first[:10]
    in_order = list(Batcher.for_eval(examples, batch_size=4, seq_len=40, pack=False))
    assert len(in_order) == 10  # one pass
    assert [int(x) for b in in_order for x in b["attention_mask"].sum(1)] == list(range(1, 41))


@pytest.mark.parametrize("pack", [True, False])
def test_resume_continues_exactly_where_it_left_off(pack):
    examples = _examples(np.random.default_rng(1).integers(1, 20, 30).tolist())
    make = lambda: Batcher(examples, batch_size=3, seq_len=24, pack=pack, seed=5, num_epochs=3)  # noqa: E731
    straight = list(make())
    assert len(straight) == make().num_batches
    for stop in (7, make().num_batches_per_epoch, make().num_batches_per_epoch + 1):
        batcher = make()
        for _ in range(stop):
            next(batcher)
        state = json.loads(json.dumps(batcher.state()))
        rest = list(make().restore(state))
        assert len(rest) == len(straight) - stop
        for a, b in zip(rest, straight[stop:], strict=True):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    assert make().restore({"epoch": 3, "index": 0, "seed": 5, "num_rows": make().num_rows}).state()["epoch"] == 3
    assert list(make().restore({"epoch": 3, "index": 0, "seed": 5, "num_rows": make().num_rows})) == []


def test_restore_rejects_foreign_or_malformed_states():
    batcher = Batcher(_examples([3, 4, 5]), batch_size=2, seq_len=8, pack=False)
    with pytest.raises(ValueError, match=r"state\['seed'\] is 1, but this Batcher has seed=0"):
        batcher.restore({"epoch": 0, "index": 0, "seed": 1, "num_rows": 3})
    with pytest.raises(ValueError, match=r"state\['num_rows'\] is 4"):
        batcher.restore({"epoch": 0, "index": 0, "seed": 0, "num_rows": 4})
    with pytest.raises(ValueError, match="state: expected keys"):
        batcher.restore({"epoch": 0})
    with pytest.raises(ValueError, match=r"state\['index'\]: expected an int >= 0"):
        batcher.restore({"epoch": 0, "index": -1, "seed": 0, "num_rows": 3})
    with pytest.raises(ValueError, match=r"state\['index'\]: 3 is past"):
        batcher.restore({"epoch": 0, "index": 3, "seed": 0, "num_rows": 3})


def test_batcher_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"examples\[1\]: 9 tokens, more than seq_len=8"):
        Batcher(_examples([3, 9]), batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        Batcher(_examples([3]), batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="num_epochs"):
        Batcher(_examples([3]), batch_size=1, seq_len=8, num_epochs=0)
    with pytest.raises(ValueError, match=r"rows\[0\]: 2 examples in one row, but pack=False"):
        collate([_examples([2, 2])], batch_size=1, seq_len=8, pack=False)
    infinite = Batcher(_examples([3]), batch_size=1, seq_len=8, num_epochs=None)
    assert infinite.num_batches is None
    for _ in range(5):
        next(infinite)
    assert infinite.epoch == 5 and infinite.state()["index"] == 0

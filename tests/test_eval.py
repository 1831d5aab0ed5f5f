"""`qlora-jax eval` against transformers + PEFT (PyTorch, float32) on the token ids and loss masks of our data
pipeline: the perplexity over the loss-carrying tokens, over the float base and over the NF4 base (the reference's
weights dequantized by bitsandbytes), the token count, and greedy samples."""

import dataclasses
import json
import shutil

import numpy as np
import torch
from test_data import finetune_files
from test_models import ALL_LINEAR, peft_with_random_b

import qlora_jax as qj
from qlora_jax.app.cli import main
from qlora_jax.app.finetune import FinetuneArgs

ROWS = [{"prompt": "what is two plus two", "completion": " two plus two is four"},
        {"prompt": "the cat sat on", "completion": " the mat"},
        {"text": "i am fine thanks"},
        {"prompt": "hello there", "completion": " how are you"},
        {"prompt": "tell me a story about", "completion": " the cat sat on the mat"},
        {"prompt": "you are a", "completion": " helpful assistant"}]
SEQ_LEN = 32


def _reference(peft_model, examples) -> tuple[float, float]:
    """(Σ w·ce, Σ w) in float64 from PyTorch's float32 logits, each example run alone (w = loss_mask[t + 1])."""
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for ex in examples:
            logits = peft_model(torch.from_numpy(ex.input_ids[None].astype(np.int64))).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1).numpy()  # [n, vocab]
            ce = -logp[np.arange(len(ex) - 1), ex.input_ids[1:]]
            loss_sum += float(np.sum(ce * ex.loss_mask[1:]))
            tokens += float(ex.loss_mask[1:].sum())
    return loss_sum, tokens


def _greedy(peft_model, ids: list[int], steps: int, eos: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(peft_model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
    return out


def _eval_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object, nothing else on stdout
    return json.loads(out)


def test_eval_equals_transformers_peft_perplexity(tmp_path, capsys):
    path, hf, data = finetune_files(tmp_path, ROWS)
    peft_model = peft_with_random_b(hf, tmp_path, ALL_LINEAR).eval()
    tokenizer = qj.models.load_tokenizer(path)
    examples, _ = qj.data.load_examples(data, tokenizer, SEQ_LEN)  # the ids and masks the command evaluates
    assert len(examples) == len(ROWS) and len({len(ex) for ex in examples}) > 1

    # A finetune --output directory as --adapter: its run_config.json says float base (format None), seq_len 32.
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "adapter", run / "adapter")
    config = dataclasses.asdict(FinetuneArgs(model=str(path), data=str(data), output=str(run), format=None,
                                             seq_len=SEQ_LEN))
    (run / "run_config.json").write_text(json.dumps(config))
    got = _eval_json(capsys, "--model", str(path), "--data", str(data), "--adapter", str(run), "--batch-size", "2",
                     "--samples", "2", "--max-new-tokens", "6")
    loss_sum, tokens = _reference(peft_model, examples)
    # 1e-5 relative (the issue asks for 1e-4; measured about 1e-7 on both bases)
    assert got["format"] is None and got["seq_len"] == SEQ_LEN and got["examples"] == len(ROWS)
    assert got["tokens"] == tokens == sum(ex.num_loss_tokens for ex in examples)
    np.testing.assert_allclose(got["perplexity"], np.exp(loss_sum / tokens), rtol=1e-5)
    np.testing.assert_allclose(got["loss"], loss_sum / tokens, rtol=1e-5)
    float_ppl = got["perplexity"]
    # Greedy samples from the prompts (the tokenizer's BOS + the prompt), against PyTorch's greedy decoding.
    assert len(got["samples"]) == 2
    for sample, row in zip(got["samples"], ROWS, strict=False):
        prompt = tokenizer(row["prompt"])["input_ids"]
        assert sample["prompt"] == tokenizer.decode(prompt, skip_special_tokens=True)
        assert sample["expected"] == tokenizer.decode(tokenizer(row["completion"], add_special_tokens=False)
                                                      ["input_ids"] + [tokenizer.eos_token_id],
                                                      skip_special_tokens=True)
        assert sample["generated"] == tokenizer.decode(_greedy(peft_model, prompt, 6, tokenizer.eos_token_id),
                                                       skip_special_tokens=True)

    # NF4 without double quantization: the reference's base projections are bitsandbytes' own NF4 round trip of
    # the same weights (blocks of 64 along the input axis, as the loader quantizes them).
    from bitsandbytes import functional as bnb

    with torch.no_grad():
        for layer in peft_model.base_model.model.model.layers:
            for block, names in (("self_attn", ALL_LINEAR[:4]), ("mlp", ALL_LINEAR[4:])):
                for name in names:
                    linear = getattr(getattr(layer, block), name).base_layer
                    packed, state = bnb.quantize_4bit(linear.weight.data, blocksize=64, quant_type="nf4",
                                                      compress_statistics=False)
                    linear.weight.copy_(bnb.dequantize_4bit(packed, state, quant_type="nf4"))
    got = _eval_json(capsys, "--model", str(path), "--data", str(data), "--adapter", str(tmp_path / "adapter"),
                     "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--no-double-quant")
    loss_sum, tokens = _reference(peft_model, examples)
    assert got["format"] == "nf4" and got["tokens"] == tokens and got["samples"] == []
    np.testing.assert_allclose(got["perplexity"], np.exp(loss_sum / tokens), rtol=1e-5)
    assert abs(got["perplexity"] / float_ppl - 1) > 1e-3  # the base was quantized: not the float result

    # Bad input: one line on stderr naming the offending thing, exit 2, nothing on stdout.
    for argv, message in (
            (["--adapter", str(tmp_path)], f"--adapter: {tmp_path} is neither a PEFT adapter directory"),
            (["--data", str(tmp_path / "missing.jsonl")], f"{tmp_path / 'missing.jsonl'}: no such file"),
            (["--samples", "-1"], "--samples: must be an integer >= 0, got -1"),
            (["--seq-len", "100000"], "--seq-len: 100000 exceeds the model's max_position_embeddings")):
        args = {"--model": str(path), "--data": str(data), **dict(zip(argv[::2], argv[1::2], strict=True))}
        assert main(["eval", *[x for kv in args.items() for x in kv]]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith(f"qlora-jax eval: error: {message}"), captured.err


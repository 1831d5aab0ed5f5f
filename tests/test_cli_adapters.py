"""`qlora-jax finetune --use-dora --init pissa` end to end: the run's record, its export for PEFT over the original
checkpoint, and `qlora-jax eval` of the run, against PEFT's model in PyTorch. Refusals of the new flags:
tests/test_cli_preflight.py."""

import json
import math

import numpy as np
import torch
import transformers
from test_data import finetune_files

import qlora_jax as qj
from qlora_jax.app.cli import main
from qlora_jax.app.eval import inference_model
from qlora_jax.data import load_examples
from qlora_jax.models import load_tokenizer

ROWS = [{"prompt": "what is two plus two", "completion": "two plus two is four"},
        {"text": "the cat sat on the mat"},
        {"prompt": "hello there", "completion": "i am fine thanks"}] * 2


def test_dora_pissa_run_exports_for_peft_and_evaluates(tmp_path, capsys):
    """A 2-step DoRA run with PiSSA init over the float base (`--format none`: the conversion to an adapter over
    the original weights is exact there). Its `adapter_over_original/` loaded by `PeftModel` over the original
    checkpoint gives the logits of our model rebuilt from the run (residual base computed again, `adapter/` over
    it) to 1e-4, and `qlora-jax eval --adapter RUN` gives the perplexity computed here from PEFT's logits."""
    from peft import PeftModel

    path, hf, data = finetune_files(tmp_path, ROWS)
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(path), "--data", str(data), "--output", str(out), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--rank", "2", "--alpha", "4", "--lr", "5e-2",
                 "--targets", "q_proj", "--use-dora", "--init", "pissa", "--format", "none",
                 "--no-fit"]) == 0
    printed = capsys.readouterr().out
    assert f"for PEFT: {out / 'adapter_over_original'}" in printed
    run = json.loads((out / "run_config.json").read_text())
    assert (run["use_dora"], run["init"], run["loftq_iter"], run["format"]) == (True, "pissa", 1, None)
    converted = json.loads((out / "adapter_over_original" / "adapter_config.json").read_text())
    assert (converted["r"], converted["lora_alpha"], converted["use_dora"]) == (4, 8.0, True)

    tokenizer = load_tokenizer(path)
    examples, _ = load_examples(data, tokenizer, 16)
    assert len(examples) == 6  # the three rows, twice
    ids = np.zeros((3, 16), np.int64)  # the three distinct rows, padded at the end (causal: logits before unchanged)
    for i, ex in enumerate(examples[:3]):
        ids[i, :len(ex.input_ids)] = ex.input_ids
    ours = np.asarray(inference_model(path, out / "adapter", quant=None, run=run)(ids))
    with torch.no_grad():
        reference = PeftModel.from_pretrained(hf, out / "adapter_over_original").eval()(
            torch.tensor(ids)).logits.double().numpy()
        # adapter/ records init_lora_weights "pissa" (as PEFT does): PEFT computes PiSSA again from the original
        # weights and applies the adapter over the residual, the same model; without that record it is another
        # model (3e-3 here): the residual base matters.
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
        plain = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path), out / "adapter")
        np.testing.assert_allclose(plain.eval()(torch.tensor(ids)).logits.numpy(), reference, atol=1e-4, rtol=0)
        (out / "plain").mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (out / "plain" / name).write_bytes((out / "adapter" / name).read_bytes())
        config = json.loads((out / "plain" / "adapter_config.json").read_text())
        (out / "plain" / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": True}))
        plain = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path), out / "plain")
        assert np.abs(plain.eval()(torch.tensor(ids)).logits.numpy() - reference).max() > 1e-3  # 10x the tolerance
    loss_sum, tokens = 0.0, 0.0
    for i, ex in enumerate(examples[:3]):
        n = len(ex.input_ids)
        np.testing.assert_allclose(ours[i, :n], reference[i, :n], atol=1e-4, rtol=0)
        logp = reference[i, :n] - np.log(np.exp(reference[i, :n]).sum(-1, keepdims=True))
        weights = np.asarray(ex.loss_mask, np.float64)[1:]  # token t carries loss when predicted from t - 1
        loss_sum += 2 * float(-(weights * logp[np.arange(n - 1), ids[i, 1:n]]).sum())
        tokens += 2 * float(weights.sum())

    assert main(["eval", "--model", str(path), "--adapter", str(out), "--data", str(data), "--no-pack",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == tokens and result["format"] is None
    np.testing.assert_allclose(result["perplexity"], math.exp(loss_sum / tokens), rtol=1e-5)
    # adapter/ alone over the original checkpoint: PiSSA computed again from it, as PEFT does; the same perplexity.
    assert main(["eval", "--model", str(path), "--adapter", str(out / "adapter"), "--data", str(data), "--no-pack",
                 "--format", "none", "--json"]) == 0
    np.testing.assert_allclose(json.loads(capsys.readouterr().out)["perplexity"], math.exp(loss_sum / tokens),
                               rtol=1e-5)


def test_loftq_run_adapter_alone_generates_and_exports_over_its_base(tmp_path, capsys):
    """A LoftQ run's `adapter/` records `init_lora_weights: true` (PEFT's convention), so the adapter alone cannot
    say it needs the LoftQ base (after more than one round it is not the plain NF4 of the weights); `generate`/`export --adapter RUN/adapter` take it from the run beside it. The
    reference: `PeftModel` with `adapter/` over the run's `residual_base/` (the dequantized LoftQ base). The
    same adapter copied out of the run is another model (what these commands gave before), and a LoftQ run's
    adapter over another quantization is refused, naming both."""
    import pytest
    from peft import PeftModel

    path, _, data = finetune_files(tmp_path, ROWS)
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(path), "--data", str(data), "--output", str(out), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--rank", "2", "--alpha", "4", "--lr", "5e-2",
                 "--init", "loftq", "--loftq-iter", "3", "--save-residual-base", "--no-fit"]) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True
    ids = np.array([[1, 5, 9, 12, 7, 3, 22, 4]])
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(out / "residual_base")
        reference = PeftModel.from_pretrained(base, out / "adapter").eval()(torch.tensor(ids)).logits.numpy()

    assert main(["export", "--model", str(path), "--adapter", str(out / "adapter"), "--merged",
                 str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), reference, atol=1e-4, rtol=0)
    prompt = "what is two plus two"
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--adapter", str(out / "adapter"), "--prompt", prompt,
                 "--max-new-tokens", "4"]) == 0
    tokenizer = load_tokenizer(path)
    prompt_ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        greedy = merged.generate(torch.tensor([prompt_ids]), max_new_tokens=4, do_sample=False)[0, len(prompt_ids):]
    assert capsys.readouterr().out.strip() == tokenizer.decode(greedy.tolist(), skip_special_tokens=True).strip()

    copied = tmp_path / "copied"
    copied.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (copied / name).write_bytes((out / "adapter" / name).read_bytes())
    alone = np.asarray(inference_model(path, copied, quant=qj.QuantConfig())(ids))
    assert np.abs(alone - reference).max() > 1e-3  # 10x the tolerance: over plain NF4, not the LoftQ base
    with pytest.raises(ValueError, match=r"LoftQ base quantized as nf4, block size 64, with double quantization, "
                                         r"not fp4, block size 64"):
        inference_model(path, out, quant=qj.QuantConfig(fmt="fp4"))

"""`qlora-jax finetune --use-dora --init pissa` end to end: the run's record, its export for PEFT over the original
checkpoint, and `qlora-jax eval` of the run, against PEFT's model in PyTorch. Refusals of the new flags:
tests/test_cli_preflight.py."""

import json
import math

import numpy as np
import torch
from test_data import finetune_files

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
                 "--targets", "q_proj", "down_proj", "--use-dora", "--init", "pissa", "--format", "none",
                 "--no-fit"]) == 0
    printed = capsys.readouterr().out
    assert f"for PEFT: {out / 'adapter_over_original'}" in printed
    run = json.loads((out / "run_config.json").read_text())
    assert (run["use_dora"], run["init"], run["loftq_iter"], run["format"]) == (True, "pissa", 1, None)
    converted = json.loads((out / "adapter_over_original" / "adapter_config.json").read_text())
    assert (converted["r"], converted["lora_alpha"], converted["use_dora"]) == (4, 8.0, True)

    ours = inference_model(path, out / "adapter", quant=None, run=run)
    peft_model = PeftModel.from_pretrained(hf, out / "adapter_over_original").eval()
    tokenizer = load_tokenizer(path)
    examples, _ = load_examples(data, tokenizer, 16)
    loss_sum, tokens = 0.0, 0.0
    for ex in examples[:3]:  # the three distinct rows (each twice in the data)
        ids = np.asarray(ex.input_ids)[None]
        with torch.no_grad():
            reference = peft_model(torch.tensor(ids)).logits.double().numpy()[0]
        np.testing.assert_allclose(np.asarray(ours(ids))[0], reference, atol=1e-4, rtol=0)
        logp = reference - np.log(np.exp(reference).sum(-1, keepdims=True))
        weights = np.asarray(ex.loss_mask, np.float64)[1:]  # token t carries loss when predicted from t-1
        loss_sum += 2 * float(-(weights * logp[np.arange(len(ids[0]) - 1), ids[0, 1:]]).sum())
        tokens += 2 * float(weights.sum())
    assert len(examples) == 6

    # The trained adapter over the original weights is another model: the residual base matters.
    plain = inference_model(path, out / "adapter", quant=None)
    assert np.abs(np.asarray(plain(ids))[0] - reference).max() > 1e-2

    assert main(["eval", "--model", str(path), "--adapter", str(out), "--data", str(data), "--no-pack",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == tokens and result["format"] is None
    np.testing.assert_allclose(result["perplexity"], math.exp(loss_sum / tokens), rtol=1e-5)

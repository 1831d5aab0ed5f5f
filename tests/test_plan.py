"""The memory planner (`plan_fit`, `memory --fit`, `finetune`'s plan) against the compiled steps' own numbers:
each threshold below is computed here by `step_memory`, none is written down."""

import functools
import inspect
import json
import time

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from test_data import finetune_files

from qlora_jax._src.config import QuantConfig
from qlora_jax._src.memory import step_memory
from qlora_jax._src.models.loading import load_config
from qlora_jax._src.train import TrainConfig
from qlora_jax.app import finetune as finetune_module
from qlora_jax.app import plan as plan_module
from qlora_jax.app.cli import main
from qlora_jax.app.plan import RESERVE_BYTES, RESERVE_FRACTION, DoesNotFit, need_bytes, plan_fit
from qlora_jax.models import ModelConfig

CONFIG = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=1024)
SETTINGS = dict(rank=4, alpha=8.0, dtype=jnp.dtype("float32"))
BATCH, SEQ = 2, 256
ROWS = [{"prompt": "what is two plus two", "completion": "two plus two is four"},
        {"text": "the cat sat on the mat"}] * 8


@pytest.fixture(scope="module")
def compile_once():
    """`step_memory` remembered by its arguments (defaults filled in), in this module and in the planner: every
    setting is compiled once (the numbers are the compiled ones; only the repeats are skipped)."""
    signature = inspect.signature(step_memory)
    remembered = functools.cache(lambda arguments: step_memory(**dict(arguments)))

    def cached(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return remembered(tuple(bound.arguments.items()))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(plan_module, "step_memory", cached)
        yield cached


def _need(measure, config, method, batch, micro, remat, seq_len, **settings):
    """What the planner's documented rule says a candidate needs, from the compiled step."""
    m = measure(config, method, batch_size=micro, seq_len=seq_len, remat=remat, **settings)
    extra = 0 if micro == batch else m.gradient_bytes + 12 * (batch - micro) * seq_len
    return need_bytes(m.compiled_total + extra)


def test_need_is_the_step_plus_the_documented_allowance():
    assert need_bytes(0) == RESERVE_BYTES
    assert need_bytes(2**30) == int(2**30 * (1 + RESERVE_FRACTION)) + RESERVE_BYTES


def test_the_first_candidate_that_fits_is_picked(compile_once):
    needs = {(micro, remat): _need(compile_once, CONFIG, "qlora", BATCH, micro, remat, SEQ, **SETTINGS)
             for micro in (2, 1) for remat in (False, True)}
    # What the cases below rely on: rematerialization and halving the batch each need less.
    assert needs[2, True] < needs[2, False] and needs[1, False] < needs[2, True], needs

    def plan(available, **kw):
        return plan_fit(CONFIG, "qlora", batch_size=BATCH, seq_len=SEQ, available_bytes=available, **SETTINGS, **kw)

    p = plan(needs[2, False])  # just enough for the whole batch without remat
    assert (p.remat, p.micro_batch, p.grad_accum, p.need_bytes) == (False, 2, 1, needs[2, False])
    assert len(p.candidates) == 1 and p.available_bytes == needs[2, False]

    p = plan(needs[2, False] - 1)  # between the remat need and the no-remat need
    assert (p.remat, p.micro_batch, p.grad_accum) == (True, 2, 1)
    assert [(c.micro_batch, c.remat, c.need_bytes, c.fits) for c in p.candidates] == [
        (2, False, needs[2, False], False), (2, True, needs[2, True], True)]

    p = plan(needs[1, False])  # below both whole-batch needs: micro-batches of 1, accumulated over 2
    assert (p.remat, p.micro_batch, p.grad_accum, p.need_bytes) == (False, 1, 2, needs[1, False])
    assert p.micro_batch * p.grad_accum == BATCH and len(p.candidates) == 3
    assert "micro-batch 1 x 2 (grad accumulation)" in p.describe()

    p = plan(needs[2, False], remat=True)  # remat asked for: only remat candidates
    assert (p.remat, p.micro_batch, [c.remat for c in p.candidates]) == (True, 2, [True])
    p = plan(needs[2, False], grad_accum=2)  # accumulation asked for: micro-batches of at most 1 row
    assert (p.remat, p.micro_batch, p.grad_accum) == (False, 1, 2)

    least = min(needs.values())
    with pytest.raises(DoesNotFit) as e:  # below every candidate
        plan(least - 1)
    assert e.value.need_bytes == least and len(e.value.candidates) == 4
    assert f"needs {least / 2**30:.2f} GiB, {(least - 1) / 2**30:.2f} GiB available" in str(e.value)
    # A shorter sequence is suggested only as far as it fits: the longest halving that does.
    shorter = e.value.suggestions["seq_len"]
    assert _need(compile_once, CONFIG, "qlora", BATCH, 1, True, shorter, **SETTINGS) <= least - 1
    assert shorter == SEQ // 2 or _need(compile_once, CONFIG, "qlora", BATCH, 1, True, shorter * 2,
                                        **SETTINGS) > least - 1
    assert set(e.value.suggestions) == {"seq_len"}  # already 4-bit, remat and micro-batch 1 were tried


def test_groups_of_layers_are_picked_when_keeping_every_layer_input_does_not_fit(compile_once):
    """An 8-layer model at 1024 tokens: with `available` between what rematerializing every layer needs and what
    keeping every 4th layer's input needs (`remat_group=4`), the plan picks the groups; 2-layer models never try
    them (see the test above)."""
    import dataclasses

    cfg = dataclasses.replace(CONFIG, num_layers=8)
    seq = 1024
    needs = {g: _need(compile_once, cfg, "qlora", 1, 1, True, seq, remat_group=g, **SETTINGS)
             for g in (1, plan_module.REMAT_GROUP)}
    assert needs[plan_module.REMAT_GROUP] < needs[1], needs
    p = plan_fit(cfg, "qlora", batch_size=1, seq_len=seq, available_bytes=needs[plan_module.REMAT_GROUP], **SETTINGS)
    assert (p.remat, p.remat_group, p.micro_batch, p.need_bytes) == (True, 4, 1, needs[plan_module.REMAT_GROUP])
    assert [(c.remat, c.remat_group, c.fits) for c in p.candidates] == [(False, 1, False), (True, 1, False),
                                                                         (True, 4, True)]
    assert "remat on (groups of 4)" in p.describe() and p.to_dict()["remat_group"] == 4
    p = plan_fit(cfg, "qlora", batch_size=1, seq_len=seq, available_bytes=needs[1], **SETTINGS)
    assert (p.remat, p.remat_group) == (True, 1)


def test_weights_that_cannot_fit_stop_the_search_early(compile_once):
    """Below the weights and optimizer state alone, the least need is still compiled and reported, and no
    shorter sequence is suggested (it would not help)."""
    with pytest.raises(DoesNotFit) as e:
        plan_fit(CONFIG, "qlora", batch_size=BATCH, seq_len=SEQ, available_bytes=2**20, **SETTINGS)
    assert [(c.micro_batch, c.remat) for c in e.value.candidates] == [(2, False), (1, True)]
    assert e.value.suggestions == {}
    assert "GiB, 0.00 GiB available; no 4-bit base, rematerialization or shorter sequence" in str(e.value)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="grad_accum: 3 does not divide batch_size 4"):
        plan_fit(CONFIG, "qlora", batch_size=4, seq_len=16, grad_accum=3, available_bytes=2**30)
    with pytest.raises(ValueError, match="method: 'dora' is not one of"):
        plan_fit(CONFIG, "dora", batch_size=4, seq_len=16, available_bytes=2**30)


@pytest.fixture(scope="module")
def llama_13b_config(tmp_path_factory):
    """Only the config.json of a Llama-2-13B shape: no weights exist."""
    path = tmp_path_factory.mktemp("llama13b")
    transformers.LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                             num_attention_heads=40, num_key_value_heads=40, vocab_size=32000).save_pretrained(path)
    assert [p.name for p in path.iterdir()] == ["config.json"]
    return path


def test_16bit_lora_on_13b_is_refused_and_qlora_proceeds(llama_13b_config, capsys):
    """The issue's acceptance: in 21 GiB, 16-bit LoRA on the 13B checkpoint is refused with the GiB it needs, and
    the refusal suggests the 4-bit base, which then plans."""
    args = ["memory", "--model", str(llama_13b_config), "--fit", "--available-gib", "21"]
    assert main([*args, "--method", "lora"]) == 2
    captured = capsys.readouterr()
    message = captured.err.strip().splitlines()[-1]
    need = float(message.split("needs ")[1].split(" GiB")[0])
    assert need > 21 and "21.0 GiB available; try --method qlora" in message
    assert "| 1 | 1 | on |" in captured.out  # the least need, rematerialized, was compiled to report it
    assert main([*args, "--method", "qlora"]) == 0
    out = capsys.readouterr().out
    assert "plan: remat" in out and "of 21.0 GiB available" in out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan_finetune")
    path, _, data = finetune_files(tmp, ROWS)
    return path, data


def _finetune_args(path, data, out, *extra):
    return ["finetune", "--model", str(path), "--data", str(data), "--output", str(out), "--steps", "2",
            "--batch-size", "4", "--seq-len", "64", "--rank", "4", "--alpha", "8", *extra]


def test_finetune_refuses_before_reading_weights_and_writes_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    path, data = checkpoint

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(finetune_module, "from_pretrained", no_weights)
    start = time.perf_counter()
    assert main(_finetune_args(path, data, tmp_path / "new", "--available-gib", "0.25")) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert err.startswith("qlora-jax finetune: error: needs ") and "0.25 GiB available" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists()
    assert seconds < 60, seconds  # two abstract compiles of a tiny model, no weight read
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep")
    assert main(_finetune_args(path, data, existing, "--available-gib", "0.25", "--overwrite")) == 2
    assert [(p.name, p.read_text()) for p in existing.iterdir()] == [("notes.txt", "keep")]


def test_finetune_runs_the_picked_micro_batch_and_resumes_with_it(checkpoint, compile_once, tmp_path, capsys):
    path, data = checkpoint
    settings = dict(rank=4, alpha=8.0, dtype=jnp.dtype("float32"), loss_chunk=TrainConfig.loss_chunk,
                    quant=QuantConfig(fmt="nf4", block_size=64, double_quant=True))
    config = load_config(path)
    needs = {(micro, remat): _need(compile_once, config, "qlora", 4, micro, remat, 64, **settings)
             for micro, remat in ((4, False), (4, True), (2, False))}
    assert needs[2, False] < min(needs[4, False], needs[4, True]), needs
    available = (needs[2, False] + min(needs[4, False], needs[4, True])) / 2 / 2**30
    out = tmp_path / "run"
    args = _finetune_args(path, data, out, "--available-gib", repr(available))
    assert main(args) == 0
    assert "memory plan: remat off, micro-batch 2 x 2 (grad accumulation), needs" in capsys.readouterr().out
    run_config = json.loads((out / "run_config.json").read_text())
    assert (run_config["batch_size"], run_config["grad_accum"], run_config["remat"]) == (4, 1, False)  # as asked
    assert {k: run_config["memory_plan"][k] for k in ("remat", "micro_batch", "grad_accum")} == {
        "remat": False, "micro_batch": 2, "grad_accum": 2}
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and np.isfinite(losses).all()
    # Resumed with more memory available: the saved pick still fits and is kept (the same numerics).
    assert main([*args[:-1], "8", "--resume"]) == 0
    assert "memory plan: remat off, micro-batch 2 x 2 (grad accumulation)" in capsys.readouterr().out
    assert json.loads((out / "run_config.json").read_text())["memory_plan"]["micro_batch"] == 2

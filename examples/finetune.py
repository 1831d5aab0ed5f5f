"""QLoRA fine-tuning of a Hugging Face checkpoint from Python: what `qlora-jax finetune` does, step by step.

    python examples/finetune.py --model Qwen/Qwen2.5-0.5B-Instruct --data train.jsonl --output qlora_out

`--data` is a JSONL file with one `{"text": ...}`, `{"prompt": ..., "completion": ...}`
or `{"messages": [...]}` object per line (loss on completions / assistant turns
only). `--model` is a local checkpoint directory or a hub id (needs network).
The script loads the base in NF4 with double quantization and LoRA adapters on
every linear layer, trains the adapters with the QLoRA paper's AdamW recipe,
writes a PEFT adapter and a loss plot, and prints an answer before and after.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from flax import nnx
from tqdm import tqdm

import qlora_jax as qj
from qlora_jax.app import plot_curves


def answer(model: qj.models.CausalLM, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """The model's greedy answer to `prompt` (through the chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    ids = np.asarray([tokenizer(prompt, add_special_tokens=False)["input_ids"]], np.int32)
    out = qj.models.generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id or 0)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the fine-tuning; returns the first and last training loss."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--data", required=True, help="training JSONL file")
    parser.add_argument("--output", default="qlora_out", help="folder for the adapter and loss.png")
    parser.add_argument("--prompt", default=None, help="a prompt answered before and after training")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args(argv)

    # 1. Data: tokenize, mask the prompts, pack rows of seq_len tokens, shuffle by seed.
    tokenizer = qj.models.load_tokenizer(args.model)
    examples, stats = qj.data.load_examples(args.data, tokenizer, args.seq_len)
    batches = qj.data.Batcher(examples, args.batch_size, args.seq_len, seed=0, num_epochs=None)
    print(f"{stats.num_examples} examples, {stats.num_loss_tokens} tokens with loss")

    # 2. Model: the base in NF4 + double quantization, LoRA adapters (nnx.LoRAParam) on every linear layer.
    model = qj.models.from_pretrained(
        args.model, quant=qj.QuantConfig(fmt="nf4", double_quant=True),
        lora=qj.LoraConfig(rank=args.rank, alpha=args.alpha, dropout=0.05), rngs=nnx.Rngs(0), progress=True)
    if args.prompt:
        print("before:", answer(model, tokenizer, args.prompt))

    # 3. Train only the adapters: AdamW, constant lr after a 3% warmup, grad-norm clipping at 0.3.
    trainer = qj.train.Trainer(model, qj.train.TrainConfig(total_steps=args.steps, lr=args.lr))
    losses = []
    for _ in (bar := tqdm(range(args.steps), desc="finetune")):
        losses.append(float(trainer.train_step(next(batches))["loss"]))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")

    # 4. Results: a PEFT adapter (loads with peft.PeftModel.from_pretrained) and the loss curve.
    model.eval()
    out = Path(args.output)
    qj.models.save_peft_adapter(model, out / "adapter", base_model_name_or_path=args.model)
    plot_curves(out / "loss.png", {"train loss": (list(range(1, len(losses) + 1)), losses)},
                xlabel="step", ylabel="loss")
    if args.prompt:
        print("after:", answer(model, tokenizer, args.prompt))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; wrote {out / 'adapter'} and {out / 'loss.png'}")
    return {"first_loss": losses[0], "last_loss": losses[-1]}


if __name__ == "__main__":
    main()

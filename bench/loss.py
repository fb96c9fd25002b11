"""Target-only logits vs the model's full logits: one training micro-step (forward + backward through LoRA) on real
prompts, side by side in one run, and the two losses compared.

    python bench/loss.py [--model builtin:gemma-3-270m] [--data data/sample/train-data] [--batch-size 4]
        [--dtype auto|fp32|bf16]

Prompts are masked, so the full logits spend most of lm_head (262k rows on Gemma, 152k on Qwen) on positions whose
loss is thrown away; the target-only loss gathers the answer positions first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_dtype_option, autocast_dtype, interleaved, lora_model, side_by_side, training_batch  # noqa: E402
from poetry.feed import target_tokens  # noqa: E402
from poetry.loss import TargetOnlyLoss, full_logits_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--data", default="data/sample/train-data")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    add_dtype_option(parser)
    args = parser.parse_args()
    dtype = autocast_dtype(args.dtype)

    tokenizer, model = lora_model(args.model)
    batch = training_batch(tokenizer, args.data, args.batch_size, length_quantile=0.5)
    target_only = TargetOnlyLoss(model)
    losses = {}

    def step(name: str, loss_fn):
        def run():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype.value == "bf16"):
                loss_sum, n_targets = loss_fn(**batch)
            (loss_sum / n_targets).backward()
            losses[name] = (loss_sum / n_targets).item()
        return run

    times = interleaved({"full logits": step("full", lambda **b: full_logits_loss(model, **b)),
                         "target-only logits": step("target", target_only)}, args.repeats)
    tokens = batch["attention_mask"].sum().item()
    side_by_side(f"one micro-step, {args.model}: {args.batch_size} sequences, {tokens} tokens, "
                 f"{target_tokens(batch)} targets, autocast {dtype.value}, {torch.get_num_threads()} threads", times,
                 note=f"loss: full {losses['full']:.6f}, target-only {losses['target']:.6f}\n"
                      f"autocast {dtype.value}: {dtype.reason}")


if __name__ == "__main__":
    main()

"""Batched KV-cache constrained decoding vs the naive reference (one question at a time, no cache, the whole
sequence re-run for every token), side by side in one run, with their answers compared.

    python bench/decode.py [--model builtin:gemma-3-270m] [--questions data/sample/eval.json] [--max-new-tokens 8]
        [--dtype auto|fp32|bf16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_dtype_option, autocast_dtype, interleaved, lora_model, side_by_side  # noqa: E402
from poetry.data import load_questions  # noqa: E402
from poetry.decode import decode_constrained, decode_naive  # noqa: E402
from poetry.prompt import PromptFormat  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--questions", default="data/sample/eval.json")
    parser.add_argument("--count", type=int, default=8, help="questions decoded per call")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="per-value budget")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    add_dtype_option(parser)
    args = parser.parse_args()
    dtype = autocast_dtype(args.dtype)

    tokenizer, model = lora_model(args.model, for_training=False)
    fmt = PromptFormat(tokenizer)
    questions = load_questions(args.questions).records[:args.count]
    answers = {}

    def run(name: str, decode):
        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype.value == "bf16"):
                answers[name] = [d.answer for d in decode()]
        return call

    times = interleaved({
        "naive (no cache)": run("naive", lambda: decode_naive(model, fmt, questions, args.max_new_tokens)),
        f"batched KV cache, batch {args.batch_size}": run("batched", lambda: decode_constrained(
            model, fmt, questions, args.batch_size, args.max_new_tokens))}, args.repeats)
    same = sum(a == b for a, b in zip(answers["naive"], answers["batched"], strict=True))
    side_by_side(f"constrained decoding, {args.model}: {len(questions)} questions, value budget "
                 f"{args.max_new_tokens} tokens, autocast {dtype.value}, {torch.get_num_threads()} threads", times,
                 note=f"identical answers: {same} of {len(questions)} (expected all in fp32; bf16 rounds a "
                      f"batch differently from one sequence, which can flip near-ties)\n"
                      f"autocast {dtype.value}: {dtype.reason}")


if __name__ == "__main__":
    main()

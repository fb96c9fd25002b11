"""Constrained decoding against free generation (greedy `generate` + the repairing parser) on the same questions,
side by side in one run: seconds per question and the share of answers that are valid JSON, non-empty, positional
(the asked keys in order: the scorer reads by position) and with a letter; optionally against the naive reference
and against another version of poetry/decode.py, their answers compared with the constrained ones. The raw numbers
are kept as JSON under bench/results/.

    python bench/decode.py [--model builtin:gemma-3-270m] [--questions data/sample/eval.json] [--count 8]
        [--max-new-tokens 8] [--batch-size 8] [--repeats 2] [--threads N] [--dtype auto|fp32|bf16]
        [--naive] [--baseline FILE] [--results-dir bench/results] [--name decode]

--baseline times an older decoder interleaved with the current one: `git worktree add /tmp/old-decode HEAD` (or
`git show HEAD:poetry/decode.py > /tmp/old_decode.py`), then `--baseline /tmp/old-decode/poetry/decode.py`; the file
is imported as a module of this package, so it must fit the rest of the tree. On a machine other jobs are using,
pass --threads 1 (see bench/precision.py): decoding is many small forwards, which two threads waiting for a busy
core slow down most.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    RESULTS_DIR,
    add_dtype_option,
    autocast_dtype,
    console,
    interleaved,
    lora_model,
    side_by_side,
    write_results,
)
from poetry import decode  # noqa: E402
from poetry.data import load_questions  # noqa: E402
from poetry.prompt import PromptFormat, render_target  # noqa: E402

FREE, CONSTRAINED, NAIVE = "free: generate + parser", "constrained", "naive (no cache)"
# what parse_free_answer repairs, by the property of the answer text it shows missing
LACKS = {"valid": {"invalid_json", "fence", "think"}, "non_empty": {"missing_value"},
         "positional": {"invalid_json", "fence", "think", "section_name", "keys"}, "letter": {"choose_id"}}


def load_decoder(path: Path) -> ModuleType:
    """Another version of poetry/decode.py, imported as a module of this package (its relative imports resolve
    to this tree)."""
    spec = importlib.util.spec_from_file_location("poetry._baseline_decode", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their class's module up there
    spec.loader.exec_module(module)
    return module


def quality(questions, texts: list[str]) -> dict[str, float]:
    """Shares of answer texts that need no repair of each kind in LACKS, and of those that need none at all."""
    repairs = [set(decode.parse_free_answer(q, text)[1]) for q, text in zip(questions, texts, strict=True)]
    shares = {name: sum(not (r & kinds) for r in repairs) / len(repairs) for name, kinds in LACKS.items()}
    return shares | {"clean": sum(not r for r in repairs) / len(repairs)}


def agreement(decoded: list, reference: list) -> dict:
    """How many answers equal the constrained decoder's, and the largest difference of an option log-prob."""
    differences = [abs(a.option_logprobs[k] - b.option_logprobs[k]) for a, b in zip(decoded, reference, strict=True)
                   if a.option_logprobs and b.option_logprobs for k in a.option_logprobs]
    return {"identical": sum(a.answer == b.answer for a, b in zip(decoded, reference, strict=True)),
            "max_option_logprob_difference": max(differences, default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--questions", default="data/sample/eval.json",
                        help="eval-format questions (also what `python -m poetry.data export-val` writes)")
    parser.add_argument("--count", type=int, default=8, help="questions decoded per call")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="per-value budget")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after one untimed warm-up")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's own choice")
    parser.add_argument("--naive", action="store_true", help="also the naive reference (slow on real models)")
    parser.add_argument("--baseline", type=Path, help="another poetry/decode.py to time against")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="decode", help="the results file's name before the CPU and date")
    add_dtype_option(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = autocast_dtype(args.dtype)

    tokenizer, model = lora_model(args.model, for_training=False)
    fmt = PromptFormat(tokenizer)
    questions = load_questions(args.questions).records[:args.count]
    outputs: dict[str, list] = {}

    def run(name: str, call):
        def timed():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype.value == "bf16"):
                outputs[name] = call()
        return timed

    methods = {FREE: lambda: decode.decode_free(model, fmt, questions, args.batch_size, args.max_new_tokens).items}
    if args.baseline:
        old = load_decoder(args.baseline)
        methods[f"constrained, baseline {args.baseline}"] = lambda: old.decode_constrained(
            model, fmt, questions, args.batch_size, args.max_new_tokens)
    methods[CONSTRAINED] = lambda: decode.decode_constrained(model, fmt, questions, args.batch_size,
                                                             args.max_new_tokens)
    if args.naive:
        methods[NAIVE] = lambda: decode.decode_naive(model, fmt, questions, args.max_new_tokens)
    times = interleaved({name: run(name, call) for name, call in methods.items()}, args.repeats)

    results = {}
    for name, seconds in times.items():
        texts = ([item.text for item in outputs[name]] if name == FREE
                 else [render_target(d.answer) for d in outputs[name]])
        results[name] = {"seconds": seconds, "seconds_per_question": statistics.median(seconds) / len(questions),
                         "quality": quality(questions, texts)}
        if name not in (FREE, CONSTRAINED):
            results[name]["agreement"] = agreement(outputs[name], outputs[CONSTRAINED])
    title = (f"decoding {len(questions)} questions of {args.questions}, {args.model}: value budget "
             f"{args.max_new_tokens} tokens, batch {args.batch_size}, autocast {dtype.value}, "
             f"{torch.get_num_threads()} threads")
    side_by_side(title, times, note=f"speed-up over free generation; autocast {dtype.value}: {dtype.reason}")
    summary(results, len(questions))
    path = write_results(args.name, {
        "args": {"model": args.model, "questions": args.questions, "count": len(questions),
                 "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "repeats": args.repeats,
                 "dtype": dtype.value, "baseline": str(args.baseline) if args.baseline else None},
        "results": results}, args.results_dir)
    print(f"raw results: {path}")


def summary(results: dict[str, dict], count: int) -> None:
    table = Table(title="answers", caption="shares of answers needing no such repair by parse_free_answer; "
                                           "agreement: answers identical to the constrained decoder's (fp32 expects "
                                           "all; bf16 rounds a batch differently from one sequence, which can flip "
                                           "near-ties), largest option log-prob difference")
    columns = ("method", "s / question", *LACKS, "clean", "agreement")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, result in results.items():
        shares = [f"{result['quality'][kind]:.0%}" for kind in (*LACKS, "clean")]
        agreed = result.get("agreement")
        table.add_row(name, f"{result['seconds_per_question']:.2f}", *shares,
                      f"identical answers: {agreed['identical']} of {count}, "
                      f"{agreed['max_option_logprob_difference']:.1e}" if agreed else "")
    console.print(table)


if __name__ == "__main__":
    main()

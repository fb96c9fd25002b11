"""Importing a public corpus and building one training epoch from it, at scale: the seconds of each stage and the
process's peak memory after each, so the stage that raises it shows.

    python bench/imports.py --format chinese-poetry CORPUS/全唐诗 --exclude data/ccpa2025/train-data EVAL.json
        [--tokenizer builtin:gemma-3-270m] [--label tang]

Stages, one after another in one process:
- import: `poetry.data import` itself (read the published layout, decontaminate, write train.json);
- load: the training loader validating that train.json;
- questions: one epoch of the question builder, with emotion and writing examples on, as a run of the mixture
  would build it;
- tokenise (with --tokenizer): the loop's prompt format and `tokenize_examples` over that epoch.
The JSON goes to bench/results/.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import console, machine, write_results  # noqa: E402
from poetry.data import QuestionBuilder, load_poems  # noqa: E402
from poetry.data.imports import FORMATS, import_corpus  # noqa: E402
from poetry.data.overlap import OverlapIndex  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tokenise(examples, tokenizer_path: str, max_len: int) -> int:
    from poetry.builtin import resolve_model_path
    from poetry.model import load_tokenizer
    from poetry.prompt import PromptFormat, tokenize_examples

    fmt = PromptFormat(load_tokenizer(resolve_model_path(tokenizer_path)))
    return len(tokenize_examples(examples, fmt, max_len))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="as for poetry.data import")
    parser.add_argument("sources", nargs="+", help="the corpus' directory (or files) as published")
    parser.add_argument("--exclude", nargs="*", default=[], help="as for poetry.data import (default: none)")
    parser.add_argument("--tokenizer", help="also tokenise the epoch with this model's tokenizer (dir or builtin:)")
    parser.add_argument("--max-len", type=int, default=1024,
                        help="longer examples are dropped, as data.max_len does (default: %(default)s)")
    parser.add_argument("--label", default="", help="a name for the result file (default: none)")
    args = parser.parse_args()

    stages, peaks = {}, {"start": peak_rss_mb()}

    def timed(name: str, work):
        started = time.perf_counter()
        result = work()
        stages[name] = round(time.perf_counter() - started, 2)
        peaks[name] = round(peak_rss_mb(), 1)
        return result

    with tempfile.TemporaryDirectory() as out:
        index = timed("exclude index", lambda: OverlapIndex.from_paths(args.exclude) if args.exclude else None)
        report = timed("import", lambda: import_corpus(FORMATS[args.format], args.sources, Path(out) / "src", index))
        poems = timed("load", lambda: load_poems(Path(out) / "src").records)
    builder = QuestionBuilder(poems, emotion_examples=True, writing_examples=True)
    examples = timed("questions", lambda: builder.epoch(0))
    tokenised = timed("tokenise", lambda: tokenise(examples, args.tokenizer, args.max_len)) if args.tokenizer else None

    results = {"format": args.format, "sources": args.sources, "exclude": args.exclude, "machine": machine(),
               "import": report.summary(), "records_kept": report.kept, "examples": len(examples),
               "tokenised": tokenised, "seconds": stages, "total_seconds": round(sum(stages.values()), 2),
               "peak_rss_mb_after": peaks}
    for stage, seconds in stages.items():
        console.print(f"{stage:>14}: {seconds:8.2f} s, peak RSS so far {peaks[stage]:8.1f} MB")
    console.print(f"{report.summary()}; {len(examples)} examples in one epoch"
                  + (f", {tokenised} tokenised" if tokenised is not None else "")
                  + f"; {results['total_seconds']} s in all on {results['machine']['cpu']}", highlight=False)
    path = write_results(f"imports-{args.format}{'-' + args.label if args.label else ''}", results)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""choose_id by letter against by likelihood (poetry.choice), side by side on one model (+ adapter): each method's
accuracy with a Wilson 95% interval, and how often it answers each letter. The raw numbers are kept as JSON under
bench/results/.

    python bench/choose.py --questions Q.json --gold G.json [--model builtin:gemma-3-270m] [--adapter DIR]
    python bench/choose.py --config RUN/config.yaml [--builder-root DIR] [--model ...] [--adapter DIR]
        [--label zero-shot] [--max-new-tokens 16] [--batch-size 8] [--dtype auto|fp32|bf16] [--name choose]
        [--results-dir bench/results]

With --config the questions are the run's held-out poems as the loop validates on them, each poem's first question,
options and answer included (export-val keeps only questions with words, sentences and options, which the official
format requires: on the official poems that is 25 of 38 held-out poems). --builder-root builds them with another
source tree's poetry.data (`git worktree add /tmp/old HEAD`), to compare two versions' distractors on one model.

A poem asked in several questions (a long one is split) has the same options and answer in each: one trial, counted
once. One constrained decoding (the answer's values do not depend on the method, tests/test_choice.py) gives every
question's letter log-probabilities; each method's letter is what its `poetry.choice.letter_pick` makes of them,
the letter `infer.py --choose METHOD` would write.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS_DIR, autocast_dtype, console, write_results  # noqa: E402
from poetry.quiet import quiet_libraries  # noqa: E402

Z95 = 1.959964
ROOT = Path(__file__).resolve().parents[1]
# run in the builder's tree: the held-out questions of a config, as JSON, one per poem
HELD_OUT = """
import json, sys
from poetry.config import load_config
from poetry.data import load_poems, split_poems, validation_examples
cfg = load_config(sys.argv[1])
_, val = split_poems(load_poems(cfg.data.train, on_invalid=cfg.data.on_invalid).records, cfg.data.val_fraction,
                     cfg.data.split_seed)
print(json.dumps([{"title": e.question.title, "author": e.question.author, "content": e.question.content,
                   "qa_words": e.question.qa_words, "qa_sents": e.question.qa_sents, "choose": e.question.choose,
                   "choose_id": e.answer.choose_id}
                  for e in validation_examples(val, cfg.train.seed, cfg.data.max_items) if e.question.choose],
                 ensure_ascii=False))
"""


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: unlike p ± z·se, it stays in [0, 1] and is not empty
    at 0 or n successes."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_row(method: str, letters: list[str], gold: list[str]) -> dict:
    right = sum(a == b for a, b in zip(letters, gold, strict=True))
    low, high = wilson(right, len(gold))
    return {"method": method, "right": right, "questions": len(gold), "accuracy": right / len(gold),
            "ci95": [low, high], "letters": dict(sorted(Counter(letters).items()))}


def held_out(config: Path, builder_root: Path) -> tuple[list, list[str]]:
    """(questions, gold letters) of a run config's held-out poems, built by `builder_root`'s poetry.data."""
    from poetry.data import Question

    env = {**os.environ, "PYTHONPATH": str(builder_root)}
    out = subprocess.run([sys.executable, "-c", HELD_OUT, str(Path(config).resolve())], cwd=builder_root, env=env,
                         capture_output=True, text=True, check=True).stdout
    items = json.loads(out)
    questions = [Question(i, item["title"], item["content"], tuple(item["qa_words"]), tuple(item["qa_sents"]),
                          item["choose"], item["author"]) for i, item in enumerate(items)]
    return questions, [item["choose_id"] for item in items]


def from_files(questions_file: str, gold_file: str) -> tuple[list, list[str]]:
    from poetry.data import load_answers, load_questions

    questions = [q for q in load_questions(questions_file).records if q.choose]
    letters = {a.idx: a.choose_id for a in load_answers(gold_file)}
    return questions, [letters[q.idx] for q in questions]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--adapter", help="a LoRA adapter directory (a run's checkpoint)")
    parser.add_argument("--questions", help="questions in the official eval format")
    parser.add_argument("--gold", help="their gold answers in the submission format")
    parser.add_argument("--config", type=Path, help="a run's config: its held-out poems' questions instead")
    parser.add_argument("--builder-root", type=Path, default=ROOT,
                        help="with --config: the source tree whose poetry.data builds the questions")
    parser.add_argument("--label", default="", help="what the rows are, e.g. zero-shot, new distractors")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="budget of each value, as eval.max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--name", default="choose", help="results file name prefix")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.questions and args.gold):
        parser.error("give either --config, or --questions and --gold")

    quiet_libraries()
    from rich.table import Table

    from poetry import choice
    from poetry.builtin import resolve_model_path
    from poetry.config import ModelConfig
    from poetry.decode import decode_constrained
    from poetry.model import load_model, load_tokenizer
    from poetry.prompt import PromptFormat

    if args.config:
        asked, asked_gold = held_out(args.config, args.builder_root)
    else:
        asked, asked_gold = from_files(args.questions, args.gold)
    # a long poem is split into several questions with the same options and answer: one trial, counted once
    first = {}
    for question, letter in zip(asked, asked_gold, strict=True):
        first.setdefault((question.title, question.author, question.content), (question, letter))
    questions, gold = [q for q, _ in first.values()], [letter for _, letter in first.values()]
    dtype = autocast_dtype(args.dtype).value
    path = resolve_model_path(args.model)
    model = load_model(ModelConfig(path=path, dtype=dtype), for_training=False)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    fmt = PromptFormat(load_tokenizer(path))
    decoded = decode_constrained(model, fmt, questions, args.batch_size, args.max_new_tokens)  # eval, no grad
    rows = []
    for method in choice.METHODS:
        pick = choice.letter_pick(model, fmt, questions, method, args.max_new_tokens)
        rows.append(accuracy_row(method, [pick(i, d.option_logprobs) for i, d in enumerate(decoded)], gold))
    table = Table(title=f"choose_id on {len(questions)} poems ({len(asked)} questions): {args.label or args.model}"
                        f"{' + ' + args.adapter if args.adapter else ''}, {dtype}")
    for column in ("method", "right", "accuracy", "95% interval", "letters answered"):
        table.add_column(column, justify="left" if column in ("method", "letters answered") else "right")
    for row in rows:
        table.add_row(row["method"], f"{row['right']}/{row['questions']}", f"{row['accuracy']:.3f}",
                      f"{row['ci95'][0]:.3f}-{row['ci95'][1]:.3f}",
                      " ".join(f"{k}:{v}" for k, v in row["letters"].items()))
    console.print(table)
    console.print(f"gold letters: {dict(sorted(Counter(gold).items()))}; chance 0.25", highlight=False)
    source = ({"config": str(args.config), "builder_root": str(args.builder_root)} if args.config
              else {"questions_file": args.questions, "gold_file": args.gold})
    saved = write_results(args.name, {"label": args.label, "model": args.model, "adapter": args.adapter, **source,
                                      "questions": len(asked), "poems": len(questions), "dtype": dtype,
                                      "max_new_tokens": args.max_new_tokens, "gold_letters": dict(Counter(gold)),
                                      "rows": rows}, args.results_dir)
    print(f"saved {saved}")


if __name__ == "__main__":
    main()

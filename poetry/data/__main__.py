"""`python -m poetry.data stats DIR`: counts and coverage of a training tree (or JSON/JSONL file).
`python -m poetry.data export-val --config C --out DIR`: the run's held-out validation questions in the official
eval format, with gold answers in the submission format (for infer.py and evaluate.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..config import ConfigError, load_config
from . import DataError, load_poems, split_poems, validation_examples, write_submission
from .stats import compute_stats


def stats(args, console: Console) -> None:
    loaded = load_poems(args.path, on_invalid=args.on_invalid)
    table = Table(title=f"poetry.data stats: {args.path}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in compute_stats(loaded.records, args.max_items).rows():
        table.add_row(name, value)
    console.print(table)
    console.print(loaded.summary("poems"), highlight=False)


def export_val(args, console: Console) -> None:
    """Only complete questions (words, sentences and options) are exported: the official format requires all three."""
    cfg = load_config(args.config, args.overrides)
    poems = load_poems(cfg.data.train, on_invalid=cfg.data.on_invalid).records
    _, val = split_poems(poems, cfg.data.val_fraction, cfg.data.split_seed, cfg.data.folds, cfg.data.fold)
    examples = [e for e in validation_examples(val, cfg.train.seed, cfg.data.max_items)
                if e.question.qa_words and e.question.qa_sents and e.question.choose]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    questions = [{"idx": i, "title": e.question.title, "author": e.question.author or "", "content": e.question.content,
                  "qa_words": list(e.question.qa_words), "qa_sents": list(e.question.qa_sents),
                  "choose": e.question.choose} for i, e in enumerate(examples)]
    (out / "questions.json").write_text(json.dumps(questions, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    write_submission([type(e.answer)(i, e.answer.ans_qa_words, e.answer.ans_qa_sents, e.answer.choose_id)
                      for i, e in enumerate(examples)], out / "gold.json")
    console.print(f"{len(examples)} complete validation questions from {len(val)} held-out poems written to "
                  f"{out}/questions.json and {out}/gold.json", highlight=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m poetry.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    stats_help = "counts and coverage of training poems"
    stats_parser = sub.add_parser("stats", help=stats_help, description=stats_help)
    stats_parser.add_argument("path", help="a train-data directory, a JSON list or a JSONL file")
    stats_parser.add_argument("--on-invalid", choices=["error", "skip"], default="error",
                              help="an invalid record stops the run, or is skipped and counted (default: %(default)s)")
    stats_parser.add_argument("--max-items", type=int, default=3,
                              help="words/sentences per built question (default: %(default)s)")
    export_help = "held-out validation questions and gold answers of a config"
    export = sub.add_parser("export-val", help=export_help, description=export_help)
    export.add_argument("--config", required=True, help="training config (YAML) whose validation split is exported")
    export.add_argument("--out", required=True, help="directory for questions.json and gold.json")
    export.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    console = Console()
    try:
        {"stats": stats, "export-val": export_val}[args.command](args, console)
    except (DataError, ConfigError, OSError) as err:
        print(f"error: {err.one_line() if isinstance(err, DataError) else err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m poetry.data stats DIR...`: counts and coverage of training trees (or JSON/JSONL files), a column each.
`python -m poetry.data card DIR... [--exclude FILE...]`: a data card per source (poetry.data.stats).
`python -m poetry.data import --format F SRC... --out DIR --exclude FILE...`: a public corpus into the train-data
layout, decontaminated (poetry.data.imports).
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
from . import DataError, load_poems, validation_examples, write_submission
from .imports import FORMATS, import_corpus
from .mix import load_training_poems
from .overlap import OverlapIndex
from .stats import card_rows, compute_stats


def _by_source(console: Console, title: str, paths: list[str], columns: list[list[tuple[str, str]]]) -> None:
    """A table with a row per measure and a column per source."""
    table = Table(title=f"{title}: {', '.join(paths)}")
    table.add_column("what")
    for path in paths:
        table.add_column(path if len(paths) > 1 else "count", justify="right")
    for number, (name, _) in enumerate(columns[0]):
        table.add_row(name, *(rows[number][1] for rows in columns))
    console.print(table)


def stats(args, console: Console) -> None:
    """One column per source: what each contributes, question type by question type."""
    loaded = [load_poems(path, on_invalid=args.on_invalid) for path in args.paths]
    _by_source(console, "poetry.data stats", args.paths,
               [compute_stats(part.records, args.max_items).rows() for part in loaded])
    for path, part in zip(args.paths, loaded, strict=True):
        console.print(f"{path}: {part.summary('poems')}", highlight=False)


def card(args, console: Console) -> None:
    overlap = OverlapIndex.from_paths(args.exclude) if args.exclude else None
    _by_source(console, "poetry.data card", args.paths,
               [card_rows(load_poems(path).records, Path(path), overlap) for path in args.paths])
    if args.exclude:
        console.print(f"exclude set: {len(overlap)} poems from {', '.join(args.exclude)}", highlight=False)


def import_(args, console: Console) -> int:
    if not args.exclude and not args.no_exclude:
        print("error: decontamination is on by default: give --exclude FILE... (the official evaluation files, "
              "the train-data tree you validate on), or --no-exclude to import without the check", file=sys.stderr)
        return 2
    if args.emotion_from_tags and args.format != "gushiwen":
        print(f"error: --emotion-from-tags reads 古诗文网's tags; {args.format} records have none", file=sys.stderr)
        return 2
    fmt = FORMATS[args.format]
    exclude = OverlapIndex.from_paths(args.exclude) if args.exclude else None
    out = Path(args.out) / (args.name or fmt.name)
    report = import_corpus(fmt, args.sources, out, exclude, args.emotion_from_tags)
    console.print(report.summary(), highlight=False)
    if fmt.traditional:
        console.print("converted traditional characters to simplified (OpenCC t2s)", highlight=False)
    for item in report.dropped[:args.show]:
        console.print(f"  dropped ({item['dropped']}) {item['where']} 《{item['title'] or ''}》: {item['why']}",
                      highlight=False)
    dropped = report.read - report.kept
    if dropped > args.show:
        console.print(f"  ... {dropped - args.show} more", highlight=False)
    console.print(f"wrote {out}/train.json ({report.kept} records), {out}/dropped.jsonl (each dropped record and "
                  f"why), {out}/import.json (licence: {fmt.licence})", highlight=False)
    return 0


def export_val(args, console: Console) -> None:
    """Only complete questions (words, sentences and options) are exported: the official format requires all three."""
    cfg = load_config(args.config, args.overrides)
    _, val = load_training_poems(cfg.data, cfg.train.seed)
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
    stats_parser.add_argument("paths", nargs="+", metavar="path",
                              help="a train-data directory, a JSON list or a JSONL file; several: a column each")
    stats_parser.add_argument("--on-invalid", choices=["error", "skip"], default="error",
                              help="an invalid record stops the run, or is skipped and counted (default: %(default)s)")
    stats_parser.add_argument("--max-items", type=int, default=3,
                              help="words/sentences per built question (default: %(default)s)")
    card_help = "a data card per source: size, questions by type, lengths, moods, licence, overlap"
    card_parser = sub.add_parser("card", help=card_help, description=card_help)
    card_parser.add_argument("paths", nargs="+", metavar="path", help="a train-data tree (e.g. an import's output)")
    card_parser.add_argument("--exclude", nargs="*", default=[], metavar="FILE",
                             help="evaluation files or trees to count overlaps with (default: none)")
    import_help = "convert a public corpus into the train-data layout, decontaminated"
    imp = sub.add_parser("import", help=import_help, description=import_help + ". Formats: " + "; ".join(
        f"{f.name}: {f.feeds}" for f in FORMATS.values()))
    imp.add_argument("--format", required=True, choices=sorted(FORMATS), help="the corpus' published layout")
    imp.add_argument("sources", nargs="+", metavar="SRC", help="the corpus' directory (or files) as published")
    imp.add_argument("--out", required=True, help="writes OUT/<name>/train.json, import.json and dropped.jsonl")
    imp.add_argument("--name", help="the source's directory under OUT (default: the format)")
    imp.add_argument("--exclude", nargs="*", default=[], metavar="FILE",
                     help="evaluation files (official eval format) and train-data trees whose poems must not be "
                          "imported: a shared line, within one character, or the same title and author (default: none, "
                          "which needs --no-exclude)")
    imp.add_argument("--no-exclude", action="store_true", help="import without decontamination")
    imp.add_argument("--emotion-from-tags", action="store_true",
                     help="gushiwen: a poem's emotion is its first tag the valence lexicon knows (思乡, 闲适 ...)")
    imp.add_argument("--show", type=int, default=10, help="dropped records listed here (default: %(default)s)")
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
        code = {"stats": stats, "card": card, "import": import_, "export-val": export_val}[args.command](args, console)
    except (DataError, ConfigError, OSError) as err:
        print(f"error: {err.one_line() if isinstance(err, DataError) else err}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())

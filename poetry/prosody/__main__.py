"""`python -m poetry.prosody check PATH`: each poem against its form (given by `--form`, by the record's `form`, by
the 词牌 in its title, or by its shape), with every violation, and a table per form.
`python -m poetry.prosody score FILE... [--corpus PATH]`: writing metrics of written poems (infer.py write's output,
or `{content, form?, title?}` records), side by side: form, rhyme and tone rates, Distinct-1/2, copying.
`python -m poetry.prosody coverage PATH...`: how many of the poems' characters the tone table classifies."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..data import DataError, Issue, Verse, load_verses
from ..data.io import loads
from .check import PoemCheck, check_poem
from .forms import FORMS, Form, form_named, poem_form, poem_lines, record_form
from .score import score_writing
from .tables import rhyme_table


def _form_of(verse: Verse, forced: Form | None) -> Form | None:
    if forced:
        return forced
    if verse.form:
        return record_form(verse.form, verse.source)
    return poem_form(verse.title, verse.content, verse.source)


def check(args, console: Console) -> None:
    forced = form_named(args.form) if args.form else None
    verses = load_verses(args.path)
    results: list[tuple[Verse, PoemCheck | None]] = []
    for verse in verses:
        form = _form_of(verse, forced)
        results.append((verse, check_poem(verse.content, form, loose=args.tones == "loose") if form else None))
    if not args.quiet:
        for verse, result in results:
            _print_poem(console, verse, result)
    console.print(_summary(results, args.tones))
    unchecked = sum(result is None for _, result in results)
    if unchecked:
        console.print(f"{unchecked} of {len(results)} poems are of no known form and were not checked "
                      f"(known: {', '.join(f.name for f in FORMS)})", highlight=False, soft_wrap=True)
    if args.json:
        rows = [{"source": v.source, "title": v.title, **(r.to_json() if r else {"form": None})} for v, r in results]
        Path(args.json).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _print_poem(console: Console, verse: Verse, result: PoemCheck | None) -> None:
    head = f"{verse.source} 《{verse.title}》"
    if result is None:
        shape = ",".join(str(len(line)) for line in poem_lines(verse.content))
        console.print(f"{head}: no known form (line lengths {shape}), not checked", highlight=False, soft_wrap=True)
        return
    unknown = f"; not in the table: {''.join(result.unknown)}" if result.unknown else ""
    console.print(f"{head} {result.form} {result.pattern}: {result.summary()}{unknown}", highlight=False,
                  soft_wrap=True)
    for violation in result.violations:
        console.print(f"  {violation}", highlight=False, soft_wrap=True)


def _summary(results: list[tuple[Verse, PoemCheck | None]], tones: str) -> Table:
    rule = "the 1-3-5 allowance applied" if tones == "loose" else "every position"
    table = Table(title=f"prosody check ({tones} tones: {rule})")
    for column in ("form", "poems", "lines right", "rhyme right", "tone positions right", "regular"):
        table.add_column(column, justify="left" if column == "form" else "right")
    by_form: dict[str, list[PoemCheck]] = {}
    for _, result in results:
        if result:
            by_form.setdefault(result.form, []).append(result)
    for form in FORMS:
        found = by_form.get(form.name)
        if not found:
            continue
        right, checked = sum(r.tones_right for r in found), sum(r.tones_checked for r in found)
        table.add_row(form.name, str(len(found)), str(sum(r.lines_ok for r in found)),
                      str(sum(r.rhyme_ok for r in found)), f"{right}/{checked} ({right / max(checked, 1):.1%})",
                      str(sum(r.ok for r in found)))
    return table


def score(args, console: Console) -> None:
    corpus = [verse.content for path in args.corpus for verse in load_verses(path)] if args.corpus else None
    labels = args.label or [Path(path).stem for path in args.paths]
    if len(labels) != len(args.paths):
        raise ValueError(f"{len(labels)} --label for {len(args.paths)} files")
    table = Table(title=f"writing metrics ({args.tones} tones)" + (f", copying against {len(corpus)} corpus poems"
                                                                    if corpus is not None else ""))
    table.add_column("metric")
    columns = []
    for label, path in zip(labels, args.paths, strict=True):
        table.add_column(label, justify="right")
        columns.append(score_writing(_written_poems(path, args.all_candidates), corpus, args.tones == "loose").rows())
    for index, (name, _) in enumerate(columns[0]):
        table.add_row(name, *(column[index][1] for column in columns))
    console.print(table)


def _written_poems(path: str, all_candidates: bool) -> list[tuple[Form, str]]:
    """(form, text) of each poem: infer.py write's output (its best candidate, or all), else checker records."""
    try:
        records = loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError([Issue(path, None, None, f"invalid JSON: {err}")]) from None
    if isinstance(records, list) and records and all(isinstance(r, dict) and "poems" in r for r in records):
        poems = []
        for number, record in enumerate(records):
            try:
                form = form_named(str(record.get("form")))
            except ValueError as err:
                raise DataError([Issue(path, number, "form", str(err))]) from None
            texts = [p.get("text") if isinstance(p, dict) else None for p in record["poems"] or [None]]
            if not isinstance(record["poems"], list) or not all(isinstance(t, str) and t for t in texts):
                raise DataError([Issue(path, number, "poems", "expected a list of {text: the poem}")])
            poems += [(form, text) for text in (texts if all_candidates else texts[:1])]
        return poems
    verses = load_verses(path)
    known = [(_form_of(verse, None), verse.content) for verse in verses]
    unknown = [verse.source for (form, _), verse in zip(known, verses, strict=True) if form is None]
    if unknown:
        raise DataError([Issue(path, None, None, f"{len(unknown)} poems of no known form (first: {unknown[0]}); "
                                                 f"give each its form")])
    return known


def coverage(args, console: Console) -> None:
    table = rhyme_table()
    counts, missing = Counter(), Counter()
    for path in args.paths:
        for verse in load_verses(path):
            for char in verse.content:
                if "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf":
                    counts[path] += 1
                    missing[path, char] += 0 if table.knows(char) else 1
    for path in args.paths:
        lacking = Counter({char: n for (p, char), n in missing.items() if p == path and n})
        total = counts[path]
        known = total - sum(lacking.values())
        listed = " ".join(f"{char}×{n}" for char, n in lacking.most_common())
        console.print(f"{path}: {known} of {total} characters classified ({known / max(total, 1):.2%})"
                      + (f"; not in the table: {listed}" if listed else ""), highlight=False, soft_wrap=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m poetry.prosody", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check_help = "check poems against their forms: line lengths, rhyme, tones"
    checker = sub.add_parser("check", help=check_help, description=check_help)
    checker.add_argument("path", help="a train-data directory, a JSON list or a JSONL file of {content, title?, form?}")
    checker.add_argument("--form", help=f"check every poem as this form: {', '.join(f.name for f in FORMS)}")
    checker.add_argument("--tones", choices=["loose", "strict"], default="loose",
                         help="loose: regulated verse's 1st, 3rd (and 5th) characters are free (default: %(default)s)")
    checker.add_argument("--quiet", action="store_true", help="the table only, not each poem")
    checker.add_argument("--json", metavar="OUT", help="also write each poem's check to this JSON file")
    score_help = "writing metrics of written poems, side by side"
    scorer = sub.add_parser("score", help=score_help, description=score_help)
    scorer.add_argument("paths", nargs="+", help="infer.py write outputs, or JSON lists of {content, form?, title?}")
    scorer.add_argument("--label", action="append", help="a column name for each file (default: its name)")
    scorer.add_argument("--corpus", action="append", help="training poems to measure copying against (repeatable)")
    scorer.add_argument("--tones", choices=["loose", "strict"], default="loose", help="as check's (default: loose)")
    scorer.add_argument("--all-candidates", action="store_true",
                        help="score every candidate of infer.py write's output, not only the best")
    coverage_help = "share of the poems' characters the tone table classifies"
    cover = sub.add_parser("coverage", help=coverage_help, description=coverage_help)
    cover.add_argument("paths", nargs="+", help="train-data directories, JSON lists or JSONL files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        {"check": check, "score": score, "coverage": coverage}[args.command](args, console)
    except DataError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

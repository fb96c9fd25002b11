"""`python -m poetry.report RUN_DIR`: the run's page, from the files `make demo` lays out in RUN_DIR:

    report.json              evaluate.py --report: every answer, gold and submitted, with its scores
    heldout/questions.json   the questions (poems and options) the submissions answer
    metrics.jsonl            the training curves (optional)

It writes RUN_DIR/report.html (or --out) and prints its path. A missing or bad file is one `error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data import DataError, load_questions
from . import load_metrics, load_report, write_page


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m poetry.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory laid out as make demo lays it out")
    parser.add_argument("--out", help="where to write the page (default: RUN_DIR/report.html)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run = Path(args.run_dir)
    report, metrics_file = run / "report.json", run / "metrics.jsonl"
    questions_file = run / "heldout" / "questions.json"
    out = Path(args.out) if args.out else run / "report.html"
    try:
        runs = load_report(report)
        questions = load_questions(questions_file).records
        metrics = load_metrics(metrics_file) if metrics_file.is_file() else None
        sources = [("scores", str(report)), ("questions", str(questions_file)),
                   ("curves", str(metrics_file) if metrics is not None else "none (no metrics.jsonl)")]
        write_page(out, f"run {run.resolve().name}", questions, str(questions_file), runs, str(report), metrics,
                   sources)
    except DataError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The run report: one self-contained HTML page, opened from disk, offline, to see where a model got better or worse.

It holds the score table (each submission side by side, as evaluate.py prints it, the total first), the training
curves of metrics.jsonl as inline SVG, the emotion picks by valence, and one row per question: the poem and its form,
each word's and sentence's gold answer beside each submission's with its BLEU and ROUGE-L, and the options with gold
and every pick marked. A small inline script sorts the rows (by the change from the first submission to the second,
or by a submission's item total) and filters them (wrong choice, changed choice, form).

    python evaluate.py --pred a.json --pred b.json --gold gold.json --questions questions.json --html report.html
    python -m poetry.report RUN_DIR      (the files make demo lays out; writes RUN_DIR/report.html)
"""
from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_file
from ..data import Question
from ..metrics import Scores
from .page import render_page
from .rows import build_rows, check_questions
from .runfiles import load_metrics, load_report

__all__ = ["check_questions", "load_metrics", "load_report", "write_page"]


def write_page(path: str | Path, title: str, questions: list[Question], questions_file: str, runs: dict[str, Scores],
               gold_file: str, metrics: list[dict] | None, sources: list[tuple[str, str]]) -> Path:
    """Render and write the page (under a temporary name, renamed when complete). The questions must be those the
    gold answers, record for record, or a DataError names the first that differs."""
    rows = build_rows(questions, questions_file, runs, gold_file)
    html = render_page(title, rows, runs, metrics, sources)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temporary:
        temporary.write_text(html, encoding="utf-8")
    return path

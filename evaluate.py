"""Score a submission against gold answers with the task's metrics (see poetry.metrics), and ROUGE-1/2/L on
characters beside them (in no total).

    python evaluate.py --pred submission.json --gold gold.json [--bertscore-model DIR] [--report out.json]
    python evaluate.py --pred zero_shot.json --pred finetuned.json --gold gold.json ...   (side by side)
    python evaluate.py ... --questions questions.json --html report.html [--metrics run/metrics.jsonl]
        (one offline HTML page: the scores, each question's answers beside gold, the curves; see poetry.report)

The submission is first checked as the official scorer checks it (count, order, keys, non-empty answers, letters);
any problem is one `error:` line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", required=True, action="append",
                        help="a submission (JSON list of answers); repeat to compare several side by side")
    parser.add_argument("--label", action="append", help="column name for each --pred (default: its file name)")
    parser.add_argument("--gold", required=True, help="gold answers in the submission format")
    parser.add_argument("--bertscore-model",
                        help="local BERT directory (e.g. bert-base-chinese); scoring runs in fp32 whatever the "
                             "checkpoint's dtype. Without it BERTScore is off and the total incomplete")
    parser.add_argument("--bertscore-layer", type=int, default=8,
                        help="layer whose embeddings are compared (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where BERTScore's model runs; auto: the GPU when there is one (default: %(default)s)")
    parser.add_argument("--report", help="write aggregates and per-item scores to this JSON file")
    parser.add_argument("--html", help="write one self-contained HTML page (opens offline): the scores, each "
                                       "question's answers side by side with gold, sorting and filtering")
    parser.add_argument("--questions", help="the questions file (eval format) the submissions answer: the poems and "
                                            "options the --html page shows; required with --html")
    parser.add_argument("--metrics", help="a run's metrics.jsonl, drawn as curves on the --html page")
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    return _parser().parse_args(argv)


if __name__ == "__main__":
    _parse(sys.argv[1:])  # --help and usage errors answer here, before nltk and numpy load (~1 s)

from poetry.quiet import quiet_progress_bars  # noqa: E402

quiet_progress_bars()  # before transformers is imported: its weight-loading bar would put carriage returns into logs

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from poetry.data import DataError, check_submission, load_answers, load_questions  # noqa: E402
from poetry.metrics import ROUGE_TYPES, BertScore, MetricUnavailable, Scores, score_answers  # noqa: E402
from poetry.precision import default_device  # noqa: E402
from poetry.report import check_questions, load_metrics, write_page  # noqa: E402


def _bertscore(model_dir: str | None, layer: int, device: str) -> tuple[BertScore | None, str]:
    if model_dir is None:
        return None, "no --bertscore-model given"
    try:
        return BertScore(model_dir, layer, default_device() if device == "auto" else device), ""
    except MetricUnavailable as err:
        return None, str(err)


def _table(runs: dict[str, Scores], title: str) -> Table:
    def shown(value: float | None, missing: str) -> str:
        return missing if value is None else f"{value:.4f}"

    def row(name: str, attribute: str, missing: str, **style) -> None:
        table.add_row(name, *(shown(getattr(scores, attribute), missing) for scores in runs.values()), **style)

    table = Table(title=title)
    table.add_column("metric")
    for label in runs:
        table.add_column(label, justify="right")
    for name in ("bleu_words", "bleu_sents", "bertscore_words", "bertscore_sents"):
        row(name, name, "off")
    row("accuracy", "acc", "n/a")
    row("total", "total", "incomplete", style="bold")
    table.add_section()
    row("bleu_words_reweighed", "bleu_words_reweighed", "n/a")
    row("bleu_sents_reweighed", "bleu_sents_reweighed", "n/a")
    row("proxy_total (no BERTScore)", "proxy_total", "n/a")
    table.add_section()
    for part in ("words", "sents"):
        for kind in ROUGE_TYPES:
            table.add_row(f"{kind}_{part} (F, characters)",
                          *(shown(scores.rouge(part, kind), "n/a") for scores in runs.values()))
    return table


def _write_report(runs: dict[str, Scores], path: Path) -> None:
    """One submission: its scores; several: {label: scores}."""
    report = next(iter(runs.values())).to_dict() if len(runs) == 1 else {k: v.to_dict() for k, v in runs.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    labels = args.label or [Path(pred).stem for pred in args.pred]
    if len(labels) != len(args.pred) or len(set(labels)) != len(labels):
        print(f"error: give one distinct --label per --pred ({len(args.pred)} predictions, labels {labels})",
              file=sys.stderr)
        return 2
    if args.html and not args.questions:
        print("error: --html needs --questions FILE: the poems and options it shows are in the questions file, "
              "not in the gold answers", file=sys.stderr)
        return 2
    try:
        questions = load_questions(args.questions).records if args.html else []
        metrics = load_metrics(args.metrics) if args.html and args.metrics else None
        gold = load_answers(args.gold)
        if args.html:
            check_questions(questions, args.questions, gold, args.gold)
        predictions = {label: load_answers(pred) for label, pred in zip(labels, args.pred, strict=True)}
        for label, pred in zip(labels, args.pred, strict=True):
            check_submission(gold, predictions[label], pred)
    except DataError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    scorer, off_reason = _bertscore(args.bertscore_model, args.bertscore_layer, args.device)
    runs = {label: score_answers(gold, pred, scorer, off_reason) for label, pred in predictions.items()}

    console = Console()
    console.print(_table(runs, f"{', '.join(args.pred)} against {args.gold}"))
    if off_reason:
        console.print(f"note: BERTScore is off ({off_reason}), so the total is incomplete; "
                      f"proxy_total = 0.5·acc + 0.5·mean(bleu_words, bleu_sents) is shown instead and is not "
                      f"comparable with published totals.", highlight=False, soft_wrap=True)
    if args.report:
        try:
            _write_report(runs, Path(args.report))
        except OSError as err:
            print(f"error: cannot write the report: {err.filename}: {err.strerror}", file=sys.stderr)
            return 2
        console.print(f"report written to {args.report}", highlight=False, soft_wrap=True)
    if args.html:
        return _write_html(args, questions, runs, metrics, console)
    return 0


def _write_html(args: argparse.Namespace, questions: list, runs: dict[str, Scores], metrics: list[dict] | None,
                console: Console) -> int:
    sources = [("gold", args.gold), *(("submission", pred) for pred in args.pred), ("questions", args.questions),
               ("curves", args.metrics or "none (no --metrics)")]
    try:
        write_page(args.html, f"{', '.join(runs)} against {Path(args.gold).name}", questions, args.questions, runs,
                   args.gold, metrics, sources)
    except OSError as err:
        print(f"error: cannot write the page: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    console.print(f"page written to {args.html}", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

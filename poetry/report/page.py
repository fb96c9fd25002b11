"""The HTML of the page. Every text from a file (poems, options, answers, labels, paths) goes through html.escape;
nothing is loaded from anywhere: style, script and charts are inline."""
from __future__ import annotations

import re
from collections.abc import Callable
from html import escape

from ..data.emotions import valence
from ..metrics import ROUGE_TYPES, AnswerScore, Scores
from .assets import CSS, SCRIPT
from .charts import curves_html
from .rows import FORMS, VALENCES, Row, valence_confusion

# (row name, value, text when missing): the total first, then evaluate.py's table in its order and wording
MAIN_ROWS = (("total", lambda s: s.total, "incomplete"), ("accuracy", lambda s: s.acc, "n/a"),
             *((name, lambda s, name=name: getattr(s, name), "off")
               for name in ("bleu_words", "bleu_sents", "bertscore_words", "bertscore_sents")))
EXTRA_ROWS = (("bleu_words_reweighed", lambda s: s.bleu_words_reweighed, "n/a"),
              ("bleu_sents_reweighed", lambda s: s.bleu_sents_reweighed, "n/a"),
              ("proxy_total (no BERTScore)", lambda s: s.proxy_total, "n/a"))
ROUGE_ROWS = tuple((f"{kind}_{part} (F, characters)", lambda s, part=part, kind=kind: s.rouge(part, kind), "n/a")
                   for part in ("words", "sents") for kind in ROUGE_TYPES)
CHANGES_LISTED = 3  # questions per list of largest changes: what fits the first screen
_SENTENCE_END = re.compile(r"([。！？；])(?!\n)")


def _number(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value:.4f}"


def _bucket(value: float | None) -> str:
    """CSS class of a 0..1 score's colour, red to green."""
    if value is None:
        return "sn"
    return f"s{sum(value >= edge for edge in (0.1, 0.25, 0.5, 0.75))}"


def _chip(value: float | None) -> str:
    return f'<span class="sc {_bucket(value)}">{"–" if value is None else f"{value:.2f}"}</span>'


def _change(value: float | None, digits: int) -> str:
    if value is None:
        return ""
    direction = "up" if value > 0 else "down" if value < 0 else ""
    return f'<span class="chg {direction}">{value:+.{digits}f}</span>'


def score_table(runs: dict[str, Scores]) -> str:
    labels = list(runs)
    compared = len(labels) > 1
    head = "".join(f"<th>{escape(label)}</th>" for label in labels)
    if compared:
        head += f"<th>{escape(labels[1])} − {escape(labels[0])}</th>"

    def body(rows: tuple[tuple[str, Callable[[Scores], float | None], str], ...], css: str = "") -> str:
        lines = []
        for name, value_of, missing in rows:
            values = [value_of(scores) for scores in runs.values()]
            cells = "".join(f"<td>{_number(value, missing)}</td>" for value in values)
            if compared:
                cells += f"<td>{_change(None if None in values[:2] else values[1] - values[0], 4)}</td>"
            lines.append(f'<tr class="{css}"><th>{name}</th>{cells}</tr>')
        return f"<tbody>{''.join(lines)}</tbody>"

    off = [f"{escape(label)}: {escape(scores.bertscore_off)}" for label, scores in runs.items()
           if scores.bertscore_off]
    note = (f'<p class="note">BERTScore is off ({"; ".join(off)}), so the total is incomplete; proxy_total = '
            "0.5·acc + 0.5·mean(bleu_words, bleu_sents) is shown instead and is not comparable with published totals."
            "</p>") if off else ""
    return (f'<table class="scores" id="scores"><thead><tr><th>metric</th>{head}</tr></thead>'
            f'{body(MAIN_ROWS, "main")}{body(EXTRA_ROWS)}{body(ROUGE_ROWS)}</table>{note}')


def _change_link(row: Row) -> str:
    return (f'<li><a href="#q-{row.question.idx}">#{row.question.idx} {escape(row.question.title)}</a> '
            f'{_change(row.change, 3)}</li>')


def largest_changes(rows: list[Row], labels: list[str]) -> str:
    """The questions where the second submission lost and gained most against the first, as links to their rows."""
    changed = sorted((row for row in rows if row.change), key=lambda row: (row.change, row.position))
    worse = [row for row in changed if row.change < 0][:CHANGES_LISTED]
    better = [row for row in reversed(changed) if row.change > 0][:CHANGES_LISTED]
    first, second = escape(labels[0]), escape(labels[1])

    def listing(title: str, chosen: list[Row]) -> str:
        items = "".join(_change_link(row) for row in chosen) or "<li>none</li>"
        return f"<b>{title}</b><ol>{items}</ol>"

    return (f'<div class="panel changes"><h2>Largest changes, {second} against {first}</h2>'
            f'{listing(f"where {second} is worse", worse)}{listing(f"where {second} is better", better)}'
            '<p class="note">by item total: the total\'s formula on one question, 0.5·(choice right) + 0.5·mean of '
            "its mean BLEU of words and of sentences (and BERTScore, when on). Sort all questions from the bar above."
            "</p></div>")


def _valence_name(kind: str | None) -> str:
    return kind or "unclassified"


def _confusion_cell(count: int, same: bool) -> str:
    classes = " ".join(name for name, wanted in (("same", same), ("empty", not count)) if wanted)
    return f'<td class="{classes}">{count}</td>'


def confusion_tables(rows: list[Row], labels: list[str]) -> str:
    """Per submission: the picked option's valence against the gold option's (the project's lexicon), and how many
    of each gold valence were picked exactly right."""
    tables = []
    for label in labels:
        counts = valence_confusion(rows, label)
        right = {kind: sum(1 for row in rows if row.items[label].correct
                           and valence(row.question.choose.get(row.items[label].gold_choose_id, "")) == kind)
                 for kind in VALENCES}
        head = "".join(f"<th>{_valence_name(kind)}</th>" for kind in VALENCES)
        lines = []
        for gold in VALENCES:
            total = sum(counts[(gold, picked)] for picked in VALENCES)
            if not total:
                continue
            cells = "".join(_confusion_cell(counts[(gold, picked)], gold is not None and picked == gold)
                            for picked in VALENCES)
            lines.append(f"<tr><th>{_valence_name(gold)}</th>{cells}<td>{right[gold]}/{total}</td></tr>")
        tables.append(f'<table class="confusion"><caption>{escape(label)}</caption><thead><tr>'
                      f'<th>gold ↓ picked →</th>{head}<th>right</th></tr></thead><tbody>{"".join(lines)}</tbody>'
                      "</table>")
    return (f'<div class="panel"><h2>Emotion picks by valence</h2><div class="confusions">{"".join(tables)}</div>'
            '<p class="note">Valence of the option text by the lexicon of poetry/data/emotions.py; "right" counts the '
            "exact option.</p></div>")


def _answer_cell(answer: AnswerScore) -> str:
    if not answer.pred.strip():  # a gold answer the submission has no counterpart for (scored 0)
        return '<td><span class="missing">—</span></td>'
    tip = (f"BLEU (characters) {answer.bleu:.4f}, reweighed {answer.bleu_reweighed:.4f}; "
           f"ROUGE-L {answer.rouge['rougeL']:.4f}"
           + ("" if answer.bertscore is None else f"; BERTScore {answer.bertscore:.4f}"))
    return (f'<td>{escape(answer.pred)} <span class="scs" title="{tip}">{_chip(answer.bleu)}'
            f"{_chip(answer.rouge['rougeL'])}</span></td>")


def _answer_rows(row: Row, part: str) -> str:
    lines = []
    for position, gold in enumerate(getattr(row.gold, part)):
        cells = "".join(_answer_cell(getattr(item, part)[position]) for item in row.items.values())
        lines.append(f'<tr class="{part[:-1]}"><th class="key">{escape(gold.key)}</th>'
                     f'<td class="gold">{escape(gold.gold)}</td>{cells}</tr>')
    return "".join(lines)


def _options(row: Row) -> str:
    lines = []
    for letter, text in row.question.choose.items():
        gold = letter == row.gold.gold_choose_id
        picks = "".join(f'<span class="pick {"right" if gold else "wrong"}">{escape(label)}</span>'
                        for label, item in row.items.items() if item.choose_id == letter)
        lines.append(f'<li class="{"gold" if gold else ""}"><b>{letter}</b> {escape(text)}'
                     f'{" ✓" if gold else ""}{picks}</li>')
    return f'<ol class="opts">{"".join(lines)}</ol>'


def _poem_text(content: str) -> str:
    """A line break after each sentence-final mark: most contents are one long line."""
    return _SENTENCE_END.sub("\\1\n", content).strip()


def _data_number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def question_row(row: Row) -> str:
    question, labels = row.question, list(row.items)
    totals = " ".join(f"{escape(label)} {_chip(total)}" for label, total in row.totals.items())
    wrong = " ".join(str(i) for i, item in enumerate(row.items.values()) if item.correct is False)
    picks = [item.choose_id for item in row.items.values()]
    data = (f'data-order="{row.position}" data-form="{row.form}" data-wrong="{wrong}" '
            f'data-changed="{int(len(picks) > 1 and picks[0] != picks[1])}" '
            f'data-change="{_data_number(row.change)}" '
            + " ".join(f'data-total{i}="{_data_number(total)}"' for i, total in enumerate(row.totals.values())))
    author = f'<span class="author">{escape(question.author)}</span>' if question.author else ""
    heads = "".join(f"<th>{escape(label)}</th>" for label in labels)
    return (f'<article class="q" id="q-{question.idx}" {data}>'
            f'<h3><a href="#q-{question.idx}">#{question.idx}</a> {escape(question.title)} {author}'
            f'<span class="form">{row.form}</span>'
            f'<span class="totals">item total: {totals} {_change(row.change, 3)}</span></h3>'
            f'<div class="body"><div><div class="poem">{escape(_poem_text(question.content))}</div>{_options(row)}'
            "</div>"
            f'<table class="ans"><thead><tr><th class="key"></th><th>gold</th>{heads}</tr></thead><tbody>'
            f'{_answer_rows(row, "words")}{_answer_rows(row, "sents")}</tbody></table></div></article>')


def _checkbox(kind: str, value: str, text: str, checked: bool = False) -> str:
    # autocomplete=off: a reload must not restore ticks the rows (served in file order) do not follow
    return (f'<label><input type="checkbox" data-filter="{kind}" value="{value}" autocomplete="off"'
            f'{" checked" if checked else ""}>{text}</label>')


def _controls(labels: list[str], rows: list[Row]) -> str:
    sorts = [("order asc", "question order")]
    if len(labels) > 1:
        first, second = escape(labels[0]), escape(labels[1])
        sorts += [("change asc", f"{second} − {first}: worst first"),
                  ("change desc", f"{second} − {first}: best first")]
    sorts += [(f"total{i} asc", f"{escape(label)}: lowest item total first") for i, label in enumerate(labels)]
    options = "".join(f'<option value="{value}">{text}</option>' for value, text in sorts)
    wrong = "".join(_checkbox("wrong", str(i), escape(label)) for i, label in enumerate(labels))
    changed = _checkbox("changed", "1", "choice changed") if len(labels) > 1 else ""
    forms = "".join(_checkbox("form", form, f"{form} ({sum(row.form == form for row in rows)})", checked=True)
                    for form in FORMS if any(row.form == form for row in rows))
    return (f'<label>sort <select id="sort" autocomplete="off">{options}</select></label>'
            f"<fieldset><legend>wrong choice in</legend>{wrong}{changed}</fieldset>"
            f"<fieldset><legend>form</legend>{forms}</fieldset>"
            f'<span id="shown">{len(rows)} of {len(rows)} questions</span>')


def render_page(title: str, rows: list[Row], runs: dict[str, Scores], metrics: list[dict] | None,
                sources: list[tuple[str, str]]) -> str:
    """The whole page. `metrics` is metrics.jsonl's records (None: no curves); `sources` (what, path) are listed at
    the bottom."""
    labels = list(runs)
    side = largest_changes(rows, labels) if len(labels) > 1 else ""
    curves = (curves_html(metrics) if metrics is not None
              else '<p class="note">No metrics.jsonl given: no training curves.</p>')
    listed = "".join(f"<li>{escape(what)}: {escape(path)}</li>" for what, path in sources)
    return ("<!DOCTYPE html>\n"
            f'<html lang="zh"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>'
            f'<header class="top"><h1>{escape(title)}</h1>{_controls(labels, rows)}</header><main>'
            f'<section class="top-row"><div class="panel"><h2>Scores</h2>{score_table(runs)}</div>{side}'
            f"{confusion_tables(rows, labels)}</section>"
            f"<section><h2>Training curves</h2>{curves}</section>"
            f'<section><h2>Questions</h2><p class="note">Each answer is followed by its BLEU (characters) and ROUGE-L '
            "against gold, coloured red (0) to green (1); hover for the exact values.</p>"
            f'<div id="questions">{"".join(question_row(row) for row in rows)}</div></section>'
            f'<section><h2>Sources</h2><ul class="note">{listed}</ul></section>'
            f"</main><script>{SCRIPT}</script></body></html>\n")

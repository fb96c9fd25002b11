"""Reading what a run left: the scores `evaluate.py --report` wrote and the steps of `metrics.jsonl`. A bad file is a
DataError naming it and the item or line, never a traceback."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..data import DataError, Issue
from ..metrics import ROUGE_TYPES, AnswerScore, ItemScore, Scores

# Aggregates report.json stores that the page recomputes from its items: they must agree, or the page would show
# numbers evaluate.py did not print
_CHECKED_AGGREGATES = ("total", "proxy_total", "acc", "bleu_words", "bleu_sents", "bertscore_words", "bertscore_sents")


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise DataError([Issue(str(path), None, None, "no such file")])
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError([Issue(str(path), None, None, "not UTF-8 text")]) from None
    except json.JSONDecodeError as err:
        raise DataError([Issue(str(path), None, None, f"invalid JSON at line {err.lineno}, column {err.colno}: "
                                                      f"{err.msg}")]) from None


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{json.dumps(value)} is not a number")
    return float(value)


def _of_type(raw: dict, name: str, *types: type) -> object:
    if not isinstance(raw[name], types) or (isinstance(raw[name], bool) and bool not in types):
        raise TypeError(f"'{name}' is {json.dumps(raw[name])}")
    return raw[name]


def _answer(raw: dict) -> AnswerScore:
    bertscore = raw["bertscore"]
    return AnswerScore(_of_type(raw, "key", str), _of_type(raw, "gold", str), _of_type(raw, "pred", str),
                       _number(raw["bleu"]), _number(raw["bleu_reweighed"]),
                       None if bertscore is None else _number(bertscore),
                       {kind: _number(raw["rouge"][kind]) for kind in ROUGE_TYPES})


def _item(raw: dict) -> ItemScore:
    return ItemScore(_of_type(raw, "idx", int), tuple(_answer(a) for a in raw["words"]),
                     tuple(_answer(a) for a in raw["sents"]), _of_type(raw, "choose_id", str, type(None)),
                     _of_type(raw, "gold_choose_id", str, type(None)), _of_type(raw, "correct", bool, type(None)))


def _agrees(stored: object, recomputed: float | None) -> bool:
    if stored is None or recomputed is None:
        return stored is recomputed
    return isinstance(stored, (int, float)) and not isinstance(stored, bool) \
        and math.isclose(stored, recomputed, rel_tol=1e-9, abs_tol=1e-12)


def _scores(raw: object, file: str, label: str) -> Scores:
    where = f"submission {label!r}: " if label else ""
    if not isinstance(raw, dict) or not isinstance(raw.get("items"), list):
        raise DataError([Issue(file, None, None, f"{where}no list of 'items': not a report of evaluate.py --report")])
    items = []
    for position, item in enumerate(raw["items"]):
        try:
            items.append(_item(item))
        except (KeyError, TypeError) as err:
            what = f"missing {err}" if isinstance(err, KeyError) else str(err)
            raise DataError([Issue(file, position, None, f"{where}{what}: not an item of evaluate.py --report",
                                   "item")]) from None
    off = raw.get("bertscore_off")
    scores = Scores(tuple(items), None if off is None else str(off))
    for name in _CHECKED_AGGREGATES:
        stored, recomputed = raw.get(name), getattr(scores, name)
        if not _agrees(stored, recomputed):
            raise DataError([Issue(file, None, name, f"{where}is {stored}, but its items give {recomputed}: the "
                                                     f"file was edited after evaluate.py wrote it")])
    return scores


def load_report(path: str | Path) -> dict[str, Scores]:
    """The submissions `evaluate.py --report` scored, by label: the file holds every answer, gold and submitted,
    with its scores. A report of one submission (no labels) is labelled by `submission`."""
    path = Path(path)
    raw = _read_json(path)
    if isinstance(raw, dict) and "items" in raw:
        return {"submission": _scores(raw, str(path), "")}
    if not isinstance(raw, dict) or not raw:
        raise DataError([Issue(str(path), None, None, "expected the object evaluate.py --report writes")])
    return {str(label): _scores(scores, str(path), str(label)) for label, scores in raw.items()}


def load_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl: one object per line, each with its integer `step`."""
    path = Path(path)
    if not path.is_file():
        raise DataError([Issue(str(path), None, None, "no such file")])
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError([Issue(str(path), number, None, f"invalid JSON at column {err.colno}: {err.msg}",
                                   "line")]) from None
        if not isinstance(record, dict) or isinstance(record.get("step"), bool) \
                or not isinstance(record.get("step"), int):
            raise DataError([Issue(str(path), number, "step", "expected an object with an integer step", "line")])
        records.append(record)
    return records

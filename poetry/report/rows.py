"""What the page says about each question: its poem's form, each submission's scores of it, the change between the
first two submissions, and the emotion picks by valence."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from ..data import Answer, DataError, Issue, Question, check_submission
from ..data.emotions import valence
from ..metrics import ItemScore, Scores, combine

OTHER_FORM = "词/杂言"
FORMS = ("五言绝句", "七言绝句", "五言律诗", "七言律诗", "五言古诗", "七言古诗", OTHER_FORM)
# A variant reading kept inside the text, "(湿 一作：尽)", is not a line of the poem
_VARIANT_NOTE = re.compile(r"[(（][^)）]*[)）]")
_LINE_BREAKS = re.compile(r"[，。！？；：、,.!?;:\s]+")
VALENCES = ("positive", "negative", "calm", None)  # None: the lexicon cannot tell


def poem_form(content: str) -> str:
    """The form read off the lines, as neither the questions file nor the training folders' names reach it: every
    line of 5 (7) characters makes 五言 (七言), 4 lines a 绝句, 8 a 律诗, any other count a 古诗; lines of mixed
    lengths are a 词 or a 杂言 poem. On the 164 official training poems this matches the folder's form for 68 of the
    69 唐诗 (the other opens with a prose preface) and calls 83 of the 87 宋词 词/杂言 (the other four are in even
    lines of 5 or 7)."""
    lines = [line for line in _LINE_BREAKS.split(_VARIANT_NOTE.sub("", content)) if line]
    lengths = {len(line) for line in lines}
    if len(lengths) != 1 or not lengths <= {5, 7}:
        return OTHER_FORM
    return ("五言" if 5 in lengths else "七言") + {4: "绝句", 8: "律诗"}.get(len(lines), "古诗")


def _mean(values: list[float | None]) -> float | None:
    return None if not values or None in values else sum(values) / len(values)


def item_total(item: ItemScore, with_bertscore: bool) -> float | None:
    """The total's formula on one question: 0.5·correct + 0.5·mean(its mean BLEU of words and of sentences, and
    of BERTScore when the run has it); None when the question has no emotion part."""
    parts = [_mean([a.bleu for a in item.words]), _mean([a.bleu for a in item.sents])]
    if with_bertscore:
        parts += [_mean([a.bertscore for a in item.words]), _mean([a.bertscore for a in item.sents])]
    return combine(None if item.correct is None else float(item.correct), parts)


@dataclass(frozen=True)
class Row:
    """One question with each submission's scored answers to it, by submission label."""

    position: int
    question: Question
    form: str
    items: dict[str, ItemScore]
    totals: dict[str, float | None]

    @property
    def gold(self) -> ItemScore:
        return next(iter(self.items.values()))  # every submission's item carries the same gold texts

    @property
    def change(self) -> float | None:
        """Item total of the second submission minus the first's; None with one submission or a missing total."""
        totals = list(self.totals.values())
        return totals[1] - totals[0] if len(totals) > 1 and None not in totals[:2] else None


def gold_answers(scores: Scores) -> list[Answer]:
    """The gold answers a run was scored against, as evaluate.py read them."""
    return [Answer(item.idx, {w.key: w.gold for w in item.words}, {s.key: s.gold for s in item.sents},
                   item.gold_choose_id) for item in scores.items]


def check_questions(questions: list[Question], questions_file: str, gold: list[Answer], gold_file: str) -> None:
    """The questions must be the ones the gold answers (same count, idx, words and sentences, in order), or a
    DataError names the file and record that differ."""
    if len(gold) != len(questions):
        raise DataError([Issue(questions_file, None, None, f"{len(questions)} questions, but {gold_file} has "
                                                           f"{len(gold)} answers")])
    check_submission(questions, gold, gold_file)


def build_rows(questions: list[Question], questions_file: str, runs: dict[str, Scores], gold_file: str) -> list[Row]:
    """The page's rows, after check_questions against each run's gold."""
    for scores in runs.values():
        check_questions(questions, questions_file, gold_answers(scores), gold_file)
    return [Row(position, question, poem_form(question.content),
                {label: scores.items[position] for label, scores in runs.items()},
                {label: item_total(scores.items[position], scores.bertscore_off is None)
                 for label, scores in runs.items()})
            for position, question in enumerate(questions)]


def valence_confusion(rows: list[Row], label: str) -> Counter:
    """(gold option's valence, picked option's valence) -> questions, for one submission."""
    return Counter((valence(row.question.choose.get(item.gold_choose_id, "")),
                    valence(row.question.choose.get(item.choose_id, "")))
                   for row in rows for item in [row.items[label]] if item.gold_choose_id)

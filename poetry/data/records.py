"""Typed records of the task: training poems, evaluation questions and their answers.

Field names follow the official CCL25-Eval Task 5 JSON so that records and files map one to one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

OPTION_LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Poem:
    """One training record: `{title, content, keywords, trans, emotion}` (+ author/source when known)."""

    title: str
    content: str
    keywords: dict[str, str]
    trans: str
    emotion: str | None
    author: str | None = None
    source: str | None = None  # where it was read, e.g. "train-data/唐诗/五言绝句/train.json:3"

    @property
    def key(self) -> str:
        """Identity used for splitting and seeding: the same poem gets the same key in any file or order."""
        return f"{self.title}\n{self.content}"


@dataclass(frozen=True)
class Verse:
    """A poem to check against a form (its text, and its form when the record names it, else inferred), or one to
    write (its form and title, no text yet)."""

    title: str
    content: str
    form: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Question:
    """One evaluation item: explain `qa_words`, translate `qa_sents`, pick the emotion among `choose`.

    Any part may be empty in a training question built from a poem that lacks it; official items have all three.
    """

    idx: int
    title: str
    content: str
    qa_words: tuple[str, ...]
    qa_sents: tuple[str, ...]
    choose: dict[str, str] = field(default_factory=dict)
    author: str | None = None


@dataclass(frozen=True)
class Answer:
    """One submission item. Dict order is the question's order: the official scorer reads answers by position."""

    idx: int
    ans_qa_words: dict[str, str]
    ans_qa_sents: dict[str, str]
    choose_id: str | None  # None only for training questions without an emotion part

    def to_json(self) -> dict:
        item: dict = {"idx": self.idx, "ans_qa_words": self.ans_qa_words, "ans_qa_sents": self.ans_qa_sents}
        if self.choose_id is not None:
            item["choose_id"] = self.choose_id
        return item


@dataclass(frozen=True)
class Example:
    """A training pair: the question the model sees and the gold answer it must write. An `emotion_only` example
    (data.emotion_examples) is the poem alone followed by the text of its right option, the continuation
    poetry.choice scores by likelihood. A writing example asks for a poem of `form` titled `question.title` and
    learns `question.content`."""

    question: Question
    answer: Answer
    emotion_only: bool = False
    form: str | None = None  # a writing example (data.writing_examples): write question.content, a poem of this form

"""Decontamination: whether a poem is one of a set of excluded poems (evaluation items, held-out training trees),
read through the variants that public copies of a poem carry.

Texts are compared after normalising: simplified characters (OpenCC t2s), CJK characters only (no punctuation, no
spaces, no line breaks). A poem is excluded when
- it shares a line with an excluded poem: a line is a run of text between punctuation marks, of at least MIN_LINE
  characters, and a line with one character replaced still counts as shared, since variant readings are common (a
  public 唐诗三百首 copy of the first official evaluation poem differs from the evaluation's text in 3 characters,
  each in another line, and has another title); or
- both give a title and an author, and they are equal.
Lines shorter than MIN_LINE are ignored: 词 repeat short formulae (知否，知否) across unrelated poems. A character
added or left out is not a variant here: on the official poems it matched 我欲乘风去 to 我欲乘风归去, two different
水调歌头. A poem that quotes a line of an excluded one with one character changed is excluded too (周邦彦's 西河
quotes 刘禹锡's 石头城): the check errs on the side of leaving a poem out.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..prosody.tables import simplified
from .io import load_references

MIN_LINE = 5
_SPACES = re.compile(r"[ \t\u3000]+")  # inside a line; line breaks and punctuation end one
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+")


def normalised(text: str) -> str:
    """Simplified CJK characters only: 《靜夜思》 -> 静夜思."""
    return "".join(_CJK_RUN.findall(simplified(text)))


def poem_lines(content: str) -> list[str]:
    """The normalised lines of a poem that decontamination compares, each once, in order."""
    runs = _CJK_RUN.findall(_SPACES.sub("", simplified(content)))
    return list(dict.fromkeys(run for run in runs if len(run) >= MIN_LINE))


def _masks(line: str) -> list[str]:
    """The line with each position masked in turn: two lines of one length that differ in at most one character
    share one of these keys."""
    return [f"{line[:i]}\0{line[i + 1:]}" for i in range(len(line))]


@dataclass(frozen=True)
class Excluded:
    title: str
    author: str | None
    source: str  # file:record of the excluded poem


@dataclass(frozen=True)
class Overlap:
    excluded: Excluded
    reason: str  # what is shared, e.g. "line 床前看月光 ~ 床前明月光"

    def __str__(self) -> str:
        return f"{self.reason} of 《{self.excluded.title}》 ({self.excluded.source})"


class OverlapIndex:
    """Excluded poems, looked up by line (within one edit) and by title with author."""

    def __init__(self) -> None:
        self.poems: list[Excluded] = []
        self._line_owner: dict[str, int] = {}   # normalised line -> the first excluded poem that has it
        self._by_mask: dict[str, str] = {}  # masked line -> the first indexed line that gives it
        self._by_title: dict[tuple[str, str], int] = {}

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path]) -> OverlapIndex:
        """Every poem of the given evaluation files (official eval format), training trees, JSON lists or JSONL
        files: any record with a `content`, its `title` and `author` when given."""
        index = cls()
        for path in paths:
            for poem in load_references(path):
                index.add(poem.title, poem.author, poem.content, poem.source or str(path))
        return index

    def __len__(self) -> int:
        return len(self.poems)

    def add(self, title: str, author: str | None, content: str, source: str) -> None:
        number = len(self.poems)
        self.poems.append(Excluded(title, author, source))
        for line in poem_lines(content):
            if line not in self._line_owner:
                self._line_owner[line] = number
                for key in _masks(line):
                    self._by_mask.setdefault(key, line)
        key = (normalised(title), normalised(author or ""))
        if all(key):
            self._by_title.setdefault(key, number)

    def find(self, title: str, author: str | None, content: str) -> Overlap | None:
        """The excluded poem this one overlaps, and what they share: a line found exactly first, then one a character
        off, then title and author; None when it is clean."""
        lines = poem_lines(content)
        for line in lines:
            if line in self._line_owner:
                return Overlap(self.poems[self._line_owner[line]], f"line {line}")
        for line in lines:
            near = next((self._by_mask[key] for key in _masks(line) if key in self._by_mask), None)
            if near:
                return Overlap(self.poems[self._line_owner[near]], f"line {line} ~ {near}")
        key = (normalised(title), normalised(author or ""))
        if all(key) and key in self._by_title:
            return Overlap(self.poems[self._by_title[key]], f"title and author {key[0]} / {key[1]}")
        return None

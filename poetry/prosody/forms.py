"""Poem forms: line lengths, rhyme positions and the tone each position takes.

Regulated verse (近体诗: 五言/七言 绝句 and 律诗) is built from its four basic lines by the rules of 对 (the two lines
of a couplet oppose at the even positions) and 粘 (a couplet's first line follows the line before it), in its four
patterns: 平起 or 仄起 (the tone of the second character), the first line rhymed or not.

词 follow 龙榆生《唐宋词格律》 (1978), as transcribed in the MIT-licensed `ci_pu/ci_long` tables of
https://github.com/hulbji/couyun: each position 平, 仄 or 中 (either), each rhyme with the rhyme chain it belongs to
(清平乐 changes from an oblique rhyme to a level one at the second stanza). Only each 词牌's main form (正体) is known.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

from .tables import LEVEL, OBLIQUE

EITHER = "中"
_BREAKS = re.compile(r"[，。？！；、：,.?!;:\s\u3000]+")


def poem_lines(content: str) -> list[str]:
    """The clauses of a poem, without punctuation: a line of a 绝句, a clause of a 词."""
    return [line for line in _BREAKS.split(content) if line]


@dataclass(frozen=True)
class Line:
    tones: str                # 平, 仄 or 中 at each position
    rhyme: str | None = None  # the rhyme chain this line's last character belongs to
    repeats: int | None = None  # the 0-based index of an earlier line this one repeats (如梦令's 叠句)

    def __len__(self) -> int:
        return len(self.tones)


@dataclass(frozen=True)
class Pattern:
    label: str             # 平起首句入韵, or 正体 for a 词
    lines: tuple[Line, ...]
    free: tuple[int, ...] = ()  # 0-based positions any tone may take under the customary allowance (一三五不论)

    def required(self, line: int, position: int, loose: bool) -> str:
        """The tone a position takes: 平, 仄, or 中 when it is free."""
        return EITHER if loose and position in self.free else self.lines[line].tones[position]

    def writing_tone(self, line: int, position: int, loose: bool) -> str:
        """`required`, except that the allowance never frees a position whose other tone would make 孤平 or 三平尾
        (the checker reports those apart): the third from last of a line ending 平平 (仄仄仄平平 must not become
        仄仄平平平) and the fifth from last of one ending 平仄仄平 (平平仄仄平 must not become 仄平仄仄平)."""
        tones = self.lines[line].tones
        if tones[-2:] == LEVEL * 2 and position == len(tones) - 3 and tones[position] == OBLIQUE:
            return OBLIQUE
        if tones[-4:] == LEVEL + OBLIQUE * 2 + LEVEL and position == len(tones) - 5 and tones[position] == LEVEL:
            return LEVEL
        return self.required(line, position, loose)


@dataclass(frozen=True)
class Form:
    name: str
    aliases: tuple[str, ...]
    regulated: bool                    # 近体诗: 孤平, 三平尾 and 粘对 apply, rhymes by 平水韵 group
    patterns: tuple[Pattern, ...]
    chain_tones: dict[str, str]        # rhyme chain -> the tone its rhymes take
    stanza_starts: tuple[int, ...] = ()  # lines that open a new stanza (词's 下片)

    @property
    def line_lengths(self) -> tuple[int, ...]:
        return tuple(len(line) for line in self.patterns[0].lines)


def _opposite(tone: str) -> str:
    return OBLIQUE if tone == LEVEL else LEVEL


def _basic_line(length: int, second: str, last: str) -> str:
    """The basic line whose second and last characters take these tones."""
    five = {(OBLIQUE, OBLIQUE): "仄仄平平仄", (LEVEL, LEVEL): "平平仄仄平",
            (LEVEL, OBLIQUE): "平平平仄仄", (OBLIQUE, LEVEL): "仄仄仄平平"}
    if length == 5:
        return five[second, last]
    return second * 2 + five[_opposite(second), last]  # seven: two characters before a five of the other start


def _regulated_pattern(length: int, n_lines: int, start: str, first_rhymed: bool) -> Pattern:
    lines, second = [], start
    for index in range(n_lines):
        if index:
            second = _opposite(second) if index % 2 else second  # 对 inside a couplet, 粘 across couplets
        rhymed = index % 2 == 1 or (index == 0 and first_rhymed)
        lines.append(Line(_basic_line(length, second, LEVEL if rhymed else OBLIQUE), "a" if rhymed else None))
    label = f"{start}起首句{'入韵' if first_rhymed else '不入韵'}"
    return Pattern(label, tuple(lines), free=(0, 2) if length == 5 else (0, 2, 4))


def _regulated(name: str, alias: str, length: int, n_lines: int) -> Form:
    patterns = tuple(_regulated_pattern(length, n_lines, start, rhymed)
                     for start in (LEVEL, OBLIQUE) for rhymed in (False, True))
    return Form(name, (alias,), True, patterns, {"a": LEVEL})


def _ci(name: str, aliases: tuple[str, ...], lines: str, chain_tones: dict[str, str]) -> Form:
    """A 词 from its pattern, one line per clause: `tones[/chain][=repeated line]`, `|` between stanzas."""
    parsed, stanza_starts = [], []
    for stanza in lines.split("|"):
        if parsed:
            stanza_starts.append(len(parsed))
        for clause in stanza.split():
            clause, _, repeated = clause.partition("=")
            tones, _, chain = clause.partition("/")
            parsed.append(Line(tones, chain or None, int(repeated) if repeated else None))
    return Form(name, aliases, False, (Pattern("正体", tuple(parsed)),), chain_tones, tuple(stanza_starts))


FORMS: tuple[Form, ...] = (
    _regulated("五言绝句", "五绝", 5, 4),
    _regulated("七言绝句", "七绝", 7, 4),
    _regulated("五言律诗", "五律", 5, 8),
    _regulated("七言律诗", "七律", 7, 8),
    _ci("如梦令", (), "中仄中平平仄/a 中仄中平平仄/a 中仄仄平平 中仄仄平平仄/a 平仄/a 平仄/a=4 中仄仄平平仄/a",
        {"a": OBLIQUE}),
    _ci("忆江南", ("望江南", "梦江南", "江南好"), "平中仄 中仄仄平平/a 中仄中平平仄仄 中平中仄仄平平/a 中仄仄平平/a",
        {"a": LEVEL}),
    _ci("长相思", (), "中中平/a 中中平/a 中仄平平中仄平/a 中平中仄平/a | "
        "中中平/a 中中平/a 中仄平平中仄平/a 中平中仄平/a", {"a": LEVEL}),
    _ci("浣溪沙", (), "中仄中平中仄平/a 中平中仄仄平平/a 中平中仄仄平平/a | "
        "中仄中平平仄仄 中平中仄仄平平/a 中平中仄仄平平/a", {"a": LEVEL}),
    _ci("清平乐", (), "中平中仄/a 中仄平平仄/a 中仄中平平仄仄/a 中仄中平中仄/a | 中平中仄平平/b 中平中仄平平/b "
        "中仄中平中仄 中平中仄平平/b", {"a": OBLIQUE, "b": LEVEL}),
)


def form_named(name: str) -> Form:
    for form in FORMS:
        if name == form.name or name in form.aliases:
            return form
    known = ", ".join(form.name for form in FORMS)
    raise ValueError(f"unknown form {name!r}; the forms known are: {known}")


def record_form(name: str, source: str | None) -> Form:
    """form_named for a record's `form` field: the error names the record (`file:N: field 'form': ...`)."""
    try:
        return form_named(name)
    except ValueError as err:
        raise ValueError(f"{source}: field 'form': {err}") from None


def infer_form(title: str, lines: list[str], lyric: bool = False) -> Form | None:
    """A 词's 词牌 from its title (如梦令·常记溪亭日暮), else regulated verse by its shape; None when neither.
    A `lyric` poem (a 词, e.g. from the official data's 宋词 folder) is never taken for regulated verse by its shape:
    玉楼春 has a 七律's eight lines of seven."""
    tune = title.split("·")[0].strip()
    for form in FORMS:
        if not form.regulated and (tune == form.name or tune in form.aliases):
            return form
    if lyric:
        return None
    return next((form for form in FORMS if form.regulated and tuple(map(len, lines)) == form.line_lengths), None)


def poem_form(title: str, content: str, source: str | None = None) -> Form | None:
    """infer_form for a record: one read from the official data's 宋词 folder (its `source`, "train-data/宋词/
    train.json:3") is a 词."""
    lyric = source is not None and "宋词" in PurePath(source.rsplit(":", 1)[0]).parts
    return infer_form(title, poem_lines(content), lyric)


def writing_title(title: str, form: Form) -> str:
    """The title to ask a poem of `form` by: a 词's subtitle after its 词牌 (如梦令·常记溪亭日暮 -> 常记溪亭日暮),
    nothing when the title is the 词牌 alone, else the title."""
    tune, _, subtitle = title.partition("·")
    if not form.regulated and tune.strip() in (form.name, *form.aliases):
        return subtitle.strip()
    return title.strip()

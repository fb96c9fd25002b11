"""Rule-based checks of a poem against its form: line lengths, rhyme, tones, and regulated verse's 孤平, 三平尾 and
重韵 (a rhyme character used twice).

A character read in several ways (看, 思, 教 are both level and oblique) satisfies any tone one of its readings
has, and rhymes in any group one of its readings is in: a checker must not fault what a poet may rightly read.
A character the table lacks is neither counted right nor wrong; it is listed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from .forms import EITHER, Form, Pattern, poem_lines
from .tables import LEVEL, RhymeGroup, RhymeTable, rhyme_table


@dataclass(frozen=True)
class Violation:
    line: int       # 1-based
    position: int   # 1-based inside the line; 0 when the whole line is at fault
    char: str
    kind: str       # lines, length, rhyme, tone, 孤平, 三平尾, 重韵, repeat
    expected: str

    def __str__(self) -> str:
        where = (f"line {self.line}" if self.line else "the poem") + (
            f" char {self.position} {self.char}" if self.position else "")
        return f"{where}: {self.kind}, expected {self.expected}"


@dataclass(frozen=True)
class PoemCheck:
    form: str
    pattern: str                 # the pattern the poem is closest to: 平起首句入韵, 正体
    lines_ok: bool               # the right number of lines, each of the right length
    rhyme_ok: bool
    rhymes: tuple[str, ...]      # the rhyme group (regulated verse) or 词林正韵 部 of each rhyme chain
    tones_right: int             # over the positions whose tone the form fixes (the 1-3-5 allowance applied)
    tones_checked: int
    unknown: tuple[str, ...]     # characters the table lacks
    violations: tuple[Violation, ...]

    @property
    def tone_share(self) -> float:
        return self.tones_right / self.tones_checked if self.tones_checked else 0.0

    @property
    def ok(self) -> bool:
        return self.lines_ok and self.rhyme_ok and not self.violations

    def summary(self) -> str:
        """One line: `2 violations; lines right; rhyme 十五删 wrong; tones 15/16 (94%)`."""
        count = len(self.violations)
        verdict = "regular" if self.ok else f"{count} violation{'s' if count > 1 else ''}"
        return (f"{verdict}; lines {'right' if self.lines_ok else 'wrong'}; rhyme {'/'.join(self.rhymes) or '-'} "
                f"{'right' if self.rhyme_ok else 'wrong'}; tones {self.tones_right}/{self.tones_checked} "
                f"({self.tone_share:.0%})")

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok, "tone_share": self.tone_share,
                "violations": [str(v) for v in self.violations]}


def check_poem(content: str, form: Form, loose: bool = True, table: RhymeTable | None = None) -> PoemCheck:
    """Check `content` against `form`; with `loose`, the customary 1-3-5 allowance of regulated verse applies."""
    table = table or rhyme_table()
    lines = poem_lines(content)
    if len(lines) != len(form.patterns[0].lines):
        wrong = Violation(0, 0, "", "lines", f"{len(form.line_lengths)} lines, got {len(lines)}")
        return PoemCheck(form.name, "", False, False, (), 0, 0, _unknown(lines, table), (wrong,))
    # the closest pattern; on a tie the one rhyming more lines (间 rhymes, and may be read oblique: 首句入韵)
    checked = [(_check_pattern(lines, form, pattern, loose, table), pattern) for pattern in form.patterns]
    best, _ = min(checked, key=lambda found: (len(found[0].violations), -found[0].tones_right,
                                              -sum(line.rhyme is not None for line in found[1].lines)))
    return best


def _unknown(lines: list[str], table: RhymeTable) -> tuple[str, ...]:
    return tuple(dict.fromkeys(char for line in lines for char in line if not table.knows(char)))


def _check_pattern(lines: list[str], form: Form, pattern: Pattern, loose: bool, table: RhymeTable) -> PoemCheck:
    violations, right, checked = [], 0, 0
    for index, (line, spec) in enumerate(zip(lines, pattern.lines, strict=True)):
        if len(line) != len(spec):
            violations.append(Violation(index + 1, 0, "", "length", f"{len(spec)} characters, got {len(line)}"))
            continue
        for position, char in enumerate(line):
            tones = table.tones(char)
            required = pattern.required(index, position, loose)
            if required == EITHER or not tones:
                continue
            checked += 1
            if required in tones:
                right += 1
            else:
                violations.append(Violation(index + 1, position + 1, char, "tone", required))
        if form.regulated and spec.tones[-1] == LEVEL:  # 孤平 and 三平尾 are faults of the lines that end level
            violations.extend(_regulated_faults(index, line, table))
        if spec.repeats is not None and line != lines[spec.repeats]:
            violations.append(Violation(index + 1, 0, "", "repeat", f"line {spec.repeats + 1} again (叠句)"))
    rhymes, rhyme_faults = _check_rhymes(lines, form, pattern, table)
    violations.extend(rhyme_faults)
    if form.regulated:
        violations.extend(_repeated_rhymes(lines, pattern))
    violations.sort(key=lambda v: (v.line, v.position))
    return PoemCheck(form.name, pattern.label, not any(v.kind == "length" for v in violations), not rhyme_faults,
                     rhymes, right, checked, _unknown(lines, table), tuple(violations))


def _regulated_faults(index: int, line: str, table: RhymeTable) -> list[Violation]:
    """三平尾 and 孤平 on a line the pattern ends level, faulted only where no reading of the characters avoids them
    (a last character read only oblique is a tone fault instead). 孤平 is
    judged on the last five characters (a 七言 line's first two do not rescue it): one level character before the
    rhyme, not next to it (仄平仄仄平; 仄仄仄平平 is regular)."""
    tail = line[-5:]
    offset = len(line) - len(tail)
    may_be_level = [LEVEL in table.tones(char) or not table.knows(char) for char in tail]
    if not may_be_level[-1]:
        return []
    faults = []
    if all(table.tones(char) == {LEVEL} for char in tail[-3:]):
        faults.append(Violation(index + 1, len(line) - 2, line[-3], "三平尾", "an oblique one of the last three"))
    level_before_rhyme = [i for i in range(len(tail) - 1) if may_be_level[i]]
    if len(level_before_rhyme) == 1 and level_before_rhyme[0] < len(tail) - 2:
        lone = offset + level_before_rhyme[0]
        faults.append(Violation(index + 1, lone + 1, line[lone], "孤平", "a second level character beside it"))
    return faults


def _check_rhymes(lines: list[str], form: Form, pattern: Pattern, table: RhymeTable
                  ) -> tuple[tuple[str, ...], list[Violation]]:
    names, faults = [], []
    for chain, tone in form.chain_tones.items():
        ends = [(index, lines[index][-1]) for index, spec in enumerate(pattern.lines) if spec.rhyme == chain]
        if not ends:
            continue
        choices = {index: rhyme_classes(char, tone, form.regulated, table) for index, char in ends}
        counts = Counter(name for found in choices.values() for name in found)
        if not counts:
            faults += [Violation(i + 1, len(lines[i]), c, "rhyme", f"a {tone} rhyme") for i, c in ends]
            names.append("?")
            continue
        best = min(counts, key=lambda name: (-counts[name], name))
        names.append(best)
        faults += [Violation(i + 1, len(lines[i]), c, "rhyme", best) for i, c in ends
                   if best not in choices[i] and not _borrowed_first_rhyme(i, c, best, form, table)]
    return tuple(names), faults


def _repeated_rhymes(lines: list[str], pattern: Pattern) -> list[Violation]:
    """重韵: regulated verse ends no two rhymed lines with one character (a 词 may, so only regulated verse)."""
    faults, used = [], {}
    for index, spec in enumerate(pattern.lines):
        char = lines[index][-1]
        if spec.rhyme is None:
            continue
        if char in used:
            faults.append(Violation(index + 1, len(lines[index]), char, "重韵",
                                    f"a rhyme character not used before (line {used[char] + 1} rhymes on it)"))
        used.setdefault(char, index)
    return faults


def _borrowed_first_rhyme(index: int, char: str, group: str, form: Form, table: RhymeTable) -> bool:
    """首句借韵: a regulated poem's first line may rhyme in a neighbouring group (峰 of 二冬 in a poem of 一东);
    neighbours are the groups 词林正韵 puts in one 部."""
    if not form.regulated or index != 0:
        return False
    sections = table.group(group).ci_sections
    return any(found.ci_sections & sections for found in table.groups_of(char) if found.tone == LEVEL)


def rhyme_classes(char: str, tone: str, regulated: bool, table: RhymeTable) -> set[str]:
    """Where a rhyme character may rhyme: its 平水韵 groups of that tone, or, for a 词, their 词林正韵 部."""
    return {name for group in table.groups_of(char) if group.tone == tone for name in group_classes(group, regulated)}


def group_classes(group: RhymeGroup, regulated: bool) -> set[str]:
    """What a 平水韵 group rhymes as: itself in regulated verse, its 词林正韵 部 in a 词."""
    return {group.short} if regulated else {f"第{section}部" for section in group.ci_sections}

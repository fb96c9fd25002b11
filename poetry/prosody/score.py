"""Writing metrics over a set of poems: the checker's rates, diversity, and how much is copied from a corpus.

- form: the share of poems with the form's number of lines, each of its length (SongNet's Format, CharPoet's format
  accuracy);
- rhyme: the share whose rhymes are right (平水韵 for regulated verse, 词林正韵 部 for 词): the form's number of
  lines, and the last character of each line its pattern rhymes in one group. Line lengths are not asked, so a
  poem with a line too long or short may rhyme right and still fail the form (free decoding's rhyme can exceed
  its form rate);
- tone: tone positions right over those checked, on the poems of the right form;
- regular: the share keeping every rule;
- Distinct-1/2 (Li et al., NAACL 2016): distinct character unigrams and bigrams inside lines over all of them;
- copying: the longest run of characters (punctuation dropped) a poem shares with any corpus poem, the share of
  lines found whole among the corpus's lines, and the share of poems with at least one such line.
"""
from __future__ import annotations

from dataclasses import dataclass

from .check import PoemCheck, check_poem
from .forms import Form, poem_lines


@dataclass(frozen=True)
class WritingScores:
    poems: int
    form: float
    rhyme: float
    tone: float | None          # None when no poem had the right form
    regular: float
    distinct_1: float
    distinct_2: float
    longest_copy: int | None    # the most over the poems; None without a corpus
    mean_longest_copy: float | None
    copied_lines: float | None
    poems_with_copied_line: float | None

    def rows(self) -> list[tuple[str, str]]:
        def share(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        return [("poems", str(self.poems)), ("form", share(self.form)), ("rhyme", share(self.rhyme)),
                ("tone", share(self.tone)), ("every rule", share(self.regular)),
                ("Distinct-1", share(self.distinct_1)), ("Distinct-2", share(self.distinct_2)),
                ("longest run copied (most, mean)", "-" if self.longest_copy is None
                 else f"{self.longest_copy}, {self.mean_longest_copy:.1f}"),
                ("lines copied whole", share(self.copied_lines)),
                ("poems with a copied line", share(self.poems_with_copied_line))]


def rule_counts(checks: list[PoemCheck]) -> list[int]:
    """[poems, poems of the right form, poems rhymed right, tone positions right, tone positions checked], the
    tones counted on the poems of the right form only: the counts behind the form, rhyme and tone rates, which
    processes can sum before dividing."""
    shaped = [check for check in checks if check.lines_ok]
    return [len(checks), len(shaped), sum(c.rhyme_ok for c in checks), sum(c.tones_right for c in shaped),
            sum(c.tones_checked for c in shaped)]


def score_writing(poems: list[tuple[Form, str]], corpus: list[str] | None = None, loose: bool = True) -> WritingScores:
    if not poems:
        raise ValueError("no poems to score")
    checks = [check_poem(text, form, loose=loose) for form, text in poems]
    n, shaped, rhymed, right, checked = rule_counts(checks)
    lines = [poem_lines(text) for _, text in poems]
    copies = _copies([line for poem in lines for line in poem], lines, corpus) if corpus is not None else None
    return WritingScores(
        n, shaped / n, rhymed / n, right / checked if checked else None, sum(c.ok for c in checks) / n,
        _distinct(lines, 1), _distinct(lines, 2), *(copies or (None,) * 4))


def _distinct(poems: list[list[str]], n: int) -> float:
    grams = [line[i:i + n] for poem in poems for line in poem for i in range(len(line) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _copies(all_lines: list[str], poems: list[list[str]], corpus: list[str]) -> tuple:
    corpus_lines = {line for text in corpus for line in poem_lines(text)}
    corpus_runs = ["".join(poem_lines(text)) for text in corpus]
    longest = [_longest_shared("".join(poem), corpus_runs) for poem in poems]
    copied = [[line in corpus_lines for line in poem] for poem in poems]
    n_lines = sum(map(len, copied))
    return (max(longest), sum(longest) / len(longest), sum(map(sum, copied)) / n_lines if n_lines else 0.0,
            sum(any(flags) for flags in copied) / len(poems))


def _longest_shared(text: str, corpus: list[str]) -> int:
    """The longest run of `text` found in any corpus text: grown one character at a time while some run of that
    length is shared (a run shared at length n+1 is shared at n)."""
    length = 0
    while length < len(text):
        size = length + 1
        runs = {text[i:i + size] for i in range(len(text) - size + 1)}
        if not any(run in other for other in corpus for run in runs):
            break
        length = size
    return length

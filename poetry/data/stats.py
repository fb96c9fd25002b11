"""Counts and coverage of a training tree: what the question builder can make of it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .emotions import OFFICIAL_SHARED_PAIR_RATE, shared_pair_rate
from .questions import QuestionBuilder, align_sentences, clauses
from .records import Poem


@dataclass(frozen=True)
class Stats:
    poems: int
    files: int
    glosses: int
    empty_glosses: int
    words_not_in_content: int
    poems_without_keywords: int
    alignment: Counter  # method -> poems
    sentence_pairs: int
    content_clauses: int
    with_emotion: int
    emotion_questions: int
    distinct_emotions: int
    option_pairs: int
    option_pairs_sharing: int  # option pairs of a question sharing a content character
    distractors: int
    bank_distractors: int  # drawn from the phrase bank, not from the poems' own emotions
    questions_per_epoch: int

    def rows(self) -> list[tuple[str, str]]:
        aligned = self.alignment["marks"] + self.alignment["lines"]

        def pct(n: int, d: int) -> str:
            return f"{n} ({100 * n / d:.1f}%)" if d else str(n)

        return [
            ("files", str(self.files)),
            ("poems", str(self.poems)),
            ("glosses (non-empty)", str(self.glosses)),
            ("empty glosses dropped", str(self.empty_glosses)),
            ("gloss words not in content (kept)", str(self.words_not_in_content)),
            ("poems without keywords", str(self.poems_without_keywords)),
            ("poems aligned by sentence marks", str(self.alignment["marks"])),
            ("poems aligned by lines", str(self.alignment["lines"])),
            ("poems not aligned (no sentence pairs)", str(self.alignment["none"])),
            ("aligned poems", pct(aligned, self.poems)),
            ("sentence pairs / content clauses", pct(self.sentence_pairs, self.content_clauses)),
            ("poems with an emotion", str(self.with_emotion)),
            ("distinct emotion options (cut to 2-8 characters)", str(self.distinct_emotions)),
            ("emotion questions (3 distractors found)", pct(self.emotion_questions, self.poems)),
            (f"option pairs sharing a content character (official eval: {100 * OFFICIAL_SHARED_PAIR_RATE:.1f}%)",
             pct(self.option_pairs_sharing, self.option_pairs)),
            ("distractors from the phrase bank", pct(self.bank_distractors, self.distractors)),
            ("questions per epoch (<= 3 words/sentences each)", str(self.questions_per_epoch)),
        ]


def compute_stats(poems: list[Poem], max_items: int = 3) -> Stats:
    builder = QuestionBuilder(poems, max_items=max_items)
    choices = [choice for p in poems if (choice := builder.choose(p, 0))]
    shared, pairs = shared_pair_rate([list(options.values()) for options, _ in choices])
    distractors = [o for options, letter in choices for k, o in options.items() if k != letter]
    alignments = [align_sentences(p.content, p.trans) for p in poems]
    glosses = [g for p in poems for g in p.keywords.values()]
    return Stats(
        poems=len(poems),
        files=len({(p.source or "").rsplit(":", 1)[0] for p in poems}),  # source is "file:record"
        glosses=sum(1 for g in glosses if g.strip()),
        empty_glosses=sum(1 for g in glosses if not g.strip()),
        words_not_in_content=sum(1 for p in poems for w in p.keywords if w not in p.content),
        poems_without_keywords=sum(1 for p in poems if not p.keywords),
        alignment=Counter(a.method for a in alignments),
        sentence_pairs=sum(len(a.pairs) for a in alignments),
        content_clauses=sum(len(clauses(p.content)) for p in poems),
        with_emotion=sum(1 for p in poems if p.emotion),
        emotion_questions=len(choices),
        distinct_emotions=len(builder.options),
        option_pairs=pairs,
        option_pairs_sharing=shared,
        distractors=len(distractors),
        bank_distractors=sum(1 for o in distractors if o not in builder.options),
        questions_per_epoch=len(builder.epoch(0)),
    )

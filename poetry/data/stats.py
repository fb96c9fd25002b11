"""Counts and coverage of a training tree, what the question builder can make of it, and its data card."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .emotions import OFFICIAL_SHARED_PAIR_RATE, shared_pair_rate, valence
from .imports import IMPORT_RECORD
from .overlap import OverlapIndex
from .questions import QuestionBuilder, align_sentences, clauses
from .records import Example, Poem


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
    by_type: Counter  # question type (words, sentences, options, writing) -> questions of epoch 0 asking it
    poems_without_questions: int  # poems that give no question of any type (writing aside)
    without_trans: int

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
            ("poems without a translation", str(self.without_trans)),
            ("questions asking words", str(self.by_type["words"])),
            ("questions asking sentences", str(self.by_type["sentences"])),
            ("questions asking an emotion option", str(self.by_type["options"])),
            ("writing examples (data.writing_examples; a known form)", str(self.by_type["writing"])),
            ("poems giving no question (writing aside)", str(self.poems_without_questions)),
        ]


def _types(examples: list[Example]) -> Counter:
    kinds = Counter()
    for example in examples:
        q = example.question
        kinds.update(kind for kind, asked in (("words", q.qa_words), ("sentences", q.qa_sents),
                                             ("options", q.choose and not example.emotion_only),
                                             ("writing", example.form)) if asked)
    return kinds


def compute_stats(poems: list[Poem], max_items: int = 3) -> Stats:
    builder = QuestionBuilder(poems, max_items=max_items, writing_examples=True)
    built = {poem.key: builder.examples(poem, 0) for poem in poems}
    tasks = [example for poem in poems for example in built[poem.key] if not example.form]
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
        questions_per_epoch=len(tasks),
        by_type=_types([example for poem in poems for example in built[poem.key]]),
        poems_without_questions=sum(1 for p in poems if not any(not e.form for e in built[p.key])),
        without_trans=sum(1 for p in poems if not p.trans),
    )


def declared_licence(path: Path) -> str:
    """The licence an import declared for the tree at `path`, or why none is known."""
    record = path / IMPORT_RECORD if path.is_dir() else path.parent / IMPORT_RECORD
    if not record.is_file():
        return f"not declared (no {IMPORT_RECORD}: not made by poetry.data import)"
    try:
        return json.loads(record.read_text(encoding="utf-8"))["licence"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {record}"


def card_rows(poems: list[Poem], path: Path, overlap: OverlapIndex | None, max_items: int = 3) -> list[tuple]:
    """A source's data card: size, questions by type, mean lengths, emotions by valence, licence, overlap."""
    stats = compute_stats(poems, max_items)
    n = len(poems) or 1
    glosses = [g for p in poems for g in p.keywords.values() if g.strip()]
    translated = [p.trans for p in poems if p.trans]
    moods = Counter(valence(p.emotion) or "unclassified" if p.emotion else "no emotion" for p in poems)
    found = sum(1 for p in poems if overlap.find(p.title, p.author, p.content)) if overlap is not None else None

    def share(count: int) -> str:
        return f"{count} ({100 * count / n:.0f}%)"

    return [
        ("records (poems)", str(len(poems))),
        ("questions per epoch", str(stats.questions_per_epoch)),
        *((f"  asking {kind}", str(stats.by_type[kind])) for kind in ("words", "sentences", "options")),
        ("  writing examples (a known form)", str(stats.by_type["writing"])),
        ("mean poem length (characters)", f"{sum(len(p.content) for p in poems) / n:.1f}"),
        ("mean translation length (of those with one)",
         f"{sum(map(len, translated)) / len(translated):.1f}" if translated else "-"),
        ("glosses per poem", f"{len(glosses) / n:.2f}"),
        *((f"emotion {kind}", share(moods[kind]))
          for kind in ("negative", "positive", "calm", "unclassified", "no emotion")),
        ("licence (as declared in the import)", declared_licence(path)),
        ("poems found in the exclude set", "no --exclude given" if found is None else share(found)),
    ]

"""Turning training poems into task questions with gold answers: the heart of the task adaptation.

A poem `{title, content, keywords, trans, emotion}` becomes questions shaped like the official eval items:
- words: the keyword glosses (empty glosses dropped; words absent from the content kept, as in the eval set);
- sentences: content/translation clause pairs, only where the structure proves the alignment;
- emotion: four short options shaped like the official ones (poetry.data.emotions): the poem's own emotion right,
  and three distractors from the split's other emotions (else a phrase bank) that share no content character with
  it or each other, one contrasting in valence; re-drawn and re-shuffled per (seed, poem, epoch) so each epoch sees
  a fresh question.
Long poems are split into several questions of at most `max_items` words and sentences, the size of eval items.
A poem of a form poetry.prosody knows can also give a writing example: its form and title in, the poem out.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass

from ..prosody.forms import poem_form, writing_title
from .emotions import draw_distractors, option_text
from .records import OPTION_LETTERS, Answer, Example, Poem, Question

SENTENCE_END = "。！？；"
_CLAUSE = re.compile(rf"[^{SENTENCE_END}]*[{SENTENCE_END}]+|[^{SENTENCE_END}]+$")


def clauses(text: str) -> list[str]:
    """Split at sentence-final marks, keeping each mark with its clause; whitespace (line breaks, the full-width
    spaces between ci stanzas) is dropped at clause edges."""
    return [c.strip(" \n\t\u3000") for c in _CLAUSE.findall(text) if c.strip(" \n\t\u3000")]


def _lines(text: str) -> list[str]:
    return [line.strip(" \t\u3000") for line in text.split("\n") if line.strip(" \t\u3000")]


@dataclass(frozen=True)
class Alignment:
    pairs: tuple[tuple[str, str], ...]
    method: str  # "marks", "lines" or "none"


def align_sentences(content: str, trans: str) -> Alignment:
    """Pair content and translation sentences only when the structure allows it.

    Equal counts of sentence-final marks pair clause i with clause i; otherwise equal line counts (two or more
    lines) pair line i with line i; otherwise nothing is paired, since the translation re-orders or merges.
    """
    source, target = clauses(content), clauses(trans)
    if source and len(source) == len(target):
        return Alignment(tuple(zip(source, target, strict=True)), "marks")
    source, target = _lines(content), _lines(trans)
    if len(source) > 1 and len(source) == len(target):
        return Alignment(tuple(zip(source, target, strict=True)), "lines")
    return Alignment((), "none")


def _chunks(items: list, n_chunks: int) -> list[list]:
    """Split into n_chunks runs of near-equal size, order kept (7 items, 3 chunks -> 3, 2, 2)."""
    size, extra = divmod(len(items), n_chunks)
    bounds = [i * size + min(i, extra) for i in range(n_chunks + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(n_chunks)]


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


class QuestionBuilder:
    """Builds the training questions of one epoch. The emotion pool is the poems given, so distractors come from the
    same split (no validation emotions leak into training options)."""

    def __init__(self, poems: list[Poem], seed: int = 0, max_items: int = 3, emotion_examples: bool = False,
                 writing_examples: bool = False):
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.poems, self.seed, self.max_items, self.emotion_examples = poems, seed, max_items, emotion_examples
        self.writing_examples = writing_examples
        self.options = sorted({o for p in poems if p.emotion and (o := option_text(p.emotion))})

    def choose(self, poem: Poem, epoch: int) -> tuple[dict[str, str], str] | None:
        """Options A-D and the right letter, or None when the poem has no emotion that makes an option, or fewer than
        three options share no content character with it and each other."""
        answer = option_text(poem.emotion) if poem.emotion else None
        if answer is None:
            return None
        rng = random.Random(f"{self.seed}:{poem.key}:{epoch}")
        distractors = draw_distractors(answer, self.options, rng, len(OPTION_LETTERS) - 1)
        if distractors is None:
            return None
        options = [answer, *distractors]
        rng.shuffle(options)
        return dict(zip(OPTION_LETTERS, options, strict=True)), OPTION_LETTERS[options.index(answer)]

    def examples(self, poem: Poem, epoch: int) -> list[Example]:
        writing = writing_example(poem) if self.writing_examples else None
        return self._task_examples(poem, epoch) + ([writing] if writing else [])

    def _task_examples(self, poem: Poem, epoch: int) -> list[Example]:
        glosses = [(w, g.strip()) for w, g in poem.keywords.items() if g.strip()]
        sentences = list(align_sentences(poem.content, poem.trans).pairs)
        choice = self.choose(poem, epoch)
        n_questions = max(math.ceil(len(glosses) / self.max_items), math.ceil(len(sentences) / self.max_items), 1)
        if not glosses and not sentences and choice is None:
            return []
        examples = []
        for words, sents in zip(_chunks(glosses, n_questions), _chunks(sentences, n_questions), strict=True):
            options, letter = choice if choice else ({}, None)
            question = Question(idx=len(examples), title=poem.title, author=poem.author, content=poem.content,
                                qa_words=tuple(w for w, _ in words), qa_sents=tuple(s for s, _ in sents),
                                choose=options)
            answer = Answer(idx=len(examples), ans_qa_words=dict(words), ans_qa_sents=dict(sents), choose_id=letter)
            examples.append(Example(question, answer))
        if self.emotion_examples and choice is not None:
            examples.append(Example(examples[0].question, examples[0].answer, emotion_only=True))
        return examples

    def epoch(self, epoch: int) -> list[Example]:
        return [example for poem in self.poems for example in self.examples(poem, epoch)]


def split_poems(poems: list[Poem], val_fraction: float, seed: int = 0, folds: int = 0,
                fold: int = 0) -> tuple[list[Poem], list[Poem]]:
    """Deterministic train/validation split by a stable hash of each poem: the same poem lands on the same side on
    any machine and in any file order, and no poem is on both sides. With `folds` (K >= 2), fold `fold` of
    poem_folds() is held out instead and val_fraction is ignored: over the K folds every poem is held out once."""
    if folds:
        if folds < 2 or not 0 <= fold < folds:
            raise ValueError(f"folds must be at least 2 and fold in [0, {folds - 1}], got folds={folds}, fold={fold}")
        fold_of = poem_folds(poems, folds, seed)
        return [p for p in poems if fold_of[p.key] != fold], [p for p in poems if fold_of[p.key] == fold]
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for poem in poems:
        bucket = stable_hash(f"{seed}:{poem.key}") / 2**64
        (val if bucket < val_fraction else train).append(poem)
    return train, val


def poem_folds(poems: list[Poem], folds: int, seed: int = 0) -> dict[str, int]:
    """Each distinct poem key's fold: the keys in the order of their stable hash, dealt round-robin. So fold sizes
    differ by at most one poem and its copies (a hash modulo K leaves 23 to 42 of the 164 official poems per fold at
    K=5, and can leave a fold of a few poems empty), copies of a poem share a fold, and neither the machine nor the
    file order changes a poem's fold."""
    keys = sorted({p.key for p in poems}, key=lambda key: (stable_hash(f"{seed}:{key}"), key))
    return {key: rank % folds for rank, key in enumerate(keys)}


def writing_example(poem: Poem) -> Example | None:
    """写一首<form>，题为《<title>》。 -> the poem, for a poem of a form poetry.prosody knows; else None."""
    form = poem_form(poem.title, poem.content, poem.source)
    if form is None:
        return None
    question = Question(idx=0, title=writing_title(poem.title, form), author=poem.author,
                        content="".join(poem.content.split()), qa_words=(), qa_sents=(), choose={})
    return Example(question, Answer(0, {}, {}, None), form=form.name)


def validation_writing_examples(val_poems: list[Poem]) -> list[Example]:
    """The held-out poems' writing examples: their titles and forms, in the poems' order."""
    return [example for poem in val_poems if (example := writing_example(poem))]


def validation_examples(val_poems: list[Poem], seed: int, max_items: int) -> list[Example]:
    """Fixed validation questions (the epoch-0 draw), so curves are comparable across steps. Distractors come from
    the validation poems' own emotions: options seen as right answers in training would give the right one away
    as the only unfamiliar option."""
    return QuestionBuilder(val_poems, seed=seed, max_items=max_items).epoch(0)

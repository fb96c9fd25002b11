"""The balanced held-out set (data/balanced): official formats, halves equal by the valence of the gold option,
official-like options, letters spread evenly, and no poem shared with any training data."""
import re
from collections import Counter

import pytest

from poetry.data import Poem, check_submission, load_answers, load_poems, load_questions
from poetry.data.emotions import MAX_CHARS, MIN_CHARS, shares_content, valence

from conftest import ROOT, SAMPLE

BALANCED = ROOT / "data" / "balanced"
_PUNCTUATION = re.compile(r"[\W_]+")
_LINE_END = re.compile(r"[。！？；!?;\n\u3000]+")
_CLAUSE_END = re.compile(r"[，,、：:。！？；!?;\s]+")
MIN_CLAUSE = 4  # shorter clauses ("太匆匆", "知否") can coincide between different poems


@pytest.fixture(scope="module")
def questions():
    return load_questions(BALANCED / "eval.json").records


@pytest.fixture(scope="module")
def gold():
    return load_answers(BALANCED / "eval_gold.json")


def _right(question, answer) -> str:
    return question.choose[answer.choose_id]


def _pieces(content: str) -> set[str]:
    """Lines (up to a sentence-final mark) and clauses of MIN_CLAUSE+ characters, without punctuation."""
    lines = {_PUNCTUATION.sub("", x) for x in _LINE_END.split(content)}
    clauses = {_PUNCTUATION.sub("", x) for x in _CLAUSE_END.split(content)}
    return {x for x in lines | clauses if len(x) >= MIN_CLAUSE}


def _overlaps(questions, poems) -> list[str]:
    """Each (question, poem) pair with the same title (and author, where the poem gives one) or a shared line."""
    found = []
    for q in questions:
        mine = _pieces(q.content)
        for poem in poems:
            same = q.title == poem.title and poem.author in (None, q.author)
            shared = mine & _pieces(poem.content)
            if same or shared:
                where = getattr(poem, "source", None) or "sample eval"
                found.append(f"{q.title} / {poem.title} ({where}): same title={same}, shared={sorted(shared)}")
    return found


def test_files_load_and_gold_is_a_valid_submission(questions, gold):
    check_submission(questions, gold, str(BALANCED / "eval_gold.json"))
    assert len(questions) >= 40


def test_halves_are_equal_by_the_valence_of_the_gold_option(questions, gold):
    kinds = Counter(valence(_right(q, a)) for q, a in zip(questions, gold, strict=True))
    assert None not in kinds, "every gold option must have a valence the lexicon can tell"
    assert kinds["positive"] + kinds["calm"] == kinds["negative"], kinds


def test_every_item_has_a_distractor_from_the_other_half(questions, gold):
    for q, a in zip(questions, gold, strict=True):
        right = valence(_right(q, a))
        others = {valence(option) for letter, option in q.choose.items() if letter != a.choose_id}
        wanted = {"positive", "calm"} if right == "negative" else {"negative"}
        assert others & wanted, (q.idx, q.choose)


def test_options_are_official_like(questions):
    for q in questions:
        options = list(q.choose.values())
        assert all(MIN_CHARS <= len(option) <= MAX_CHARS for option in options), (q.idx, options)
        for i, option in enumerate(options):
            for other in options[i + 1:]:
                assert not shares_content(option, other), (q.idx, option, other)


def test_right_letters_are_balanced(gold):
    letters = Counter(a.choose_id for a in gold)
    for letter in "ABCD":
        assert 0.20 <= letters[letter] / len(gold) <= 0.30, letters


def test_words_and_sentences_come_from_the_poem(questions):
    for q in questions:
        for word in q.qa_words:
            assert word in q.content or word in q.title, (q.idx, word)
        content = re.sub(r"\s+", "", q.content)
        for sentence in q.qa_sents:
            assert re.sub(r"\s+", "", sentence) in content, (q.idx, sentence)


def test_no_poem_is_in_the_sample_data(questions):
    poems = load_poems(SAMPLE / "train-data").records + list(load_questions(SAMPLE / "eval.json").records)
    assert _overlaps(questions, poems) == []


def test_no_poem_is_in_the_official_training_data(questions, shared_train):
    poems = load_poems(shared_train).records
    assert len(poems) == 164
    assert _overlaps(questions, poems) == []


def test_the_overlap_check_finds_a_shared_line(questions):
    """The check itself: a training poem sharing one line with a balanced poem, under another title, is found."""
    line = questions[0].content.split("。")[0] + "。"
    poem = Poem(title="另一首", content=line + "白日依山尽，黄河入海流。", keywords={}, trans="", emotion=None)
    assert len(_overlaps(questions, [poem])) == 1

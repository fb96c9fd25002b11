"""Question-building invariants: the adaptation of training poems to the eval task."""
from dataclasses import replace

import pytest

from poetry.data import Poem, QuestionBuilder, align_sentences, clauses, load_poems, split_poems
from poetry.data.emotions import PHRASE_BANK, option_text, shares_content

from conftest import SAMPLE

EMOTIONS = ["离别，思念", "思乡", "闲适、自得", "壮志难酬的悲愤", "怀古与感慨", "相思", "喜悦", "思念与孤独", None]


def poem(i: int, emotion: str | None = "思乡", keywords: dict | None = None) -> Poem:
    return Poem(title=f"诗{i}", content=f"第{i}首甲句，乙句。丙句，丁句。", trans="甲乙的译文。丙丁的译文。",
                keywords={"甲句": "甲的意思。", "乙句": "乙的意思。"} if keywords is None else keywords,
                emotion=emotion)


@pytest.fixture
def poems():
    return [poem(i, e) for i, e in enumerate(EMOTIONS)]


def test_clauses_keep_marks_and_drop_stanza_spaces():
    assert clauses("上阕一句。上阕二句！\n　下阕一句？下阕二句") == \
        ["上阕一句。", "上阕二句！", "下阕一句？", "下阕二句"]
    assert clauses("连问？！再说。") == ["连问？！", "再说。"]


def test_alignment_by_marks_lines_or_nothing():
    marks = align_sentences("甲，乙。丙，丁；", "译甲乙。译丙丁；")
    assert marks.method == "marks" and marks.pairs == (("甲，乙。", "译甲乙。"), ("丙，丁；", "译丙丁；"))
    lines = align_sentences("甲，乙\n丙，丁。", "译甲乙。又一句。\n译丙丁")
    assert lines.method == "lines" and lines.pairs == (("甲，乙", "译甲乙。又一句。"), ("丙，丁。", "译丙丁"))
    merged = align_sentences("甲，乙。丙，丁。", "合并的译文。")
    assert merged.method == "none" and merged.pairs == ()
    assert align_sentences("一行。", "一行译文。但多一句。").pairs == ()  # one line each is no evidence


def test_alignment_never_pairs_unequal_structures(shared_train):
    for p in load_poems(shared_train).records:
        alignment = align_sentences(p.content, p.trans)
        if alignment.method == "marks":
            assert len(clauses(p.content)) == len(clauses(p.trans)) == len(alignment.pairs)
        elif alignment.method == "none":
            assert not alignment.pairs


def test_one_right_option_and_distractors_sharing_no_character(poems):
    builder = QuestionBuilder(poems, seed=3)
    for p in poems:
        for epoch in range(5):
            choice = builder.choose(p, epoch)
            if p.emotion is None:
                assert choice is None
                continue
            options, letter = choice
            assert list(options) == ["A", "B", "C", "D"] and options[letter] == option_text(p.emotion)
            values = list(options.values())
            assert len(set(values)) == 4
            assert not any(shares_content(a, b) for i, a in enumerate(values) for b in values[i + 1:])


def test_the_phrase_bank_fills_in_when_the_split_is_all_alike():
    crowd = [poem(i, e) for i, e in enumerate(["思乡", "思乡之愁", "乡愁", "喜悦"])]
    options, letter = QuestionBuilder(crowd).choose(crowd[0], 0)
    distractors = set(options.values()) - {"思乡"}
    assert options[letter] == "思乡" and "喜悦" in distractors  # the split's own unlike emotion comes first
    assert len(distractors - {"喜悦"} & set(PHRASE_BANK)) == 2


def test_deterministic_per_seed_and_reshuffled_per_epoch(poems):
    first, again = QuestionBuilder(poems, seed=1), QuestionBuilder(poems, seed=1)
    assert first.epoch(0) == again.epoch(0)
    epochs = [[e.question.choose for e in first.epoch(k)] for k in range(4)]
    assert len({repr(e) for e in epochs}) == 4
    letters = {first.choose(poems[0], k)[1] for k in range(12)}
    assert len(letters) > 1
    assert [e.question.choose for e in QuestionBuilder(poems, seed=2).epoch(0)] != epochs[0]


def test_examples_carry_words_sentences_and_answer(poems):
    builder = QuestionBuilder(poems)
    (example,) = builder.examples(poems[1], epoch=0)
    q, a = example.question, example.answer
    assert q.qa_words == ("甲句", "乙句") and a.ans_qa_words == {"甲句": "甲的意思。", "乙句": "乙的意思。"}
    assert q.qa_sents == ("第1首甲句，乙句。", "丙句，丁句。")
    assert list(a.ans_qa_sents.values()) == ["甲乙的译文。", "丙丁的译文。"]
    assert q.choose[a.choose_id] == "思乡"


def test_empty_glosses_dropped_and_absent_words_kept(poems):
    p = replace(poems[0], keywords={"甲句": " ", "题中词": "标题里的词。"})
    (example,) = QuestionBuilder(poems).examples(p, 0)
    assert example.answer.ans_qa_words == {"题中词": "标题里的词。"}


def test_long_poems_split_into_eval_sized_questions(poems):
    many = replace(poems[0], keywords={f"词{i}": f"义{i}。" for i in range(7)})
    examples = QuestionBuilder(poems, max_items=3).examples(many, 0)
    assert [len(e.question.qa_words) for e in examples] == [3, 2, 2]
    assert [w for e in examples for w in e.question.qa_words] == [f"词{i}" for i in range(7)]
    assert len({e.answer.choose_id for e in examples}) == 1  # one draw per (poem, epoch)


def test_emotion_examples_add_one_per_poem_with_options(poems):
    plain, with_emotion = QuestionBuilder(poems, seed=1), QuestionBuilder(poems, seed=1, emotion_examples=True)
    for p in poems:
        task = plain.examples(p, 2)
        extra = with_emotion.examples(p, 2)
        assert extra[:len(task)] == task and all(not e.emotion_only for e in task)
        if p.emotion is None:
            assert extra == task
        else:
            (emotion,) = extra[len(task):]
            assert emotion.emotion_only and emotion.question.choose[emotion.answer.choose_id] == option_text(p.emotion)


def test_null_emotion_has_no_emotion_part(poems):
    (example,) = QuestionBuilder(poems).examples(poems[-1], 0)
    assert example.question.choose == {} and example.answer.choose_id is None


def test_split_is_stable_disjoint_and_complete(shared_train):
    poems = load_poems(shared_train).records
    train, val = split_poems(poems, 0.1, seed=0)
    assert len(train) + len(val) == len(poems) and 8 <= len(val) <= 30
    assert not {p.key for p in train} & {p.key for p in val}
    train2, val2 = split_poems(list(reversed(poems)), 0.1, seed=0)
    assert {p.key for p in val2} == {p.key for p in val}
    assert {p.key for p in split_poems(poems, 0.1, seed=1)[1]} != {p.key for p in val}


def test_folds_hold_every_poem_out_once_in_balanced_disjoint_folds():
    poems = load_poems(SAMPLE / "train-data").records
    poems = [*poems, replace(poems[5], source="a copy")]  # a poem twice, as two official poems are
    held_out = [split_poems(poems, 0.1, seed=0, folds=4, fold=i) for i in range(4)]
    assert sorted(p.source for _, val in held_out for p in val) == sorted(p.source for p in poems)
    for train, val in held_out:
        assert len(train) + len(val) == len(poems) and not {p.key for p in train} & {p.key for p in val}
    sizes = [len({p.key for p in val}) for _, val in held_out]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(poems) - 1
    reordered = split_poems(list(reversed(poems)), 0.1, seed=0, folds=4, fold=2)[1]
    assert {p.key for p in reordered} == {p.key for p in held_out[2][1]}
    assert {p.key for p in split_poems(poems, 0.1, seed=1, folds=4, fold=2)[1]} != {p.key for p in held_out[2][1]}
    with pytest.raises(ValueError, match="fold in \\[0, 3\\]"):
        split_poems(poems, 0.1, folds=4, fold=4)


def test_writing_examples_come_from_poems_of_a_known_form_with_the_form_and_title_asked():
    jueju = Poem(title="早发白帝城", content="朝辞白帝彩云间，千里江陵一日还。\n两岸猿声啼不住，轻舟已过万重山。",
                 keywords={}, trans="", emotion=None)
    ci = Poem(title="如梦令·常记溪亭日暮", content="常记溪亭日暮，沉醉不知归路。兴尽晚回舟，误入藕花深处。争渡，争渡，"
              "惊起一滩鸥鹭。", keywords={"溪亭": "溪边的亭子。"}, trans="", emotion="愉悦")
    song_lyric = replace(jueju, title="玉楼春·春景", content=jueju.content * 2, source="train-data/宋词/train.json:0")
    free = replace(jueju, title="观沧海", content="东临碣石，以观沧海。")
    builder = QuestionBuilder([jueju, ci, song_lyric, free], writing_examples=True)
    writing = [e for p in builder.poems for e in builder.examples(p, 0) if e.form]
    assert [(e.form, e.question.title) for e in writing] == [("七言绝句", "早发白帝城"), ("如梦令", "常记溪亭日暮")]
    assert writing[0].question.content == "朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。"
    assert builder.examples(jueju, 0) == writing[:1]  # a poem without glosses, translation or emotion still writes
    plain = QuestionBuilder(builder.poems)
    assert all(not e.form for p in plain.poems for e in plain.examples(p, 0))
    assert [e for e in builder.examples(ci, 0) if not e.form] == plain.examples(ci, 0)  # task questions unchanged

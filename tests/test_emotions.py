"""Official-like emotion options: the cut to a short phrase, the valence lexicon, distractors that contrast."""
import random

import pytest

from poetry.data.emotions import (
    MAX_CHARS,
    MIN_CHARS,
    PHRASE_BANK,
    content_chars,
    contrasts,
    draw_distractors,
    option_text,
    shared_pair_rate,
    shares_content,
    valence,
)


@pytest.mark.parametrize("emotion, option", [
    ("思念与孤独", "思念与孤独"),
    ("思乡之情，旅途的孤独与渴望", "思乡之情"),
    ("宁静、孤独、悠闲", "宁静"),
    ("感慨衰老与隐退的无奈，颂扬友人的成就与清白。", "感慨衰老"),
    ("对不幸女子的深切同情与惋惜", "深切同情"),
    ("对春天的惋惜与思念，表达了对美好时光的热爱与追求。", "对春天的惋惜"),
    ("悲", None),
])
def test_option_text_cuts_free_text_to_an_official_like_phrase(emotion, option):
    assert option_text(emotion) == option


def test_generic_characters_and_punctuation_are_not_content():
    assert content_chars("对友人的思念之情、") == set("友人思念")
    assert not shares_content("思乡之情", "对春光的喜爱")  # 之 情 对 的 are generic
    assert shares_content("思乡之情", "乡愁")


@pytest.mark.parametrize("option, kind", [
    ("悲伤", "negative"), ("欢快的重逢", "positive"), ("恬静", "calm"), ("平静", "calm"), ("思乡之情", "negative"),
    ("惆怅与向往", None), ("山水", None),
])
def test_valence(option, kind):
    assert valence(option) == kind


def test_contrast_is_across_valences():
    assert contrasts("悲伤", "喜悦") and contrasts("悲伤", "平静") and contrasts("喜悦", "失落")
    assert not contrasts("悲伤", "失落") and not contrasts("山水", "喜悦") and not contrasts("喜悦", "平静")


def test_the_bank_is_official_shaped_and_every_valence_is_in_it():
    assert all(MIN_CHARS <= len(p) <= MAX_CHARS for p in PHRASE_BANK) and len(set(PHRASE_BANK)) == len(PHRASE_BANK)
    assert {valence(p) for p in PHRASE_BANK} == {"positive", "negative", "calm"}


def test_distractors_contrast_and_share_nothing():
    pool = ["失落", "哀怨", "孤寂", "喜悦", "闲适", "凄凉之感"]
    for seed in range(30):
        picked = draw_distractors("悲伤", pool, random.Random(seed))
        assert len(picked) == 3 and contrasts("悲伤", picked[0])
        options = ["悲伤", *picked]
        assert shared_pair_rate([options]) == (0, 6)
    assert {draw_distractors("悲伤", pool, random.Random(s))[0] for s in range(30)} <= {"喜悦", "闲适", *PHRASE_BANK}


def test_distractors_not_found_give_none():
    every = "".join(sorted({c for p in PHRASE_BANK for c in content_chars(p)}))
    assert draw_distractors(every, [], random.Random(0)) is None


def test_shared_pair_rate_counts_every_pair():
    assert shared_pair_rate([["思乡", "乡愁", "喜悦", "平静"], ["悲伤", "伤感", "感伤", "喜悦"]]) == (4, 12)

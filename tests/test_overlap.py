"""Decontamination: a poem of the exclude set is found through the variants public copies carry, and only then."""
import json

import pytest

from poetry.data.overlap import OverlapIndex, normalised, poem_lines

EVAL = [{"idx": 0, "title": "静夜思", "author": "李白", "content": "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
         "qa_words": ["疑是"], "qa_sents": ["举头望明月"],
         "choose": {"A": "思乡", "B": "豪情", "C": "闲适", "D": "惜春"}}]


@pytest.fixture
def index(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(EVAL, ensure_ascii=False), encoding="utf-8")
    return OverlapIndex.from_paths([path])


def test_normalising_keeps_simplified_cjk_only():
    assert normalised("《靜夜思》 ") == "静夜思"
    # short formulae are left out
    assert poem_lines("床前明月光，\n疑是地上霜。知否，知否？") == ["床前明月光", "疑是地上霜"]


def test_a_variant_with_another_title_is_found_by_a_line_one_character_off(index):
    found = index.find("夜思", "李白", "床前看月光，疑是地下霜。举头望山月，低头思故乡。")
    assert found is not None and found.excluded.title == "静夜思"
    assert str(found).startswith("line 低头思故乡 of 《静夜思》 (")  # the exact line first
    found = index.find("夜思", None, "床前看月光，疑是地下霜。")  # every line one character off
    assert str(found).startswith("line 床前看月光 ~ 床前明月光 of 《静夜思》")


def test_traditional_characters_and_punctuation_do_not_hide_a_poem(index):
    assert str(index.find("x", "", "舉頭望明月，\n")).startswith("line 举头望明月 of 《静夜思》")
    assert str(index.find("x", "", "舉 頭 望 明 月")).startswith("line 举头望明月")


def test_title_and_author_match_without_a_shared_line(index):
    found = index.find("靜夜思", "李白", "另一首全不相同的诗句。")
    assert str(found).startswith("title and author 静夜思 / 李白")
    assert index.find("静夜思", "杜甫", "另一首全不相同的诗句。") is None  # same title, another poet
    assert index.find("静夜思", None, "另一首全不相同的诗句。") is None  # no author: a title alone is too common


@pytest.mark.parametrize("content", [
    "床前白日落，疑是天边霜。",   # two characters off in every line
    "床前明月光光，疑是地上霜霜。",  # a character added is another line, not a variant
    "知否知否，明月。",            # lines shorter than five characters are never compared
])
def test_lines_two_edits_off_or_lengthened_are_not_matched(index, content):
    assert index.find("另题", "某人", content) is None


def test_an_unreadable_exclude_file_names_itself(tmp_path):
    from poetry.data import DataError

    bad = tmp_path / "eval.json"
    bad.write_text('[{"title": "x"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"eval.json:record 0: field 'content': missing field"):
        OverlapIndex.from_paths([bad])

"""Prosody: the 平水韵 table's tones and rhymes, the forms' patterns, and the rule-based checker and its CLI."""
import json
import re

import pytest

from poetry.data import DataError, load_verses
from poetry.prosody.__main__ import main
from poetry.prosody.check import check_poem
from poetry.prosody.forms import FORMS, form_named, infer_form, poem_lines
from poetry.prosody.tables import LEVEL, OBLIQUE, rhyme_table

DENGGUANQUE = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
BAIDI = "朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。"
CHUNWANG = "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"
DENGGAO = ("风急天高猿啸哀，渚清沙白鸟飞回。无边落木萧萧下，不尽长江滚滚来。"
           "万里悲秋常作客，百年多病独登台。艰难苦恨繁霜鬓，潦倒新停浊酒杯。")
CI = {
    "浣溪沙": "一曲新词酒一杯，去年天气旧亭台。夕阳西下几时回？无可奈何花落去，似曾相识燕归来。小园香径独徘徊。",
    "清平乐": "别来春半，触目柔肠断。砌下落梅如雪乱，拂了一身还满。"
              "雁来音信无凭，路遥归梦难成。离恨恰如春草，更行更远还生。",
    "忆江南": "江南好，风景旧曾谙。日出江花红胜火，春来江水绿如蓝。能不忆江南？",
    "长相思": "汴水流，泗水流，流到瓜洲古渡头，吴山点点愁。思悠悠，恨悠悠，恨到归时方始休，月明人倚楼。",
    "如梦令": "昨夜雨疏风骤，浓睡不消残酒。试问卷帘人，却道海棠依旧。知否，知否，应是绿肥红瘦。",
}


@pytest.fixture(scope="module")
def table():
    return rhyme_table()


@pytest.mark.parametrize("char", list("白国独竹德一十石日月出入急七八六绿笛雪骨客屋菊物"))
def test_entering_tone_characters_are_oblique_though_mandarin_reads_many_level(table, char):
    assert table.tones(char) == {OBLIQUE}


def test_simplified_characters_are_read_through_every_traditional_form(table):
    for char in "国头乡时关马阴风来鬓岭":  # absent from the traditional table as written
        assert table.knows(char), char
    assert table.tones("干") == {LEVEL, OBLIQUE}  # 干 and 乾 level, 幹 oblique
    assert {g.short for g in table.groups_of("发")} == {"六月"}  # 發 and 髮


def test_characters_read_both_ways_keep_both_readings_and_the_table_gap_is_filled(table):
    for char in "看思教":
        assert table.tones(char) == {LEVEL, OBLIQUE}, char
    assert "一先" in {g.short for g in table.groups_of("先")}  # the package's 一先 string lacks 先 itself
    assert {g.short for g in table.groups_of("间")} == {"十五删", "十六谏"}


def test_rhyme_groups_are_found_by_any_spelling_of_their_name(table):
    assert table.group("十一尤").name == "下平声十一尤"
    assert table.group("下平聲十一尤") == table.group("十一尤")
    assert table.group("一东").ci_sections == {1}
    with pytest.raises(ValueError, match="not a 平水韵 group.*十一尤"):
        table.group("十一犹")


def test_the_bundled_poems_characters_are_classified(table):
    chars = [c for verse in load_verses("data/sample/train-data") for c in verse.content if "\u4e00" <= c <= "\u9fff"]
    known = sum(table.knows(c) for c in chars)
    assert known / len(chars) >= 0.99


def test_regulated_patterns_are_the_four_basic_lines_joined_by_dui_and_nian():
    five = {p.label: [line.tones for line in p.lines] for p in form_named("五言绝句").patterns}
    assert five["仄起首句不入韵"] == ["仄仄平平仄", "平平仄仄平", "平平平仄仄", "仄仄仄平平"]
    assert five["平起首句入韵"] == ["平平仄仄平", "仄仄仄平平", "仄仄平平仄", "平平仄仄平"]
    seven = {p.label: [line.tones for line in p.lines] for p in form_named("七绝").patterns}
    assert seven["仄起首句入韵"] == ["仄仄平平仄仄平", "平平仄仄仄平平", "平平仄仄平平仄", "仄仄平平仄仄平"]
    for form in (f for f in FORMS if f.regulated):
        for pattern in form.patterns:
            tones = [line.tones for line in pattern.lines]
            for index in range(1, len(tones)):
                same = tones[index][1] == tones[index - 1][1]
                assert same == (index % 2 == 0), (form.name, pattern.label, index)  # 对 in a couplet, 粘 across
            assert all(line[-1] == LEVEL for line in tones[1::2])
            assert [line.rhyme for line in pattern.lines][1::2] == ["a"] * (len(tones) // 2)
    assert [line.tones for line in form_named("五律").patterns[0].lines][4:] == five["平起首句不入韵"]


@pytest.mark.parametrize("form, poem, pattern, rhymes", [
    ("五言绝句", DENGGUANQUE, "仄起首句不入韵", ("十一尤",)),
    ("七言绝句", BAIDI, "平起首句入韵", ("十五删",)),  # 间 is also oblique: the rhymed reading wins the tie
    ("五言律诗", CHUNWANG, "仄起首句不入韵", ("十二侵",)),
    ("七言律诗", DENGGAO, "仄起首句入韵", ("十灰",)),
    ("浣溪沙", CI["浣溪沙"], "正体", ("第3部",)),
    ("清平乐", CI["清平乐"], "正体", ("第7部", "第11部")),  # oblique rhymes, then level ones (凭 蒸, 成 庚)
    ("忆江南", CI["忆江南"], "正体", ("第14部",)),
    ("长相思", CI["长相思"], "正体", ("第12部",)),
    ("如梦令", CI["如梦令"], "正体", ("第12部",)),  # 骤 酒 旧 否 瘦: 上 and 去 rhyme together in a 词
])
def test_regular_classics_pass_every_rule(form, poem, pattern, rhymes):
    result = check_poem(poem, form_named(form))
    assert result.ok, [str(v) for v in result.violations]
    assert (result.pattern, result.rhymes) == (pattern, rhymes)
    assert result.tones_right == result.tones_checked > 0 and result.tone_share == 1.0


def test_a_wrong_rhyme_and_tone_are_named_by_line_position_and_expectation():
    result = check_poem(BAIDI.replace("还", "去"), form_named("七言绝句"))
    assert not result.ok and not result.rhyme_ok and result.lines_ok
    assert [str(v) for v in result.violations] == ["line 2 char 7 去: tone, expected 平",
                                                   "line 2 char 7 去: rhyme, expected 十五删"]
    assert result.tones_right == result.tones_checked - 1


def test_the_first_line_may_borrow_a_neighbouring_rhyme_group_no_other_line_may():
    xilin = "横看成岭侧成峰，远近高低各不同。不识庐山真面目，只缘身在此山中。"  # 峰 is 二冬 in a poem of 一东
    assert check_poem(xilin, form_named("七言绝句")).rhyme_ok
    moved = "横看成岭侧成东，远近高低各不峰。不识庐山真面目，只缘身在此山中。"
    faults = [str(v) for v in check_poem(moved, form_named("七言绝句")).violations if v.kind == "rhyme"]
    assert faults == ["line 2 char 7 峰: rhyme, expected 一东"]


def test_the_customary_allowance_frees_the_odd_positions_but_not_from_gu_ping_or_san_ping_wei():
    lone_level = DENGGUANQUE.replace("黄河", "大河")  # 仄平仄仄平: 河 is the only level character before 流
    loose = check_poem(lone_level, form_named("五言绝句"))
    assert [(v.kind, v.line, v.position, v.char) for v in loose.violations] == [("孤平", 2, 2, "河")]
    strict = check_poem(lone_level, form_named("五言绝句"), loose=False)
    assert {v.kind for v in strict.violations} == {"tone", "孤平"}
    three_level = DENGGUANQUE.replace("入海", "归江")
    assert "三平尾" in {v.kind for v in check_poem(three_level, form_named("五言绝句")).violations}
    regular_tail = check_poem("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", form_named("五绝"))
    assert regular_tail.ok  # 仄仄仄平平 is no 孤平: its level characters stand together


def test_a_character_read_both_ways_satisfies_either_tone_and_unknown_characters_are_listed_not_judged():
    level, oblique = "依山", "千里"  # 山 must be level, 里 oblique
    original = check_poem(DENGGUANQUE, form_named("五言绝句"), loose=False)
    both = check_poem(DENGGUANQUE.replace(level, "依看").replace(oblique, "千看"), form_named("五言绝句"), loose=False)
    assert both.violations == original.violations and both.tones_right == original.tones_right == 19
    unknown = check_poem(DENGGUANQUE.replace(level, "依这"), form_named("五言绝句"))
    assert unknown.unknown == ("这",) and unknown.ok and unknown.tones_checked == 11


def test_regulated_verse_rhyming_twice_on_one_character_is_a_fault_a_ci_may():
    twice = check_poem(DENGGUANQUE.replace("一层楼", "一层流"), form_named("五言绝句"))
    assert twice.rhyme_ok and not twice.ok  # 流 still rhymes: the fault is its second use
    assert twice.summary().startswith("1 violation; lines right; rhyme 十一尤 right")
    assert [str(v) for v in twice.violations] == [
        "line 4 char 5 流: 重韵, expected a rhyme character not used before (line 2 rhymes on it)"]
    assert check_poem(CI["如梦令"], form_named("如梦令")).ok  # 知否，知否 rhymes twice on 否


def test_line_count_length_and_repeated_line_faults():
    short = check_poem(DENGGUANQUE[:12], form_named("五言绝句"))
    assert not short.lines_ok and [str(v) for v in short.violations] == ["the poem: lines, expected 4 lines, got 2"]
    long_line = check_poem(DENGGUANQUE.replace("欲穷千里目", "欲穷千里之目"), form_named("五言绝句"))
    assert not long_line.lines_ok
    assert [str(v) for v in long_line.violations] == ["line 3: length, expected 5 characters, got 6"]
    unrepeated = check_poem(CI["如梦令"].replace("知否，知否", "知否，谁否"), form_named("如梦令"))
    assert "line 6: repeat, expected line 5 again (叠句)" in [str(v) for v in unrepeated.violations]


def test_forms_are_inferred_from_a_ci_title_or_a_poems_shape():
    assert infer_form("如梦令·常记溪亭日暮", poem_lines(CI["如梦令"])).name == "如梦令"
    assert infer_form("望江南·梳洗罢", []).name == "忆江南"
    assert infer_form("登高", poem_lines(DENGGAO)).name == "七言律诗"
    assert infer_form("玉楼春·春景", poem_lines(DENGGAO), lyric=True) is None  # a 词 shaped like a 七律
    assert infer_form("观沧海", ["东临碣石", "以观沧海"]) is None
    with pytest.raises(ValueError, match="unknown form '八言绝句'.*七言绝句"):
        form_named("八言绝句")


def _write(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_check_cli_reports_each_poem_a_table_per_form_and_json(tmp_path, capsys):
    poems = _write(tmp_path / "poems.json", [
        {"title": "早发白帝城", "content": BAIDI},
        {"title": "改", "content": BAIDI.replace("还", "去")},
        {"title": "浣溪沙·一曲新词酒一杯", "content": CI["浣溪沙"]},
        {"title": "观沧海", "content": "东临碣石，以观沧海。"},
        {"title": "登鹳雀楼", "content": DENGGUANQUE, "form": "五言绝句"},
    ])
    assert main(["check", str(poems), "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "poems.json:1 《改》 七言绝句 平起首句入韵: 2 violations" in out
    assert "line 2 char 7 去: rhyme, expected 十五删" in out
    assert "《观沧海》: no known form (line lengths 4,4), not checked" in out
    assert "1 of 5 poems are of no known form" in out
    rows = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert [(r["form"], r.get("ok")) for r in rows] == [
        ("七言绝句", True), ("七言绝句", False), ("浣溪沙", True), (None, None), ("五言绝句", True)]
    assert rows[1]["violations"] == ["line 2 char 7 去: tone, expected 平", "line 2 char 7 去: rhyme, expected 十五删"]


def test_check_cli_form_override_and_bad_input_are_clear_errors(tmp_path, capsys):
    poems = _write(tmp_path / "poems.json", [{"title": "登鹳雀楼", "content": DENGGUANQUE}])
    assert main(["check", str(poems), "--form", "五律", "--quiet"]) == 0
    assert "the poem: lines" not in capsys.readouterr().out  # --quiet: the table only
    bad_form = _write(tmp_path / "bad_form.json", [{"content": DENGGUANQUE, "form": "八言"}])
    assert main(["check", str(bad_form)]) == 2
    assert f"error: {bad_form}:0: field 'form': unknown form '八言'" in capsys.readouterr().err
    no_content = _write(tmp_path / "no_content.json", [{"title": "空"}])
    assert main(["check", str(no_content)]) == 2
    assert f"error: {no_content}:record 0: field 'content': missing field" in capsys.readouterr().err
    with pytest.raises(DataError, match="no such file"):
        load_verses(tmp_path / "absent.json")


def test_coverage_cli_counts_classified_characters(tmp_path, capsys):
    poems = _write(tmp_path / "poems.json", [{"content": DENGGUANQUE}, {"content": "这是什么"}])
    assert main(["coverage", str(poems)]) == 0
    assert "23 of 24 characters classified (95.83%); not in the table: 这×1" in capsys.readouterr().out


def test_writing_scores_count_form_rhyme_tones_diversity_and_copying():
    from poetry.prosody.score import score_writing

    broken = BAIDI.replace("还", "去")  # a tone and a rhyme wrong
    short = "朝辞白帝彩云间，千里江陵一日还。"  # two lines: not the form
    jueju = form_named("七言绝句")
    scores = score_writing([(jueju, BAIDI), (jueju, broken), (jueju, short)], corpus=[DENGGUANQUE, "两岸猿声啼不住。"])
    assert (scores.poems, scores.form, scores.rhyme, scores.regular) == (3, 2 / 3, 1 / 3, 1 / 3)
    assert scores.tone == 31 / 32  # of the two poems of the right form, 16 positions each
    lines = poem_lines(BAIDI) + poem_lines(broken) + poem_lines(short)
    unigrams = [c for line in lines for c in line]
    assert scores.distinct_1 == len(set(unigrams)) / len(unigrams)
    bigrams = [line[i:i + 2] for line in lines for i in range(len(line) - 1)]
    assert scores.distinct_2 == len(set(bigrams)) / len(bigrams)
    assert scores.copied_lines == 2 / 10 and scores.poems_with_copied_line == 2 / 3
    assert (scores.longest_copy, scores.mean_longest_copy) == (7, (7 + 7 + 2) / 3)  # 千里 of 欲穷千里目 in the third
    assert score_writing([(jueju, BAIDI)]).longest_copy is None


def test_score_cli_reads_infer_write_output_and_checker_records_side_by_side(tmp_path, capsys):
    written = _write(tmp_path / "written.json", [
        {"form": "七言绝句", "title": "a", "poems": [{"text": BAIDI}, {"text": BAIDI.replace("还", "去")}]}])
    plain = _write(tmp_path / "plain.json", [{"title": "登鹳雀楼", "content": DENGGUANQUE}])
    corpus = _write(tmp_path / "corpus.json", [{"title": "x", "content": DENGGUANQUE}])
    assert main(["score", str(written), str(plain), "--label", "best", "--label", "plain",
                 "--corpus", str(corpus)]) == 0
    out = capsys.readouterr().out
    assert "copying against 1 corpus" in out and "best" in out and "plain" in out
    assert re.search(r"lines copied whole\s+│\s+0\.000\s+│\s+1\.000", out)
    assert main(["score", str(written), "--all-candidates"]) == 0
    assert re.search(r"every rule\s+│\s+0\.500", capsys.readouterr().out)
    bad = _write(tmp_path / "bad.json", [{"form": "七言绝句", "poems": ["not an object"]}])
    assert main(["score", str(bad)]) == 2
    assert f"error: {bad}:record 0: field 'poems': expected a list of {{text: the poem}}" in capsys.readouterr().err
    shapeless = _write(tmp_path / "shapeless.json", [{"content": "东临碣石，以观沧海。"}])
    assert main(["score", str(shapeless)]) == 2
    assert "1 poems of no known form" in capsys.readouterr().err


def test_for_writing_the_allowance_keeps_the_positions_that_would_make_gu_ping_or_san_ping_wei():
    five = {p.label: p for p in form_named("五言绝句").patterns}["仄起首句不入韵"]  # 仄仄平平仄 平平仄仄平 ...
    assert [five.required(1, 0, True), five.writing_tone(1, 0, True)] == ["中", "平"]  # 仄平仄仄平 is 孤平
    assert [five.required(3, 2, True), five.writing_tone(3, 2, True)] == ["中", "仄"]  # 仄仄平平平 is 三平尾
    assert five.writing_tone(0, 0, True) == five.writing_tone(2, 2, True) == "中"  # lines ending 仄 keep the allowance
    seven = {p.label: p for p in form_named("七绝").patterns}["仄起首句入韵"]  # 仄仄平平仄仄平 first
    assert seven.writing_tone(0, 2, True) == "平" and seven.writing_tone(0, 4, True) == "中"

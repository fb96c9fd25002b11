"""`python -m poetry.data import`: each corpus from fixtures shaped like its published files (LAYOUTS.md), with
decontamination on by default; `card` on what was imported."""
import json
from pathlib import Path

import pytest

from poetry.config import DataConfig, DataSource
from poetry.data import DataError, QuestionBuilder, load_poems
from poetry.data.__main__ import main
from poetry.data.imports import FORMATS, gushiwen_glosses, import_corpus
from poetry.data.mix import load_training_poems
from poetry.data.overlap import OverlapIndex

FIXTURES = Path(__file__).parent / "fixtures" / "imports"
EXCLUDE = FIXTURES / "exclude_eval.json"

# format -> (read, kept, contaminated, malformed) on its fixture
COUNTS = {"gushiwen": (7, 4, 2, 1), "ccpm": (7, 3, 1, 3), "chinese-poetry": (8, 6, 1, 1),
          "classical-modern": (7, 4, 2, 1)}


def imported(tmp_path, fmt: str, exclude=True):
    index = OverlapIndex.from_paths([EXCLUDE]) if exclude else None
    return import_corpus(FORMATS[fmt], [FIXTURES / fmt], tmp_path / fmt, index)


@pytest.mark.parametrize("fmt", sorted(COUNTS))
def test_each_format_imports_and_never_writes_an_excluded_poem(tmp_path, fmt):
    report = imported(tmp_path, fmt)
    malformed = sum(report.malformed.values())
    assert (report.read, report.kept, report.contaminated, malformed) == COUNTS[fmt]
    poems = load_poems(tmp_path / fmt).records  # the official layout, read by the training loader
    assert len(poems) == report.kept
    index = OverlapIndex.from_paths([EXCLUDE])
    assert not [p.title for p in poems if index.find(p.title, p.author, p.content)]
    assert not [p for p in poems if "看月光" in p.content or "疑是地上霜" in p.content]
    dropped = [json.loads(line) for line in (tmp_path / fmt / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == report.read - report.kept
    assert all(item["where"].startswith(str(FIXTURES / fmt)) and item["why"] for item in dropped)
    declared = json.loads((tmp_path / fmt / "import.json").read_text(encoding="utf-8"))
    assert declared["licence"] == FORMATS[fmt].licence and declared["counts"]["kept"] == report.kept
    assert QuestionBuilder(poems, writing_examples=True).epoch(0)  # partial records still give questions


@pytest.mark.parametrize("fmt", sorted(COUNTS))
def test_without_decontamination_the_training_time_check_stops_each_format(tmp_path, fmt):
    report = imported(tmp_path, fmt, exclude=False)
    assert report.contaminated == 0 and report.kept == COUNTS[fmt][1] + COUNTS[fmt][2]
    cfg = DataConfig(train=[DataSource("data/sample/train-data/唐诗/七言绝句"), DataSource(str(tmp_path / fmt))],
                     exclude=[str(EXCLUDE)])
    with pytest.raises(DataError) as err:
        load_training_poems(cfg, seed=0)
    assert len(err.value.issues) == COUNTS[fmt][2] + 1
    assert all(f"{fmt}/train.json:record " in str(issue) and "is an excluded poem" in str(issue)
               for issue in err.value.issues[:-1])


def test_gushiwen_gives_translation_glosses_and_optionally_emotion(tmp_path):
    import_corpus(FORMATS["gushiwen"], [FIXTURES / "gushiwen"], tmp_path / "g", None, emotion_from_tags=True)
    poems = {p.title: p for p in load_poems(tmp_path / "g").records}
    deer = poems["鹿柴"]
    assert deer.author == "王维" and deer.content == "空山不见人，但闻人语响。\n返景入深林，复照青苔上。"
    assert deer.trans.count("\n") == 1 and deer.keywords["返景"] == "夕阳返照的光。景，同“影”。"
    assert poems["夜思"].emotion == "思乡" and poems["鹿柴"].emotion is None  # 写景/山水 name no mood
    assert "鹿柴" not in {p.title for p in load_poems(tmp_path / "g").records if p.emotion}


def test_gushiwen_gloss_styles():
    assert gushiwen_glosses(["⑴鹿柴（zhài）：地名。柴，同“寨”。", "⑵闻：听到。啼鸟：鸟儿啼叫。", "1、但：只。",
                             "⑷ 转蓬：飞转的蓬草。", "西岭：岷山。", "没有冒号的一句话。", "鹿柴：另一说。"]) == {
        "鹿柴": "地名。柴，同“寨”。", "闻": "听到。", "啼鸟": "鸟儿啼叫。", "但": "只。", "转蓬": "飞转的蓬草。",
        "西岭": "岷山。"}


def test_chinese_poetry_is_simplified_and_says_so(tmp_path):
    imported(tmp_path, "chinese-poetry")
    titles = {p.title: p for p in load_poems(tmp_path / "chinese-poetry").records}
    assert "辋川集 鹿柴" in titles and "空山不见人" in titles["辋川集 鹿柴"].content
    assert titles["水调歌头"].author == "苏轼"  # a 词 is titled by its 词牌 (rhythmic)
    declared = json.loads((tmp_path / "chinese-poetry" / "import.json").read_text(encoding="utf-8"))
    assert declared["converted"] == "traditional characters to simplified (OpenCC t2s)"


def test_a_repeated_record_is_kept_once(tmp_path):
    source = tmp_path / "src" / "全唐诗"
    source.mkdir(parents=True)
    poem = {"author": "王維", "paragraphs": ["空山不見人，但聞人語響。"], "title": "鹿柴", "id": "x"}
    (source / "poet.tang.0.json").write_text(json.dumps([poem], ensure_ascii=False), encoding="utf-8")
    (source / "唐诗三百首.json").write_text(json.dumps([poem], ensure_ascii=False), encoding="utf-8")
    report = import_corpus(FORMATS["chinese-poetry"], [tmp_path / "src"], tmp_path / "out", None)
    assert (report.read, report.kept, report.duplicates) == (2, 1, 1)


def test_cli_needs_an_exclude_set_or_an_explicit_opt_out(tmp_path, capsys):
    args = ["import", "--format", "ccpm", str(FIXTURES / "ccpm"), "--out", str(tmp_path)]
    assert main(args) == 2
    assert "decontamination is on by default" in capsys.readouterr().err
    assert main(args + ["--exclude", str(EXCLUDE), "--name", "lines"]) == 0
    out = capsys.readouterr().out
    assert "ccpm: read 7, kept 3, dropped 1 as contaminated, 3 as malformed" in " ".join(out.split())
    assert (tmp_path / "lines" / "train.json").is_file()
    assert main(args + ["--no-exclude"]) == 0 and len(load_poems(tmp_path / "ccpm").records) == 4


def test_cli_refuses_emotion_from_tags_where_there_are_no_tags(tmp_path, capsys):
    assert main(["import", "--format", "ccpm", str(FIXTURES / "ccpm"), "--out", str(tmp_path), "--no-exclude",
                 "--emotion-from-tags"]) == 2
    assert "ccpm records have none" in capsys.readouterr().err and not (tmp_path / "ccpm").exists()


def test_a_missing_or_wrong_source_is_named_before_anything_is_written(tmp_path, capsys):
    assert main(["import", "--format", "ccpm", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"),
                 "--no-exclude"]) == 2
    assert "nowhere: no such file or directory" in capsys.readouterr().err
    assert main(["import", "--format", "gushiwen", str(FIXTURES / "ccpm"), "--out", str(tmp_path / "out"),
                 "--no-exclude"]) == 2
    assert "ccpm: no poetry_*.json below this directory (is it a gushiwen corpus?)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_names_a_missing_exclude_file(tmp_path, capsys):
    assert main(["import", "--format", "ccpm", str(FIXTURES / "ccpm"), "--out", str(tmp_path),
                 "--exclude", str(tmp_path / "eval.json")]) == 2
    assert "eval.json: no such file" in capsys.readouterr().err


def test_card_gives_licence_moods_and_overlap_per_source(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per row
    import_corpus(FORMATS["gushiwen"], [FIXTURES / "gushiwen"], tmp_path / "gushiwen", None, emotion_from_tags=True)
    assert main(["card", str(tmp_path / "gushiwen"), "data/sample/train-data", "--exclude", str(EXCLUDE)]) == 0
    out = capsys.readouterr().out
    rows = {cells[1].strip(): [c.strip() for c in cells[2:-1]] for line in out.splitlines()
            if len(cells := line.split("│")) > 3}
    assert rows["records (poems)"] == ["6", "59"]
    assert rows["poems found in the exclude set"] == ["2 (33%)", "2 (3%)"]  # 春晓, 夜思; the originals
    assert rows["emotion negative"][0] == "1 (17%)" and rows["emotion no emotion"][0] == "5 (83%)"
    assert rows["licence (as declared in the import)"][0].startswith("GPL-3.0")
    assert rows["licence (as declared in the import)"][1].startswith("not declared")
    assert "exclude set: 2 poems from" in out

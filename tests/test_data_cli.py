"""`python -m poetry.data`: stats and export-val."""
import json
import re

from poetry.data import check_submission, load_answers, load_poems, load_questions, split_poems
from poetry.data.__main__ import main

from conftest import ROOT, SAMPLE


def test_stats_prints_counts(capsys):
    assert main(["stats", str(SAMPLE / "train-data")]) == 0
    out = capsys.readouterr().out
    assert "poems aligned by sentence marks" in out and "loaded 59 poems" in out


def test_stats_print_the_shared_character_rate_of_the_options_against_the_official_one(tmp_path, capsys):
    alike = [{"title": f"t{i}", "content": "甲句，乙句。", "keywords": {}, "trans": "译文。", "emotion": emotion}
             for i, emotion in enumerate(["思乡", "思念", "乡愁", "喜悦", "平静", "愤慨"])]
    path = tmp_path / "poems.json"
    path.write_text(json.dumps(alike, ensure_ascii=False), encoding="utf-8")
    assert main(["stats", str(path)]) == 0
    out = capsys.readouterr().out
    rate = re.search(r"sharing a content character \(official eval: 3\.2%\)\s*│\s*(\d+) \((\d+\.\d)%\)", out)
    assert rate and rate.groups() == ("0", "0.0")  # 思乡, 思念 and 乡愁 never meet in one question
    assert "distractors from the phrase bank" in out


def test_stats_bad_file_is_an_error_line(tmp_path, capsys):
    bad = tmp_path / "train.json"
    bad.write_text("[1]", encoding="utf-8")
    assert main(["stats", str(bad)]) == 2
    assert capsys.readouterr().err == f"error: {bad}:record 0: expected an object, got an integer\n"


def test_stats_many_problems_stay_on_one_line(tmp_path, capsys):
    bad = tmp_path / "train.json"
    bad.write_text("[{}]", encoding="utf-8")
    assert main(["stats", str(bad)]) == 2
    assert capsys.readouterr().err == f"error: {bad}:record 0: field 'title': missing field (and 4 more problems)\n"


def test_export_val_writes_held_out_questions_with_gold(tmp_path, capsys):
    assert main(["export-val", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(tmp_path),
                 "data.val_fraction=0.3"]) == 0
    questions = load_questions(tmp_path / "questions.json").records
    gold = load_answers(tmp_path / "gold.json")
    check_submission(questions, gold, "gold.json")
    _, val = split_poems(load_poems(SAMPLE / "train-data").records, 0.3, 0)
    assert questions and {q.content for q in questions} <= {p.content for p in val}
    assert all(q.choose[g.choose_id] for q, g in zip(questions, gold, strict=True))


def test_export_val_config_errors_are_one_line(tmp_path, capsys):
    assert main(["export-val", "--config", str(tmp_path / "absent.yaml"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: config file {tmp_path / 'absent.yaml'} does not exist\n"
    assert main(["export-val", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(tmp_path),
                 "data.train=/no/such/poems"]) == 2
    assert capsys.readouterr().err.startswith("error: /no/such/poems")

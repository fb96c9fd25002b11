"""Loaders and validation: every problem names file, record and field; nothing valid is dropped silently."""
import json

import pytest

from poetry.data import DataError, load_answers, load_poems, load_questions, parse_questions
from poetry.data.io import check_submission

POEM = {"title": "静夜思", "content": "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
        "keywords": {"疑": "好像。"}, "trans": "床前洒满月光，好像地上结了霜。抬头望月，低头思念故乡。",
        "emotion": "思乡"}
QUESTION = {"idx": 7, "title": "静夜思", "author": "李白", "content": POEM["content"], "qa_words": ["疑", "举头"],
            "qa_sents": ["床前明月光，疑是地上霜。"], "choose": {"A": "思乡", "B": "欢喜", "C": "愤怒", "D": "闲适"}}
ANSWER = {"idx": 7, "ans_qa_words": {"疑": "好像。", "举头": "抬头。"},
          "ans_qa_sents": {"床前明月光，疑是地上霜。": "床前洒满月光，好像地上结了霜。"}, "choose_id": "A"}


def write(path, records, crlf=False, bom=False):
    text = json.dumps(records, ensure_ascii=False, indent=2)
    if crlf:
        text = text.replace("\n", "\r\n")
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))
    return path


def error_of(loader, path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        loader(path, **kwargs)
    return str(info.value)


def test_tree_with_chinese_folders_crlf_and_bom(tmp_path):
    tree = tmp_path / "train-data"
    (tree / "唐诗" / "五言绝句").mkdir(parents=True)
    (tree / "宋词" / "南宋词").mkdir(parents=True)
    write(tree / "唐诗" / "五言绝句" / "train.json", [POEM], crlf=True, bom=True)
    ci = dict(POEM, title="词", content="上阕。\r\n　下阕。", emotion=None, keywords={})
    write(tree / "宋词" / "南宋词" / "train.json", [ci, POEM])
    poems = load_poems(tree).records
    assert len(poems) == 3
    assert [p.source for p in poems] == ["train-data/唐诗/五言绝句/train.json:0", "train-data/宋词/南宋词/train.json:0",
                                         "train-data/宋词/南宋词/train.json:1"]
    assert poems[1].content == "上阕。\n　下阕。" and poems[1].emotion is None and poems[1].keywords == {}


def test_jsonl_and_json_list(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in [POEM, POEM]) + "\n")
    assert len(load_poems(tmp_path / "p.jsonl").records) == 2
    assert len(load_poems(write(tmp_path / "p.json", [POEM])).records) == 1


@pytest.mark.parametrize("change, expected", [
    ({"title": None}, "record 0: field 'title': null where text is required"),
    ({"trans": 3}, "record 0: field 'trans': expected a string, got an integer"),
    ({"content": "  "}, "record 0: field 'content': empty text"),
    ({"keywords": ["疑"]}, "record 0: field 'keywords': expected an object of text values, got a list"),
    ({"keywords": {"疑": None}}, "record 0: field 'keywords': value of '疑' is null, expected text"),
])
def test_poem_field_errors(tmp_path, change, expected):
    path = write(tmp_path / "train.json", [dict(POEM, **change)])
    assert error_of(load_poems, path) == f"{path}:{expected}"


def test_missing_field_and_non_object(tmp_path):
    missing = {k: v for k, v in POEM.items() if k != "emotion"}
    path = write(tmp_path / "train.json", [POEM, missing, "text"])
    message = error_of(load_poems, path)
    assert message == f"{path}:record 1: field 'emotion': missing field"


def test_skip_policy_counts_reasons_and_keeps_valid(tmp_path):
    path = write(tmp_path / "train.json", [POEM, dict(POEM, title=None), "text", dict(POEM, trans=None), POEM])
    loaded = load_poems(path, on_invalid="skip")
    assert len(loaded.records) == 2 and loaded.skipped_records == 3
    summary = loaded.summary("poems")
    assert "loaded 2 poems, skipped 3 invalid" in summary
    assert "field 'title': null where text is required" in summary and "expected an object, got a string" in summary


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"title": "a",\n   "content": }\n]', encoding="utf-8")
    assert error_of(load_poems, path).startswith(f"{path}: invalid JSON at line 3, column 15:")


def test_invalid_jsonl_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(POEM) + "\n{broken\n", encoding="utf-8")
    assert error_of(load_poems, path).startswith(f"{path}:line 2: invalid JSON at column 2")


def test_wrong_encoding(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(json.dumps([POEM], ensure_ascii=False).encode("gbk"))
    assert "not UTF-8 text" in error_of(load_poems, path) and "line 1" in error_of(load_poems, path)


def test_top_level_must_be_list_and_dir_must_have_files(tmp_path):
    assert "expected a JSON list of records, got an object" in error_of(load_poems, write(tmp_path / "x.json", POEM))
    (tmp_path / "empty").mkdir()
    assert "no train.json below this directory" in error_of(load_poems, tmp_path / "empty")
    assert "no such file" in error_of(load_poems, tmp_path / "absent.json")


@pytest.mark.parametrize("change, expected", [
    ({"qa_words": []}, "field 'qa_words': empty list"),
    ({"qa_words": ["疑", "疑"]}, "field 'qa_words': duplicate item '疑'"),
    ({"qa_sents": ["", "a"]}, "field 'qa_sents': item 0 is empty, expected non-empty text"),
    ({"choose": {"A": "x", "B": "y", "C": "z"}}, "field 'choose': expected exactly the options A, B, C, D"),
    ({"choose": {"A": "x", "B": "y", "C": "z", "E": "w"}}, "field 'choose': expected exactly the options"),
    ({"idx": "7"}, "field 'idx': expected an integer, got a string"),
    ({"idx": True}, "field 'idx': expected an integer, got a boolean"),
])
def test_question_errors(tmp_path, change, expected):
    path = write(tmp_path / "eval.json", [dict(QUESTION, **change)])
    assert error_of(load_questions, path).startswith(f"{path}:record 0: {expected}")


def test_parsed_questions_validate_as_a_file_does(tmp_path):
    """The server's path: JSON already parsed, one object or a list, the same checks and the same messages."""
    path = write(tmp_path / "eval.json", [QUESTION])
    loaded = load_questions(path).records
    assert parse_questions(QUESTION, "request") == parse_questions([QUESTION], "request") == loaded
    with pytest.raises(DataError, match=r"^request:record 1: field 'idx': duplicate idx 7"):
        parse_questions([QUESTION, QUESTION], "request")
    with pytest.raises(DataError, match=r"^request:record 0: field 'content': missing field"):
        parse_questions({k: v for k, v in QUESTION.items() if k != "content"}, "request")
    for data, expected in ((3, "got an integer"), ([], "empty list"), (None, "got null")):
        with pytest.raises(DataError, match=f"^request: .*{expected}"):
            parse_questions(data, "request")


def test_duplicate_idx(tmp_path):
    path = write(tmp_path / "eval.json", [QUESTION, QUESTION])
    assert "record 1: field 'idx': duplicate idx 7 (first at record 0)" in error_of(load_questions, path)


@pytest.mark.parametrize("change, expected", [
    ({"choose_id": -1}, "field 'choose_id': expected one of the strings A, B, C, D, got -1"),
    ({"choose_id": "E"}, "field 'choose_id': expected one of the strings A, B, C, D, got \"E\""),
    ({"ans_qa_words": {}}, "field 'ans_qa_words': empty object"),
    ({"ans_qa_words": {"疑": ""}}, "field 'ans_qa_words': value of '疑' is empty"),
])
def test_answer_errors(tmp_path, change, expected):
    path = write(tmp_path / "sub.json", [dict(ANSWER, **change)])
    assert error_of(load_answers, path).startswith(f"{path}:record 0: {expected}")


def test_check_submission_is_positional(tmp_path):
    questions = load_questions(write(tmp_path / "eval.json", [QUESTION])).records
    answers = load_answers(write(tmp_path / "sub.json", [ANSWER]))
    check_submission(questions, answers, "sub.json")
    swapped = dict(ANSWER, ans_qa_words={"举头": "抬头。", "疑": "好像。"})
    with pytest.raises(DataError, match="same order required"):
        check_submission(questions, load_answers(write(tmp_path / "s2.json", [swapped])), "s2.json")
    with pytest.raises(DataError, match="0 answers for 1 questions"):
        check_submission(questions, [], "s3.json")


def test_shared_tree_loads_completely(shared_train):
    loaded = load_poems(shared_train)
    assert len(loaded.records) == 164 and not loaded.skipped
    assert sum(1 for p in loaded.records if p.emotion is None) == 1
    assert sum(1 for p in loaded.records if not p.keywords) == 2
    assert sum(len(p.keywords) for p in loaded.records) == 1304

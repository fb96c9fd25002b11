"""evaluate.py in-process: a report for good files, one `error:` line and exit code 2 for each bad one."""
import importlib.util
import json

import pytest
import torch
from test_metrics import build_tiny_bert

from conftest import ROOT

# Loaded by path: the repo root is not on sys.path, and "evaluate" is also the name of a Hugging Face package
_spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)

GOLD = [
    {"idx": 3, "ans_qa_words": {"疑": "好像。", "举头": "抬头。"},
     "ans_qa_sents": {"床前明月光，疑是地上霜。": "床前洒满月光，好像地上结了霜。"}, "choose_id": "A"},
    {"idx": 5, "ans_qa_words": {"明月": "明亮的月亮。"},
     "ans_qa_sents": {"低头思故乡。": "低头思念故乡。", "举头望明月，": "抬头望着明月，"}, "choose_id": "B"},
]


def write(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def with_change(position, **change):
    return [dict(item, **change) if i == position else item for i, item in enumerate(GOLD)]


@pytest.fixture
def gold(tmp_path):
    return write(tmp_path / "gold.json", GOLD)


def run(capsys, *argv):
    code = evaluate.main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_good_files_write_a_report(tmp_path, gold, capsys):
    pred = write(tmp_path / "pred.json", with_change(1, choose_id="C"))
    code, out = run(capsys, "--pred", pred, "--gold", gold, "--report", tmp_path / "out" / "report.json")
    assert code == 0 and out.err == ""
    assert "BERTScore is off (no --bertscore-model given)" in out.out and "proxy_total" in out.out
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert {"total", "proxy_total", "acc", "bleu_words", "bleu_sents", "bertscore_words", "bertscore_sents",
            "bleu_words_reweighed", "bleu_sents_reweighed", "incomplete", "bertscore_off", "counts",
            "items"} <= set(report)
    assert report["acc"] == 0.5 and report["total"] is None and report["incomplete"] is True
    assert report["counts"] == {"items": 2, "words": 3, "sents": 3}
    assert [item["idx"] for item in report["items"]] == [3, 5]
    assert [item["correct"] for item in report["items"]] == [True, False]
    first_word = report["items"][0]["words"][0]
    assert first_word["key"] == "疑" and first_word["bleu"] == pytest.approx(0.1 ** 0.25)  # identical, 3 chars
    assert first_word["bleu_reweighed"] == pytest.approx(1.0) and first_word["bertscore"] is None
    assert first_word["rouge"] == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert {f"{kind}_{part}" for kind in ("rouge1", "rouge2", "rougeL") for part in ("words", "sents")} <= set(report)
    assert "rougeL_sents (F, characters)" in out.out


def test_bertscore_model_gives_a_complete_total(tmp_path, gold, capsys):
    model = build_tiny_bert(tmp_path / "bert")
    code, out = run(capsys, "--pred", gold, "--gold", gold, "--bertscore-model", model, "--bertscore-layer", 2,
                    "--report", tmp_path / "report.json")
    assert code == 0 and "BERTScore is off" not in out.out
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["incomplete"] is False and report["bertscore_words"] == pytest.approx(1.0, abs=1e-5)
    assert report["total"] == pytest.approx(0.5 + 0.5 * (report["bleu_words"] + report["bleu_sents"] + 2) / 4,
                                            abs=1e-5)


@pytest.mark.parametrize("flag, cuda, expected", [
    ([], True, "cuda"), ([], False, "cpu"), (["--device", "cpu"], True, "cpu"), (["--device", "cuda"], False, "cuda"),
])
def test_bertscore_runs_on_the_gpu_when_there_is_one(tmp_path, gold, capsys, monkeypatch, flag, cuda, expected):
    """BERTScore used to be built on the CPU whatever the machine; --device auto takes the GPU when there is one."""
    built_on = []

    class Spy:
        def __init__(self, model_dir, layer, device):
            built_on.append(device)

        def f1(self, candidates, references):
            return [1.0] * len(candidates)

    monkeypatch.setattr(evaluate, "BertScore", Spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    code, _ = run(capsys, "--pred", gold, "--gold", gold, "--bertscore-model", tmp_path, *flag)
    assert code == 0 and built_on == [expected]


def test_unloadable_bertscore_model_is_a_note_not_a_failure(tmp_path, gold, capsys):
    code, out = run(capsys, "--pred", gold, "--gold", gold, "--bertscore-model", tmp_path / "absent")
    assert code == 0 and "BERTScore is off" in out.out and "does not exist" in out.out


@pytest.mark.parametrize("pred_records, raw_text, expected", [
    (None, None, "no such file"),
    (None, '[{"idx": 3,', "invalid JSON at line 1"),
    (GOLD[:1], None, "1 answers for 2 questions"),
    (with_change(0, ans_qa_words={"举头": "抬头。", "疑": "好像。"}), None,
     "record 0: field 'ans_qa_words': keys ['举头', '疑'] differ"),
    (with_change(1, ans_qa_sents={"低头思故乡。": "", "举头望明月，": "抬头望着明月，"}), None,
     "record 1: field 'ans_qa_sents': value of '低头思故乡。' is empty"),
    (with_change(0, choose_id=-1), None, "record 0: field 'choose_id': expected one of the strings A, B, C, D, got -1"),
    (with_change(1, idx=4), None, "record 1: field 'idx': is 4, but question 1 has idx 5"),
], ids=["missing", "invalid-json", "count", "key-order", "empty-answer", "choose-id", "idx"])
def test_bad_prediction_is_one_error_line(tmp_path, gold, capsys, pred_records, raw_text, expected):
    pred = tmp_path / "pred.json"
    if pred_records is not None:
        write(pred, pred_records)
    elif raw_text is not None:
        pred.write_text(raw_text, encoding="utf-8")
    code, out = run(capsys, "--pred", pred, "--gold", gold, "--report", tmp_path / "report.json")
    assert code == 2 and out.out == ""
    assert out.err.count("\n") == 1 and out.err.startswith(f"error: {pred}") and expected in out.err
    assert not (tmp_path / "report.json").exists()


def test_many_problems_stay_on_one_line(tmp_path, gold, capsys):
    pred = write(tmp_path / "pred.json", [dict(GOLD[0], idx="3", choose_id=-1), GOLD[1]])
    code, out = run(capsys, "--pred", pred, "--gold", gold)
    assert code == 2 and out.err.count("\n") == 1 and out.err.rstrip().endswith("(and 1 more problems)")


def test_bad_gold_is_named(tmp_path, capsys):
    gold = write(tmp_path / "gold.json", with_change(0, choose_id="E"))
    code, out = run(capsys, "--pred", gold, "--gold", gold)
    assert code == 2 and out.err.startswith(f"error: {gold}:record 0: field 'choose_id'")


def test_several_predictions_side_by_side(tmp_path, gold, capsys):
    wrong = write(tmp_path / "wrong.json", with_change(0, choose_id="D"))
    code, out = run(capsys, "--pred", gold, "--pred", wrong, "--label", "perfect", "--label", "wrong", "--gold", gold,
                    "--report", tmp_path / "r.json")
    assert code == 0
    header = next(line for line in out.out.splitlines() if "perfect" in line)
    assert header.index("perfect") < header.index("wrong")
    accuracy = next(line for line in out.out.splitlines() if "accuracy" in line)
    assert "1.0000" in accuracy and "0.5000" in accuracy
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["perfect"]["acc"] == 1.0 and report["wrong"]["acc"] == 0.5
    code, out = run(capsys, "--pred", gold, "--pred", wrong, "--label", "only-one", "--gold", gold)
    assert code == 2 and out.err.startswith("error: give one distinct --label per --pred")

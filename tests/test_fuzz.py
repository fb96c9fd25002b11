"""Seeded fuzzing of every input format: train poems, evaluation questions, gold answers, submissions and YAML
configs. Each mutated input is either accepted or refused with the loader's own error (DataError / ConfigError)
naming the file, and, for a record's field, that record and field; never another exception. A sample of the refused
inputs goes through the CLI that reads them: exit code 2, one `error:` line, no traceback. With on_invalid=skip,
every valid record is kept, in order, and the skipped ones are counted exactly."""
import copy
import json
import random
from dataclasses import replace

import pytest
from test_evaluate import evaluate
from test_infer import infer

from poetry.config import ConfigError, load_config
from poetry.data import DataError, load_answers, load_poems, load_questions
from poetry.data.__main__ import main as data_main

from conftest import ROOT, SAMPLE

SEED = 20261201
PER_FORMAT = 1000
CLI_SAMPLE = 12
POEMS = json.loads((SAMPLE / "train-data" / "唐诗" / "五言绝句" / "train.json").read_text(encoding="utf-8"))
QUESTIONS = json.loads((SAMPLE / "eval.json").read_text(encoding="utf-8"))
GOLD = json.loads((SAMPLE / "eval_gold.json").read_text(encoding="utf-8"))
CONFIG = (ROOT / "configs" / "tiny.yaml").read_text(encoding="utf-8")
ODD_VALUES = [None, 0, -1, 3.5, True, "", " ", [], {}, ["x"], {"k": "v"}, [[["deep"]]], "字" * 350_000,
              float("nan"), float("inf"), "E", "A"]


def deeply_nested(depth: int = 50_000) -> str:
    return "[" * depth + "]" * depth


def mutate(records: list[dict], rng: random.Random) -> tuple[bytes, tuple[int, str] | None, str]:
    """(file bytes, the (record, field) a structural mutation touched, what was done)."""
    records = copy.deepcopy(records)
    kind = rng.choice(["drop", "retype", "extra", "nested_value", "letters", "truncate", "bytes", "utf16",
                       "duplicate_key", "top_level", "nan_literal", "deep"])
    i = rng.randrange(len(records))
    field = rng.choice(sorted(records[i]))
    if kind == "drop":
        del records[i][field]
    elif kind == "retype":
        records[i][field] = rng.choice(ODD_VALUES)
    elif kind == "extra":
        records[i][f"extra_{rng.randrange(99)}"] = rng.choice(ODD_VALUES)
    elif kind == "nested_value" and isinstance(records[i][field], dict) and records[i][field]:
        key = rng.choice(sorted(records[i][field]))
        records[i][field][key] = rng.choice(ODD_VALUES)
    elif kind == "letters":
        if "choose" in records[i]:
            records[i]["choose"] = {letter.lower() if rng.random() < 0.5 else "E": text
                                    for letter, text in records[i]["choose"].items()}
        if "choose_id" in records[i]:
            records[i]["choose_id"] = rng.choice(["E", "a", "AB", 1, None, ""])
    text = json.dumps(records, ensure_ascii=False)
    touched = (i, field) if kind in ("drop", "retype", "nested_value") else None
    if kind == "truncate":
        text = text[:rng.randrange(len(text))]
    elif kind == "duplicate_key":
        first = json.dumps(records[0], ensure_ascii=False)
        key = next(iter(records[0]))
        doubled = "{" + json.dumps(key, ensure_ascii=False) + ": " + json.dumps(rng.choice(ODD_VALUES[:11])) + ", " + \
            first[1:]
        text = "[" + doubled + text[1 + len(first):]
        touched = (0, key)
    elif kind == "top_level":
        text = rng.choice([json.dumps(records[0], ensure_ascii=False), "42", '"text"', "null", "true"])
    elif kind == "nan_literal":
        text = text.replace('"idx": ', '"idx": NaN, "x": ', 1) if '"idx"' in text else text.replace("[", "[NaN, ", 1)
    elif kind == "deep":
        text = text.replace("[", "[" + deeply_nested() + ", ", 1)
    data = text.encode("utf-8")
    if kind == "bytes":
        position = rng.randrange(len(data))
        data = data[:position] + bytes([rng.choice([0xFF, 0xFE, 0xC0, 0x80])]) + data[position:]
    elif kind == "utf16":
        data = text.encode("utf-16")  # with its BOM
    return data, touched, kind


FORMATS = {
    "train": (POEMS, lambda path: load_poems(path)),
    "eval": (QUESTIONS, lambda path: load_questions(path)),
    "gold": (GOLD, load_answers),
    "submission": (GOLD, load_answers),
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_mutated_file_is_accepted_or_refused_naming_file_record_and_field(name, tmp_path):
    records, loader = FORMATS[name]
    rng = random.Random(f"{SEED}-{name}")
    refused, kinds = 0, set()
    for n in range(PER_FORMAT):
        data, touched, kind = mutate(records, rng)
        path = tmp_path / f"{name}-{n}.json"
        path.write_bytes(data)
        try:
            loader(path)
        except DataError as err:
            refused += 1
            kinds.add(kind)
            assert all(issue.file == str(path) for issue in err.issues), (kind, str(err))
            assert "\n" not in err.one_line()
            about = [issue for issue in err.issues if touched and issue.record == touched[0]]
            assert not about or any(issue.field == touched[1] for issue in about), (kind, touched, str(err))
        path.unlink()
    assert refused > PER_FORMAT // 2  # the mutations mostly break something
    assert {"truncate", "bytes", "utf16", "top_level", "deep", "drop", "retype"} <= kinds


def test_every_mutated_config_is_loaded_or_a_config_error(tmp_path):
    rng = random.Random(f"{SEED}-config")
    lines = CONFIG.splitlines()
    refused = 0
    for n in range(PER_FORMAT):
        kind = rng.choice(["drop_line", "retype", "unknown", "truncate", "bytes", "utf16", "tag", "deep", "top"])
        text = CONFIG
        if kind == "drop_line":
            text = "\n".join(line for j, line in enumerate(lines) if j != rng.randrange(len(lines)))
        elif kind == "retype":
            j = rng.choice([j for j, line in enumerate(lines) if ": " in line and line.startswith("  ")])
            key = lines[j].split(":")[0]
            text = "\n".join(lines[:j] + [f"{key}: {rng.choice(['[1, 2]', '{a: 1}', 'null', 'yes', '-5', 'x'])}"]
                             + lines[j + 1:])
        elif kind == "unknown":
            text = CONFIG + f"\ntrain:\n  lrr{rng.randrange(9)}: 1\n"
        elif kind == "truncate":
            text = CONFIG[:rng.randrange(len(CONFIG))]
        elif kind == "tag":
            text = CONFIG + "\nlog: !!python/object/apply:os.system ['echo pwned']\n"
        elif kind == "deep":  # PyYAML is slow on deep nesting: past the recursion limit once, below
            text = CONFIG + "\neval:\n  every: " + deeply_nested(200) + "\n"
        elif kind == "top":
            text = rng.choice(["- a\n- b\n", "42\n", "just text\n"])
        data = text.encode("utf-8")
        if kind == "bytes":
            position = rng.randrange(len(data))
            data = data[:position] + b"\xff" + data[position:]
        elif kind == "utf16":
            data = text.encode("utf-16")
        path = tmp_path / f"config-{n}.yaml"
        path.write_bytes(data)
        try:
            load_config(path, device="cpu")
        except ConfigError as err:
            refused += 1
            assert "\n" not in str(err).strip(), (kind, str(err))
        path.unlink()
    assert refused > PER_FORMAT // 3
    path = tmp_path / "deep.yaml"
    path.write_text(CONFIG + "\neval:\n  every: " + deeply_nested(5_000) + "\n")
    with pytest.raises(ConfigError, match="invalid YAML: nested too deeply"):
        load_config(path, device="cpu")


def refused_inputs(name: str, tmp_path, count: int) -> list:
    records, loader = FORMATS[name]
    rng = random.Random(f"{SEED}-{name}-cli")
    found = []
    while len(found) < count:
        data, _, _ = mutate(records, rng)
        path = tmp_path / f"{name}-cli-{len(found)}.json"
        path.write_bytes(data)
        try:
            loader(path)
        except DataError:
            found.append(path)
    return found


def assert_one_error_line(code: int, captured) -> None:
    assert code == 2, captured.err[-500:]
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_the_clis_refuse_bad_files_with_one_line_and_exit_code_2(tiny_model_dir, tmp_path, capsys):
    for path in refused_inputs("train", tmp_path, CLI_SAMPLE):
        assert_one_error_line(data_main(["stats", str(path)]), capsys.readouterr())
    for path in refused_inputs("eval", tmp_path, CLI_SAMPLE):
        code = infer.main(["--model", str(tiny_model_dir), "--input", str(path), "--output", str(tmp_path / "o")])
        assert_one_error_line(code, capsys.readouterr())
    for path in refused_inputs("gold", tmp_path, CLI_SAMPLE):
        assert_one_error_line(evaluate.main(["--gold", str(path), "--pred", str(SAMPLE / "eval_gold.json")]),
                              capsys.readouterr())
    for path in refused_inputs("submission", tmp_path, CLI_SAMPLE):
        assert_one_error_line(evaluate.main(["--gold", str(SAMPLE / "eval_gold.json"), "--pred", str(path)]),
                              capsys.readouterr())


def test_train_refuses_bad_configs_and_data_with_one_line(tiny_model_dir, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(ROOT))
    import train as train_script

    bad_config = tmp_path / "bad.yaml"
    bad_config.write_bytes(b"train:\n  lr: \xff\n")
    assert_one_error_line(train_script.main(["--config", str(bad_config)]), capsys.readouterr())
    for path in refused_inputs("train", tmp_path, 3):
        code = train_script.main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"model.path={tiny_model_dir}",
                                  f"data.train={path}", f"log.dir={tmp_path / 'run'}"])
        assert_one_error_line(code, capsys.readouterr())
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("name, loader, required", [("train", load_poems, "content"),
                                                    ("eval", load_questions, "qa_words")])
def test_skip_keeps_every_valid_record_in_order_and_counts_the_rest(name, loader, required, tmp_path):
    records = FORMATS[name][0]
    rng = random.Random(f"{SEED}-{name}-skip")
    mixed, valid = [], []
    for n in range(200):
        record = copy.deepcopy(rng.choice(records))
        if "idx" in record:
            record["idx"] = n
        if rng.random() < 0.3:
            breakage = rng.choice(["drop", "null", "type"])
            if breakage == "drop":
                del record[required]
            else:
                record[required] = None if breakage == "null" else 42
        else:
            valid.append(record)
        mixed.append(record)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(mixed, ensure_ascii=False), encoding="utf-8")
    loaded = loader(path, on_invalid="skip")
    assert loaded.skipped_records == len(mixed) - len(valid) > 0
    expected = loader(_written(tmp_path / "valid.json", valid)).records

    def unsourced(items):  # a poem records the file and record it was read from
        return [replace(item, source=None) if hasattr(item, "source") else item for item in items]

    assert unsourced(loaded.records) == unsourced(expected) and len(expected) == len(valid)


def _written(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path

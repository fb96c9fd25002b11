"""Several training sources drawn by weight, data.exclude at training time, partial records."""
import json
from collections import Counter

import pytest

from poetry.config import ConfigError, DataConfig, DataSource, load_config
from poetry.data import DataError, QuestionBuilder, load_poems
from poetry.data.mix import load_training_poems

SAMPLE = "data/sample/train-data"


def poem(n: int, **fields) -> dict:
    """A record whose two lines are CJK characters no other n uses (digits are not compared by poetry.data.overlap)."""
    line = "".join(chr(0x4E00 + 20 * n + i) for i in range(14))
    return {"title": f"题{n}", "content": f"{line[:7]}，{line[7:]}。", "keywords": {}, "trans": "", "emotion": None,
            **fields}


def tree(root, name: str, records: list[dict]):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(folder)


def test_one_path_is_one_source_of_weight_one_and_epochs_keep_file_order():
    mixture, val = load_training_poems(DataConfig(train=SAMPLE), seed=0)
    assert [s.weight for s in mixture.sources] == [1.0]
    assert mixture.draw(0) == mixture.draw(1) == mixture.sources[0].poems
    assert len(mixture.poems) + len(val) == len(load_poems(SAMPLE).records)


def test_weights_draw_fresh_shares_reproducibly_and_only_the_primary_gives_validation(tmp_path):
    other = tree(tmp_path, "imported", [poem(n) for n in range(50)])
    cfg = DataConfig(train=[DataSource(SAMPLE, 2.0), DataSource(other, 0.2)])
    mixture, val = load_training_poems(cfg, seed=3)
    primary, extra = mixture.sources
    assert len(extra.poems) == 50 and all(p.source.startswith("imported/") for p in extra.poems)
    assert val and all("imported" not in p.source for p in val)
    epochs = [mixture.draw(epoch) for epoch in range(3)]
    for drawn in epochs:
        counts = Counter(p.key for p in drawn)
        assert all(counts[p.key] == 2 for p in primary.poems)
        assert sum(1 for p in drawn if p in extra.poems) == 10  # a fifth of 50, each epoch
    fifths = [frozenset(p.key for p in drawn if p in extra.poems) for drawn in epochs]
    assert len(set(fifths)) == 3  # another fifth each epoch
    again, _ = load_training_poems(cfg, seed=3)
    assert [p.key for p in again.draw(1)] == [p.key for p in epochs[1]]
    assert "imported: 50 poems x 0.2 = 10 an epoch" in mixture.describe()


def test_a_poem_of_the_exclude_set_stops_the_run_naming_both(tmp_path):
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps([{"idx": 0, "title": "静夜思", "author": "李白",
                                      "content": "床前明月光，疑是地上霜。举头望明月，低头思故乡。"}],
                                    ensure_ascii=False), encoding="utf-8")
    primary = tree(tmp_path, "official", [poem(n) for n in range(10)])
    other = tree(tmp_path, "imported", [poem(1), poem(2, title="夜思", content="床前看月光，疑是天上霜。")])
    cfg = DataConfig(train=[DataSource(primary), DataSource(other, 1.0)], exclude=[str(eval_file)])
    with pytest.raises(DataError) as err:
        load_training_poems(cfg, seed=0)
    first = str(err.value.issues[0])
    assert first.startswith("imported/train.json:record 1: 《夜思》 is an excluded poem: line 床前看月光 ~ 床前明月光 "
                            "of 《静夜思》 (")
    assert len(err.value.issues) == 2 and "1 training poems are in" in str(err.value.issues[1])
    assert "data.allow_overlap=true" in str(err.value)
    cfg.allow_overlap = True
    mixture, _ = load_training_poems(cfg, seed=0)
    assert any(p.title == "夜思" for p in mixture.poems)


def test_partial_records_give_the_question_types_they_support():
    records = [poem(1, trans="第一句的译文，第二句的译文。"),               # sentences only
               poem(2, keywords={"第二": "次序为二"}),                     # words only
               poem(3, emotion="思念故乡"), poem(4, emotion="豪迈奔放"), poem(5, emotion="闲适自得"),
               poem(6, emotion="惜春伤时"),                                # options only
               poem(7, title="")]                                          # nothing: no question, no error
    from poetry.data.io import _poem, _validate
    poems = _validate(list(enumerate(records)), "record", _poem, "error", "x.json").records
    examples = {e.question.title: e for e in QuestionBuilder(poems).epoch(0)}
    assert examples["题1"].question.qa_sents and not examples["题1"].question.qa_words
    assert examples["题2"].question.qa_words == ("第二",) and not examples["题2"].question.qa_sents
    assert examples["题3"].question.choose and not examples["题3"].question.qa_words
    assert "" not in examples and len(examples) == 6


@pytest.mark.parametrize("override, message", [
    ("data.train=[]", "data.train: an empty list"),
    ("data.train=[{weight: 1}]", "data.train[0].path: missing"),
    ("data.train=[{path: a, weight: -1}]", "data.train[0].weight: must be positive"),
    ("data.train=[{path: a, wieght: 1}]", "unknown key 'data.train[0].wieght' (did you mean 'weight'?)"),
    ("data.train=[{path: a}, {path: a}]", "data.train: a source is listed twice"),
    ("data.train=[3]", "data.train[0]: expected a mapping of path, weight, got 3"),
])
def test_bad_sources_are_named(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_sources_survive_the_saved_config(tmp_path):
    from poetry.config import save_config

    cfg = load_config(None, ["data.train=[{path: a, weight: 1}, {path: b, weight: 0.25}]", "data.exclude=[e.json]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.data.sources == [DataSource("a", 1.0), DataSource("b", 0.25)] and again.data.exclude == ["e.json"]


def test_missing_source_or_exclude_path_fails_before_any_model(tmp_path):
    from poetry.config import check_inputs

    cfg = load_config(None, [f"data.train=[{{path: {SAMPLE}}}, {{path: {tmp_path}/nowhere}}]"])
    with pytest.raises(ConfigError, match="nowhere: no such file"):
        check_inputs(cfg)
    cfg = load_config(None, [f"data.exclude=[{tmp_path}/eval.json]"])
    with pytest.raises(ConfigError, match=r"data.exclude: .*eval.json: no such file"):
        check_inputs(cfg)


def test_held_out_poems_may_be_in_the_exclude_set(tmp_path):
    primary = tree(tmp_path, "official", [poem(n) for n in range(40)])
    _, val = load_training_poems(DataConfig(train=primary, val_fraction=0.25), seed=0)
    eval_file = tmp_path / "heldout.json"
    eval_file.write_text(json.dumps([{"title": p.title, "content": p.content} for p in val], ensure_ascii=False),
                         encoding="utf-8")
    mixture, again = load_training_poems(DataConfig(train=primary, val_fraction=0.25, exclude=[str(eval_file)]), 0)
    assert again == val and len(mixture.poems) == 40 - len(val)
    with pytest.raises(DataError, match="is an excluded poem"):  # but not a training poem
        load_training_poems(DataConfig(train=primary, val_fraction=0.1, split_seed=1, exclude=[str(eval_file)]), 0)

"""Loading and validating task files: train trees, JSON lists, JSONL, eval questions and submissions.

Files are parsed with the standard library rather than `datasets.load_dataset`: Arrow's schema inference turns a
wrong type into an opaque cast error, while the task needs `file:record N: field 'x': ...`. Tokenisation later
goes through `datasets.map` (see poetry.prompt), where the library does help.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable, Literal

from .errors import DataError, Issue, Loaded
from .records import OPTION_LETTERS, Answer, Poem, Question, Verse

OnInvalid = Literal["error", "skip"]


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _decode(path: Path, shown: str) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line, col = _line_col(data[: err.start].decode("utf-8", errors="replace"), err.start)
        raise DataError([Issue(shown, None, None, f"not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}, "
                                                  f"column {col}); re-save the file as UTF-8")]) from None
    return text.replace("\r\n", "\n")


class _Object(dict):
    """A JSON object that remembers the keys it was given more than once (json keeps the last value silently)."""

    def __init__(self, pairs: list[tuple[str, object]]):
        super().__init__(pairs)
        self.repeated = sorted(key for key, n in Counter(key for key, _ in pairs).items() if n > 1)


def loads(text: str) -> object:
    """json.loads with objects that remember repeated keys; a value nested past Python's recursion limit is a
    ValueError, as any other unreadable JSON."""
    try:
        return json.loads(text, object_pairs_hook=_Object)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _parse(text: str, shown: str, number: int | None, label: str = "record") -> object:
    try:
        return loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}" if number is None else f"column {err.colno}"
        raise DataError([Issue(shown, number, None, f"invalid JSON at {where}: {err.msg}", label)]) from None
    except ValueError as err:
        raise DataError([Issue(shown, number, None, f"invalid JSON: {err}", label)]) from None


def _parse_records(path: Path, shown: str) -> tuple[list[tuple[int, object]], str]:
    """(number, raw record) pairs and the label for numbers: list index for JSON, 1-based line for JSONL."""
    if not path.is_file():
        raise DataError([Issue(shown, None, None, "no such file")])
    text = _decode(path, shown)
    if path.suffix == ".jsonl":
        lines = enumerate(text.split("\n"), start=1)
        return [(number, _parse(line, shown, number, "line")) for number, line in lines if line.strip()], "line"
    data = _parse(text, shown, None)
    if not isinstance(data, list):
        raise DataError([Issue(shown, None, None, f"expected a JSON list of records, got {_type_name(data)}")])
    return list(enumerate(data)), "record"


def _repeated_keys(raw: dict) -> list[tuple[str, str]]:
    """(field, key) for each key a record, or an object in one of its fields, gives more than once."""
    found = [(key, key) for key in getattr(raw, "repeated", [])]
    for name, value in raw.items():
        if isinstance(value, dict):
            found += [(name, key) for key in getattr(value, "repeated", [])]
    return found


def _type_name(value: object) -> str:
    names = ((bool, "a boolean"), (dict, "an object"), (list, "a list"), (str, "a string"), (int, "an integer"),
             (float, "a number"), (type(None), "null"))  # bool before int: True is an int too
    return next((name for kind, name in names if isinstance(value, kind)), type(value).__name__)


class _Fields:
    """Reads typed fields out of one raw record, turning every problem into an Issue instead of raising."""

    def __init__(self, raw: dict, issue: Callable[[str | None, str], None]):
        self.issue = issue
        self.raw = raw

    def _get(self, name: str, required: bool):
        if name not in self.raw:
            if required:
                self.issue(name, "missing field")
            return None
        return self.raw[name]

    def text(self, name: str, required: bool = True, nullable: bool = False, allow_empty: bool = False) -> str | None:
        value = self._get(name, required)
        if value is None:
            if name in self.raw and not nullable:
                self.issue(name, "null where text is required")
            return None
        if not isinstance(value, str):
            self.issue(name, f"expected a string, got {_type_name(value)}")
        elif not value.strip() and not (nullable or allow_empty):
            self.issue(name, "empty text")
        else:
            return value.replace("\r\n", "\n")
        return None

    def integer(self, name: str) -> int | None:
        value = self._get(name, True)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            self.issue(name, f"expected an integer, got {_type_name(value)}")
            return None
        return value

    def text_list(self, name: str) -> tuple[str, ...]:
        value = self._get(name, True)
        if value is None:
            if name in self.raw:
                self.issue(name, "null where a list is required")
            return ()
        if not isinstance(value, list):
            self.issue(name, f"expected a list of strings, got {_type_name(value)}")
            return ()
        if not value:
            self.issue(name, "empty list")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                self.issue(name, f"item {i} is {_type_name(item) if not isinstance(item, str) else 'empty'}, "
                                 f"expected non-empty text")
        for item in sorted({x for x in value if isinstance(x, str) and value.count(x) > 1}):
            self.issue(name, f"duplicate item {item!r}")
        return tuple(value)

    def text_map(self, name: str, allow_empty: bool, allow_empty_values: bool) -> dict[str, str]:
        value = self._get(name, True)
        if value is None:
            if name in self.raw:
                self.issue(name, "null where an object is required")
            return {}
        if not isinstance(value, dict):
            self.issue(name, f"expected an object of text values, got {_type_name(value)}")
            return {}
        if not value and not allow_empty:
            self.issue(name, "empty object")
        for key, item in value.items():
            if not isinstance(item, str):
                self.issue(name, f"value of {key!r} is {_type_name(item)}, expected text")
            elif not item.strip() and not allow_empty_values:
                self.issue(name, f"value of {key!r} is empty")
        return {key: item.replace("\r\n", "\n") for key, item in value.items() if isinstance(item, str)}


def _load(path: str | Path, build: Callable[[_Fields, str], object], on_invalid: OnInvalid,
          shown: str | None = None) -> Loaded:
    path = Path(path)
    shown = shown or str(path)
    records, label = _parse_records(path, shown)
    return _validate(records, label, build, on_invalid, shown)


def _validate(records: list[tuple[int, object]], label: str, build: Callable[[_Fields, str], object],
              on_invalid: OnInvalid, shown: str) -> Loaded:
    loaded = Loaded([])
    for number, raw in records:
        issues: list[Issue] = []
        fields = _Fields(raw, lambda name, msg, issues=issues, number=number:
                         issues.append(Issue(shown, number, name, msg, label)))
        if isinstance(raw, dict):
            for name, key in _repeated_keys(raw):
                fields.issue(name, f"the key {key!r} is given twice; which value is meant?")
            record = build(fields, f"{shown}:{number}")
        else:
            fields.issue(None, f"expected an object, got {_type_name(raw)}")
        if issues:
            if on_invalid == "error":
                raise DataError(issues)
            loaded.skipped.extend(issues)
            loaded.skipped_records += 1
        else:
            loaded.records.append(record)
    return loaded


def _poem(fields: _Fields, source: str) -> Poem:
    return Poem(
        title=(fields.text("title", allow_empty=True) or "").strip(),  # CCPM's lines have none
        content=(fields.text("content") or "").strip(),
        keywords=fields.text_map("keywords", allow_empty=True, allow_empty_values=True),
        trans=(fields.text("trans", allow_empty=True) or "").strip(),  # imported plain poems have none
        emotion=(fields.text("emotion", nullable=True) or "").strip() or None,
        author=fields.text("author", required=False, nullable=True),
        source=source,
    )


def load_poems(path: str | Path, on_invalid: OnInvalid = "error") -> Loaded:
    """Training poems from a `train-data` tree (every `train.json` below it), a JSON list, or JSONL. A record may
    lack what some question types need (an empty title, translation or keywords, a null emotion): the question
    builder makes the types it supports."""
    return _load_tree(Path(path), _poem, on_invalid)


def _reference(fields: _Fields, source: str) -> Poem:
    return Poem(title=(fields.text("title", required=False, nullable=True) or "").strip(),
                content=(fields.text("content") or "").strip(), keywords={}, trans="", emotion=None,
                author=fields.text("author", required=False, nullable=True), source=source)


def load_references(path: str | Path) -> list[Poem]:
    """Poems to compare against (decontamination): any record with a `content`, and its `title` and `author` when
    given. Official evaluation files, train-data trees, JSON lists or JSONL; an invalid record is an error."""
    return _load_tree(Path(path), _reference, "error").records


def _verse(fields: _Fields, source: str) -> Verse:
    form = fields.text("form", required=False, nullable=True)
    return Verse(title=(fields.text("title", required=False) or "").strip(),
                 content=(fields.text("content") or "").strip(), form=form.strip() if form else None, source=source)


def load_verses(path: str | Path) -> list[Verse]:
    """Poems to check against their forms: `{content, title?, form?}` records from a train-data tree (a 词's
    词牌 is in its title), a JSON list, or JSONL. Other fields are ignored; an invalid record is an error."""
    return _load_tree(Path(path), _verse, "error").records


def _writing_request(fields: _Fields, source: str) -> Verse:
    return Verse(title=(fields.text("title", nullable=True) or "").strip(), content="",
                 form=(fields.text("form") or "").strip(), source=source)


def load_writing_requests(path: str | Path) -> list[Verse]:
    """Poems to write: `{form, title}` records (title may be empty) from a JSON list or JSONL."""
    return _load_tree(Path(path), _writing_request, "error").records


def _load_tree(path: Path, build: Callable[[_Fields, str], object], on_invalid: OnInvalid) -> Loaded:
    if path.is_dir():
        files = sorted(path.rglob("train.json"))
        if not files:
            raise DataError([Issue(str(path), None, None, "no train.json below this directory")])
    else:
        files = [path]
    loaded = Loaded([])
    for file in files:
        shown = str(file.relative_to(path.parent)) if path.is_dir() else str(file)
        part = _load(file, build, on_invalid, shown)
        loaded.records.extend(part.records)
        loaded.skipped.extend(part.skipped)
        loaded.skipped_records += part.skipped_records
    return loaded


def _question(fields: _Fields, source: str) -> Question:
    choose = fields.text_map("choose", allow_empty=False, allow_empty_values=False)
    if choose and tuple(sorted(choose)) != OPTION_LETTERS:
        fields.issue("choose", f"expected exactly the options A, B, C, D, got {', '.join(choose)}")
    return Question(
        idx=fields.integer("idx"),
        title=fields.text("title") or "",
        author=fields.text("author", required=False, nullable=True),
        content=fields.text("content") or "",
        qa_words=fields.text_list("qa_words"),
        qa_sents=fields.text_list("qa_sents"),
        choose={letter: choose[letter] for letter in OPTION_LETTERS if letter in choose},
    )


def _answer(fields: _Fields, source: str) -> Answer:
    choose_id = fields.raw.get("choose_id")
    if "choose_id" in fields.raw and choose_id not in OPTION_LETTERS:
        fields.issue("choose_id", f"expected one of the strings A, B, C, D, got {json.dumps(choose_id)}")
    elif "choose_id" not in fields.raw:
        fields.issue("choose_id", "missing field")
    return Answer(
        idx=fields.integer("idx"),
        ans_qa_words=fields.text_map("ans_qa_words", allow_empty=False, allow_empty_values=False),
        ans_qa_sents=fields.text_map("ans_qa_sents", allow_empty=False, allow_empty_values=False),
        choose_id=choose_id,
    )


def _check_unique_idx(loaded: Loaded, file: str) -> None:
    seen: dict[int, int] = {}
    issues = []
    for position, record in enumerate(loaded.records):
        if record.idx in seen:
            issues.append(Issue(file, position, "idx", f"duplicate idx {record.idx} (first at record "
                                                       f"{seen[record.idx]})"))
        seen.setdefault(record.idx, position)
    if issues:
        raise DataError(issues)


def load_questions(path: str | Path, on_invalid: OnInvalid = "error") -> Loaded:
    """Evaluation items `{idx, title, author, content, qa_words, qa_sents, choose}` from a JSON list or JSONL."""
    loaded = _load(path, _question, on_invalid)
    _check_unique_idx(loaded, str(path))
    return loaded


def parse_questions(data: object, source: str) -> list[Question]:
    """Evaluation items already parsed from JSON (a list of them, or one object), validated as `load_questions`
    validates a file; `source` names them in errors (e.g. `request`)."""
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError([Issue(source, None, None, f"expected a question object or a list of them, got "
                                                   f"{_type_name(data)}")])
    if not data:
        raise DataError([Issue(source, None, None, "empty list of questions")])
    loaded = _validate(list(enumerate(data)), "record", _question, "error", source)
    _check_unique_idx(loaded, source)
    return loaded.records


def load_answers(path: str | Path) -> list[Answer]:
    """A submission: `{idx, ans_qa_words, ans_qa_sents, choose_id}` items. Strict, as the official scorer is."""
    loaded = _load(path, _answer, "error")
    _check_unique_idx(loaded, str(path))
    return loaded.records


def _asked(item: Question | Answer) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
    """(idx, words, sentences) an answer must match: a question's lists, or the keys of a gold answer."""
    if isinstance(item, Answer):
        return item.idx, tuple(item.ans_qa_words), tuple(item.ans_qa_sents)
    return item.idx, item.qa_words, item.qa_sents


def check_submission(expected: list[Question] | list[Answer], answers: list[Answer], file: str) -> None:
    """What the official scorer enforces: one answer per question, in order, each answer present and non-empty.

    `expected` is the questions, or the gold answers to them. The scorer reads answers by position, so a right key
    in the wrong place is still an error here.
    """
    if len(answers) != len(expected):
        raise DataError([Issue(file, None, None, f"{len(answers)} answers for {len(expected)} questions")])
    issues = []
    for position, (item, answer) in enumerate(zip(expected, answers, strict=True)):
        def bad(field: str, message: str, position: int = position) -> None:
            issues.append(Issue(file, position, field, message))

        idx, words, sents = _asked(item)
        if answer.idx != idx:
            bad("idx", f"is {answer.idx}, but question {position} has idx {idx} (answers are read in order)")
        for field, asked, given in (("ans_qa_words", words, answer.ans_qa_words),
                                    ("ans_qa_sents", sents, answer.ans_qa_sents)):
            if tuple(given) != tuple(asked):
                bad(field, f"keys {list(given)} differ from the question's {list(asked)} (same order required)")
        if answer.choose_id not in OPTION_LETTERS:
            bad("choose_id", f"expected one of A, B, C, D, got {json.dumps(answer.choose_id)}")
    if issues:
        raise DataError(issues)


def write_submission(answers: list[Answer], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([a.to_json() for a in answers], ensure_ascii=False, indent=1) + "\n",
                          encoding="utf-8")

"""Public corpora into the official train-data layout, record by record, decontaminated against an exclude set.

Each format reads its corpus as it is published (the layouts are described in tests/fixtures/imports/LAYOUTS.md,
whose fixtures imitate them) and yields one `Read` per record: the training record `{title, content, keywords,
trans, emotion, author}`, or why the record cannot be one. Records stream from the files to `train.json`, so memory
is bounded by the exclude index and the duplicate check, not by the corpus (Classical-Modern has 972k pairs).
`datasets` is not used to read: these layouts are one JSON object per file, JSON lists and tagged text, which it
would first have to be taught, and its errors would not name the file and record.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..prosody.tables import simplified
from .emotions import valence
from .errors import DataError, Issue
from .io import loads
from .overlap import OverlapIndex, normalised

IMPORT_RECORD = "import.json"  # what an import declares of a source (format, licence, counts), beside its train.json


@dataclass(frozen=True)
class Read:
    where: str  # file, and record or line within it
    record: dict | None  # the training record; None when malformed
    problem: str = ""  # why it is malformed


@dataclass(frozen=True)
class Format:
    name: str
    patterns: tuple[str, ...]  # its files' names, searched below a source directory
    read: Callable[[Path, Path, bool], Iterator[Read]]  # (source, one of its files, emotion from tags) -> records
    licence: str  # as the source states it
    feeds: str  # what its records give the question builder
    traditional: bool = False  # converted to simplified characters (OpenCC t2s)
    skip_dirs: tuple[str, ...] = ()  # directories of the corpus that hold no usable records

    def files(self, source: Path) -> list[Path]:
        """The files of a source (a file, or a directory searched for the format's names), or a DataError naming
        what is missing."""
        if source.is_file():
            return [source]
        if not source.is_dir():
            raise DataError([Issue(str(source), None, None, "no such file or directory")])
        found = sorted({path for pattern in self.patterns for path in source.rglob(pattern)
                        if not set(self.skip_dirs) & set(path.relative_to(source).parts)})
        if not found:
            raise DataError([Issue(str(source), None, None, f"no {' or '.join(self.patterns)} below this directory "
                                                            f"(is it a {self.name} corpus?)")])
        return found


def _record(title: str, content: str, *, author: str | None = None, trans: str = "",
            keywords: dict[str, str] | None = None, emotion: str | None = None) -> dict:
    return {"title": title, "author": author, "content": content, "keywords": keywords or {}, "trans": trans,
            "emotion": emotion}


def _json_file(path: Path) -> tuple[object, str]:
    """(parsed JSON, "") or (None, why it cannot be read)."""
    try:
        return loads(path.read_text(encoding="utf-8-sig")), ""
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as err:
        return None, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
    except ValueError as err:
        return None, f"invalid JSON: {err}"


def _text(raw: dict, name: str) -> tuple[str, str]:
    """(the stripped text of a field, "") or ("", why the field is unusable)."""
    if name not in raw:
        return "", f"field '{name}': missing"
    value = raw[name]
    if not isinstance(value, str):
        return "", f"field '{name}': expected text, got {type(value).__name__}"
    if not value.strip():
        return "", f"field '{name}': empty"
    return value.strip(), ""


# --- gushiwen: javayhu/poetry, one JSON object per poem ---------------------------------------------------------------

_GLOSS_NUMBER = re.compile(r"^\s*(?:[\u2474-\u2487]|\(\d+\)|（\d+）|\d+[、.．])\s*")  # ⑴..⒇, (1), （1）, 1、
_PINYIN = re.compile(r"（[^）]*）|\([^)]*\)")
_SECTION = re.compile(r"^(译文[一二三四]?|注释)\s*$")
_SENTENCE = re.compile(r"[^。]+。?")
MAX_GLOSSED_WORD = 12  # characters before a `：` that still name a word, not a sentence


def _sections(fanyi: str) -> dict[str, list[str]]:
    """The headed parts of a 古诗文网 `fanyi`: 译文 (the first translation), 注释, and any 译文二…, each as lines."""
    parts: dict[str, list[str]] = {}
    current = None
    for line in fanyi.split("\n"):
        if heading := _SECTION.match(line.strip()):
            current = heading.group(1)
            parts.setdefault(current, [])
        elif current and line.strip():
            parts[current].append(line.strip())
    return parts


def gushiwen_glosses(notes: list[str]) -> dict[str, str]:
    """`⑵闻：听到。啼鸟：鸟儿啼叫。` -> {闻: 听到。, 啼鸟: 鸟儿啼叫。}: numbering and pinyin dropped, a line may hold
    several glosses, and a sentence without `：` continues the gloss before it. The first gloss of a word is kept."""
    glosses: dict[str, str] = {}
    for line in notes:
        items: list[list[str]] = []  # [word, gloss] pairs of this line
        for sentence in _SENTENCE.findall(_GLOSS_NUMBER.sub("", line)):
            head, colon, rest = sentence.partition("：")
            word = _PINYIN.sub("", head).strip(" “”\"")
            if colon and word and rest.strip() and len(word) <= MAX_GLOSSED_WORD:
                items.append([word, rest.strip()])
            elif items:
                items[-1][1] += sentence.strip()
        for word, gloss in items:
            glosses.setdefault(word, gloss)
    return glosses


def _emotion_of(tags: object) -> str | None:
    """The first tag the project's valence lexicon classifies (思乡, 离别, 闲适 ...), else None."""
    if not isinstance(tags, list):
        return None
    return next((tag for tag in tags if isinstance(tag, str) and valence(tag)), None)


def read_gushiwen(source: Path, path: Path, emotion_from_tags: bool) -> Iterator[Read]:
    raw, problem = _json_file(path)
    if problem or not isinstance(raw, dict):
        yield Read(str(path), None, problem or "expected one JSON object (a poem) per file")
        return
    content, problem = _text(raw, "content")
    if problem:
        yield Read(str(path), None, problem)
        return
    poet = raw.get("poet") if isinstance(raw.get("poet"), dict) else {}
    parts = _sections(raw["fanyi"]) if isinstance(raw.get("fanyi"), str) else {}
    yield Read(str(path), _record(
        title=str(raw.get("name") or "").strip(),
        author=str(poet.get("name") or "").strip() or None,
        content="\n".join(line.strip() for line in content.split("\n") if line.strip()),
        trans="\n".join(parts.get("译文", [])),
        keywords=gushiwen_glosses(parts.get("注释", [])),
        emotion=_emotion_of(raw.get("tags")) if emotion_from_tags else None))


# --- ccpm: THUNLP-AIPoet/CCPM, JSONL of {translation, choices, answer} ----------------------------------------------

def read_ccpm(source: Path, path: Path, emotion_from_tags: bool) -> Iterator[Read]:
    text = path.read_text(encoding="utf-8-sig")
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:line {number}"
        try:
            raw = loads(line)
        except ValueError as err:
            yield Read(where, None, f"invalid JSON: {err}")
            continue
        if not isinstance(raw, dict):
            yield Read(where, None, "expected a JSON object")
            continue
        translation, problem = _text(raw, "translation")
        choices, answer = raw.get("choices"), raw.get("answer")
        if not problem and "answer" not in raw:
            problem = "field 'answer': missing (test_public.jsonl hides it), so the right line is unknown"
        elif not problem and not (isinstance(choices, list) and isinstance(answer, int)
                                  and 0 <= answer < len(choices) and isinstance(choices[answer], str)
                                  and choices[answer].strip()):
            problem = f"field 'answer': {answer!r} does not pick a line of 'choices'"
        if problem:
            yield Read(where, None, problem)
            continue
        yield Read(where, _record(title="", content=choices[answer].strip(), trans=translation))


# --- chinese-poetry: JSON lists of {author, paragraphs, title | rhythmic} ------------------------------------------

def read_chinese_poetry(source: Path, path: Path, emotion_from_tags: bool) -> Iterator[Read]:
    data, problem = _json_file(path)
    if problem or not isinstance(data, list):
        yield Read(str(path), None, problem or "expected a JSON list of poems")
        return
    for number, raw in enumerate(data):
        where = f"{path}:record {number}"
        paragraphs = raw.get("paragraphs") if isinstance(raw, dict) else None
        lines = [p.strip() for p in paragraphs if isinstance(p, str) and p.strip()] \
            if isinstance(paragraphs, list) else []
        if not lines:
            yield Read(where, None, "field 'paragraphs': missing or empty" if isinstance(raw, dict)
                       else "expected a JSON object")
            continue
        title = raw.get("title") or raw.get("rhythmic") or ""  # a 词 is known by its 词牌
        author = raw.get("author")
        yield Read(where, _record(
            title=simplified(str(title).strip()), content=simplified("\n".join(lines)),
            author=simplified(author.strip()) if isinstance(author, str) and author.strip() else None))


# --- classical-modern: NiuTrans/Classical-Modern, 古文：/现代文： pairs ---------------------------------------------

def read_classical_modern(source: Path, path: Path, emotion_from_tags: bool) -> Iterator[Read]:
    title = "·".join(path.parent.relative_to(source).parts[-2:]) if source.is_dir() else path.parent.name
    text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    number = 0
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        number += 1
        where = f"{path}:pair {number}"
        classical = [line.removeprefix("古文：").strip() for line in lines if line.startswith("古文：")]
        modern = [line.removeprefix("现代文：").strip() for line in lines if line.startswith("现代文：")]
        if len(classical) != 1 or len(modern) != 1 or len(lines) != 2 or not classical[0] or not modern[0]:
            yield Read(where, None, "expected a 古文： line and its 现代文： line, both non-empty")
            continue
        yield Read(where, _record(title=title, content=classical[0], trans=modern[0]))


FORMATS = {f.name: f for f in (
    Format("gushiwen", ("poetry_*.json",), read_gushiwen,
           licence="GPL-3.0 (javayhu/poetry README); its text was crawled from 古诗文网 in 2017",
           feeds="whole poems with translations (译文) and glosses (注释); emotions only with --emotion-from-tags"),
    Format("ccpm", ("*.jsonl",), read_ccpm,
           licence="none stated (THUNLP-AIPoet/CCPM: no LICENSE; its README asks for a citation)",
           feeds="single lines with their modern translation: sentence-translation examples"),
    Format("chinese-poetry", ("poet.tang.*.json", "poet.song.*.json", "ci.song.*.json", "唐诗三百首.json",
                              "宋词三百首.json"), read_chinese_poetry,
           licence="MIT (chinese-poetry/chinese-poetry LICENSE)",
           feeds="plain poems (no translation or glosses): writing examples, and a decontamination index",
           traditional=True, skip_dirs=("error",)),  # 全唐诗/error/: the curators' rejected copies
    Format("classical-modern", ("bitext.txt",), read_classical_modern,
           licence="MIT (NiuTrans/Classical-Modern LICENSE)",
           feeds="prose sentences with their modern translation: general translation examples only"),
)}


@dataclass
class ImportReport:
    """What one import read, kept and dropped, with each dropped record and why (also written beside the data)."""

    format: str
    inputs: list[str]
    out: str
    read: int = 0
    kept: int = 0
    duplicates: int = 0
    contaminated: int = 0
    malformed: Counter = field(default_factory=Counter)  # reason -> records
    dropped: list[dict] = field(default_factory=list)  # {where, title, dropped, why}

    def summary(self) -> str:
        malformed = sum(self.malformed.values())
        reasons = "; ".join(f"{n}x {reason}" for reason, n in self.malformed.most_common())
        return (f"{self.format}: read {self.read}, kept {self.kept}, dropped {self.contaminated} as contaminated, "
                f"{malformed} as malformed" + (f" ({reasons})" if reasons else "")
                + (f", {self.duplicates} as duplicates of a kept record" if self.duplicates else ""))


class _JsonListWriter:
    """train.json written record by record: the whole corpus never sits in memory."""

    def __init__(self, path: Path):
        self.file = path.open("w", encoding="utf-8")
        self.file.write("[")
        self.count = 0

    def write(self, record: dict) -> None:
        self.file.write(("\n" if self.count == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        self.count += 1

    def close(self) -> None:
        self.file.write("\n]\n")
        self.file.close()


def _fingerprint(record: dict) -> bytes:
    """A kept record's identity for the duplicate check: its normalised title, content and translation (唐诗三百首
    repeats poems of 全唐诗 verbatim)."""
    text = "\n".join(normalised(record[key] or "") for key in ("title", "content", "trans"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).digest()


def import_corpus(fmt: Format, sources: Iterable[str | Path], out: str | Path, exclude: OverlapIndex | None,
                  emotion_from_tags: bool = False) -> ImportReport:
    """Read every record of `sources`, drop the malformed, duplicated and excluded ones, and write the rest to
    `out/train.json`, with `out/import.json` (format, licence, counts) and `out/dropped.jsonl` (each dropped
    record and why)."""
    files = [(Path(source), path) for source in sources for path in fmt.files(Path(source))]  # errors before writing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = ImportReport(fmt.name, [str(s) for s in sources], str(out))
    seen: set[bytes] = set()
    writer = _JsonListWriter(out / "train.json")
    with (out / "dropped.jsonl").open("w", encoding="utf-8") as dropped:
        def drop(read: Read, kind: str, why: str) -> None:
            item = {"where": read.where, "title": (read.record or {}).get("title"), "dropped": kind, "why": why}
            dropped.write(json.dumps(item, ensure_ascii=False) + "\n")
            if len(report.dropped) < 1000:  # the console shows a few; the file holds them all
                report.dropped.append(item)

        for source, path in files:
            for read in fmt.read(source, path, emotion_from_tags):
                report.read += 1
                if read.record is None:
                    report.malformed[read.problem] += 1
                    drop(read, "malformed", read.problem)
                elif exclude is not None and (found := exclude.find(read.record["title"], read.record["author"],
                                                                     read.record["content"])):
                    report.contaminated += 1
                    drop(read, "contaminated", str(found))
                elif (key := _fingerprint(read.record)) in seen:
                    report.duplicates += 1
                    drop(read, "duplicate", "the same title, text and translation as a record already kept")
                else:
                    seen.add(key)
                    writer.write(read.record)
                    report.kept += 1
    writer.close()
    _write_record(fmt, report, exclude)
    return report


def _write_record(fmt: Format, report: ImportReport, exclude: OverlapIndex | None) -> None:
    declared = {
        "format": fmt.name, "inputs": report.inputs, "licence": fmt.licence, "feeds": fmt.feeds,
        "converted": "traditional characters to simplified (OpenCC t2s)" if fmt.traditional else "none",
        "decontaminated": f"against {len(exclude)} poems" if exclude is not None else "no (--no-exclude)",
        "counts": {"read": report.read, "kept": report.kept, "contaminated": report.contaminated,
                   "malformed": sum(report.malformed.values()), "duplicates": report.duplicates},
        "malformed": dict(report.malformed.most_common()),
    }
    (Path(report.out) / IMPORT_RECORD).write_text(json.dumps(declared, ensure_ascii=False, indent=1) + "\n",
                                                  encoding="utf-8")

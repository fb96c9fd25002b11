"""Data problems as values: each names file, record and field, so a bad file never surfaces as a traceback."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Issue:
    file: str
    record: int | None  # 0-based index into the file's list; for JSONL the 1-based line
    field: str | None
    message: str
    record_label: str = "record"

    def __str__(self) -> str:
        where = self.file if self.record is None else f"{self.file}:{self.record_label} {self.record}"
        field = f"field '{self.field}': " if self.field else ""
        return f"{where}: {field}{self.message}"

    @property
    def kind(self) -> str:
        """Issue class without the specifics, for counting reasons when records are skipped."""
        return f"field '{self.field}': {self.message}" if self.field else self.message


class DataError(Exception):
    """One or more invalid inputs. `str()` lists each as `file:record N: field 'x': what is wrong`."""

    MAX_LISTED = 20

    def __init__(self, issues: list[Issue]):
        self.issues = list(issues)
        lines = [str(issue) for issue in self.issues[: self.MAX_LISTED]]
        if len(self.issues) > self.MAX_LISTED:
            lines.append(f"... and {len(self.issues) - self.MAX_LISTED} more problems")
        super().__init__("\n".join(lines))

    def one_line(self) -> str:
        """The first problem, which names file, record and field and is enough to act on, and how many more: a CLI's
        `error:` line, where the full list would flood the terminal."""
        more = len(self.issues) - 1
        return f"{self.issues[0]}" + (f" (and {more} more problems)" if more else "")


@dataclass
class Loaded:
    """Records that passed validation, and what was skipped (only under `on_invalid: skip`)."""

    records: list
    skipped: list[Issue] = field(default_factory=list)
    skipped_records: int = 0

    def summary(self, what: str = "records") -> str:
        text = f"loaded {len(self.records)} {what}"
        if self.skipped_records:
            reasons = Counter(issue.kind for issue in self.skipped)
            listed = "; ".join(f"{n}x {reason}" for reason, n in reasons.most_common())
            text += f", skipped {self.skipped_records} invalid ({listed})"
        return text

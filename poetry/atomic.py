"""Writing under a temporary name and renaming when done, so that a crash or an error never leaves a half-written
file or directory under the final name (where a resume, a cache check or a reader would take it for complete)."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(final: str | Path, temporary: str | Path | None = None) -> Iterator[Path]:
    """Yield a fresh empty directory beside `final` (default `.NAME.tmp`); it replaces `final` when the block
    completes and is removed when the block raises, leaving `final` as it was."""
    final = Path(final)
    temporary = Path(temporary) if temporary else final.with_name(f".{final.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)  # left by a crashed run
    temporary.mkdir(parents=True)
    try:
        yield temporary
        shutil.rmtree(final, ignore_errors=True)  # a directory cannot be renamed onto a non-empty one
        os.replace(temporary, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | Path, temporary: str | Path | None = None) -> Iterator[Path]:
    """Yield a path beside `final` (default `NAME.tmp`) to write; it replaces `final` when the block completes and
    is deleted when the block raises."""
    final = Path(final)
    temporary = Path(temporary) if temporary else final.with_name(f"{final.name}.tmp")
    try:
        yield temporary
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding=encoding)

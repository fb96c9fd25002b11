"""Models this project builds or unpacks itself: tiny random ones for tests and smoke runs, the embedded
Gemma-3-270M. `model.path: builtin:NAME` in a config names one of them; it is built into the cache on first use."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


def cache_root() -> Path:
    return Path(os.environ.get("POETRY_SFT_CACHE", Path.home() / ".cache" / "poetry-sft"))


def _tiny(name: str) -> Path:
    from .tiny import build_tiny

    final = cache_root() / name
    if not (final / "config.json").is_file():  # written last by save_pretrained's caller below
        temporary = final.with_name(f".{name}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        build_tiny(temporary, arch=name.removeprefix("tiny-"))
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
    return final


def _gemma270m(name: str) -> Path:
    from .gemma270m import ensure_gemma270m

    return ensure_gemma270m()


BUILTINS = {**{f"tiny-{arch}": _tiny for arch in ("qwen3", "qwen2", "llama", "gemma3")}, "gemma-3-270m": _gemma270m}


def resolve_model_path(path: str) -> str:
    """A local directory or hub id as given; `builtin:NAME` built (once) into the cache and returned as a path."""
    if not path:
        raise FileNotFoundError("model.path is empty: give a local model directory or builtin:NAME "
                                f"({', '.join(BUILTINS)})")
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
        raise FileNotFoundError(f"model.path {path}: unknown built-in model; choose one of "
                                f"{', '.join(BUILTIN_PREFIX + n for n in BUILTINS)}")
    return str(BUILTINS[name](name))

"""Models this project builds or unpacks itself: tiny random ones for tests and smoke runs, the embedded
Gemma-3-270M. `model.path: builtin:NAME` in a config names one of them; it is built into the cache on first use."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..atomic import atomic_dir

BUILTIN_PREFIX = "builtin:"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # org/name, the only form a hub download could take


def cache_root() -> Path:
    return Path(os.environ.get("POETRY_SFT_CACHE", Path.home() / ".cache" / "poetry-sft"))


def _tiny(name: str) -> Path:
    from .tiny import build_tiny

    final = cache_root() / name
    if not (final / "config.json").is_file():  # the directory appears only complete, so config.json marks it
        with atomic_dir(final) as temporary:
            build_tiny(temporary, arch=name.removeprefix("tiny-"))
    return final


def _gemma270m(name: str) -> Path:
    from .gemma270m import ensure_gemma270m

    return ensure_gemma270m()


BUILTINS = {**{f"tiny-{arch}": _tiny for arch in ("qwen3", "qwen2", "llama", "gemma3")}, "gemma-3-270m": _gemma270m}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_local_model(path: str, key: str = "model.path") -> None:
    """Fail with one line naming `key` when `path` is neither a model directory nor a hub id that could be
    downloaded; without this the hub client answers a mistyped path with "Repo id must be in the form ...".
    The error is a FileNotFoundError: the CLIs turn it into one `error:` line and exit code 2."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{key}={path}: not a model directory (no config.json)")
        return
    if hub_offline():
        raise FileNotFoundError(f"{key}={path}: no such directory (and HF_HUB_OFFLINE=1, so no hub download)")
    if not HUB_ID.match(path) or ".." in path:
        raise FileNotFoundError(f"{key}={path}: no such directory (nor a hub id, which looks like org/name)")


def resolve_model_path(path: str, key: str = "model.path") -> str:
    """A local directory or hub id as given (checked: see check_local_model); `builtin:NAME` built (once) into the
    cache and returned as a path."""
    if not path:
        raise FileNotFoundError(f"{key} is empty: give a local model directory or builtin:NAME "
                                f"({', '.join(BUILTINS)})")
    if not path.startswith(BUILTIN_PREFIX):
        check_local_model(path, key)
        return path
    name = path[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
        raise FileNotFoundError(f"{key}={path}: unknown built-in model; choose one of "
                                f"{', '.join(BUILTIN_PREFIX + n for n in BUILTINS)}")
    return str(BUILTINS[name](name))

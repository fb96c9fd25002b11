"""Write-then-rename: the final name only ever holds complete content."""
import pytest

from poetry.atomic import atomic_dir, atomic_file, atomic_write_text


def test_directory_replaces_the_final_one_when_complete(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    (tmp_path / ".out.tmp").mkdir()  # left by a crashed run
    (tmp_path / ".out.tmp" / "stale.txt").write_text("stale")
    with atomic_dir(final) as temporary:
        assert temporary == tmp_path / ".out.tmp" and not any(temporary.iterdir())
        (temporary / "new.txt").write_text("new")
        assert (final / "old.txt").is_file()  # untouched until the block completes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_failed_directory_leaves_the_final_one_and_no_temporary(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_dir(final, tmp_path / "out.tmp-1") as temporary:
            (temporary / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (final / "old.txt").read_text() == "old"


def test_file_is_replaced_only_when_complete(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_file(path, tmp_path / "metrics.jsonl.partial") as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    atomic_write_text(path, "新\n")
    assert path.read_text(encoding="utf-8") == "新\n" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]

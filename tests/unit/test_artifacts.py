"""The artifact cache: keys follow inputs, builds are atomic and happen once."""

from pathlib import Path

import pytest

from cube import artifacts


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CUBE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_digest_follows_file_contents_and_order(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_text("one")
    first = artifacts.digest([a, "x"])
    assert artifacts.digest([a, "x"]) == first
    assert artifacts.digest(["x", a]) != first
    a.write_text("two")
    assert artifacts.digest([a, "x"]) != first


def test_digest_distinguishes_strings_from_bytes() -> None:
    assert artifacts.digest(["abc"]) != artifacts.digest([b"abc"])


def test_ensure_built_builds_once() -> None:
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "thing").write_text("made")

    first = artifacts.ensure_built("demo", "k1", build)
    second = artifacts.ensure_built("demo", "k1", build)
    assert first == second == artifacts.artifact_dir("demo", "k1")
    assert (first / "thing").read_text() == "made"
    assert len(calls) == 1
    assert artifacts.is_built("demo", "k1")


def test_failed_build_leaves_nothing_behind(_cache: Path) -> None:
    def build(out: Path) -> None:
        (out / "half").write_text("partial")
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError):
        artifacts.ensure_built("demo", "k2", build)
    assert not artifacts.is_built("demo", "k2")
    leftovers = [p.name for p in (_cache / "demo").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []

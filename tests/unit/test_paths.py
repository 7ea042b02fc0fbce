"""Cache and data dir resolution: environment first, then checkout, then per-user defaults."""

from pathlib import Path

import pytest

from cube import paths


def test_env_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUBE_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("CUBE_DATA_DIR", str(tmp_path / "d"))
    assert paths.cache_dir() == tmp_path / "c"
    assert paths.data_dir() == tmp_path / "d"


def test_checkout_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CUBE_CACHE_DIR", raising=False)
    monkeypatch.delenv("CUBE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert paths.cache_dir() == tmp_path / "cube"
    assert paths.is_checkout()
    assert paths.data_dir() == paths.CHECKOUT_DIR / "snapshots"

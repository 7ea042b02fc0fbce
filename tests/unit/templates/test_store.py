"""The template store: metadata written atomically, status transitions, lookups by name and id,
corrupt metadata refused with a message that names the file, the daemon's catalog view."""

from __future__ import annotations

from pathlib import Path

import pytest

from cube.pool.template import BUILD_PREFIX, META_FILE, Template, TemplateError, TemplateStore

FIELDS = {"source": "debian", "cpus": 2, "memory_mb": 512}


@pytest.fixture
def store(tmp_path: Path) -> TemplateStore:
    return TemplateStore(tmp_path / "templates")


def _begin(store: TemplateStore, name: str = "base"):  # type: ignore[no-untyped-def]
    with store.building(name):
        return store.begin(name, **FIELDS)


def test_begin_then_ready(store: TemplateStore) -> None:
    template = _begin(store)
    assert template.status == "building"
    assert store.get("base") == template
    assert store.get(template.id) == template
    ready = store.update(template, "ready", envd_version="0.2.0", disk_mb=900)
    assert store.get("base").status == "ready"
    assert store.get("base").envd_version == "0.2.0"
    assert [t.name for t in store.list()] == ["base"]
    build = Path(ready.rootfs).parent
    assert build.parent == store.root / "base" and build.name.startswith(BUILD_PREFIX)
    assert Path(ready.snapshot).parent == build
    assert sorted(p.name for p in (store.root / "base").iterdir()) == [build.name, META_FILE]


@pytest.mark.parametrize(("first", "then"), [("ready", "error"), ("error", "ready"),
                                             ("ready", "building")])  # fmt: skip
def test_only_building_moves_on(store: TemplateStore, first: str, then: str) -> None:
    template = store.update(_begin(store), first)  # type: ignore[arg-type]
    with pytest.raises(TemplateError, match=f"{first} -> {then}"):
        store.update(template, then)  # type: ignore[arg-type]


def _finished(store: TemplateStore) -> Template:
    """A build that got as far as its snapshot."""
    template = store.update(_begin(store), "ready")
    Path(template.snapshot).mkdir()
    return template


def test_rebuild_keeps_the_id_and_finished_builds(store: TemplateStore) -> None:
    first = _finished(store)
    failed = store.update(_begin(store), "error")  # no snapshot: nothing can need it
    second = _begin(store)
    assert second.id == first.id and second.status == "building"
    assert Path(first.snapshot).is_dir()  # paused sandboxes may name it as their parent
    assert not Path(failed.rootfs).parent.exists()


def test_prune_keeps_current_and_needed_builds(store: TemplateStore) -> None:
    needed, unneeded, current = _finished(store), _finished(store), _finished(store)
    removed = store.prune({Path(needed.snapshot)})
    assert removed == [Path(unneeded.snapshot).parent]
    assert Path(needed.snapshot).is_dir() and Path(current.snapshot).is_dir()
    assert store.get("base") == current


def test_concurrent_build_and_remove_are_refused(store: TemplateStore) -> None:
    _begin(store)
    with store.building("base"):
        with pytest.raises(TemplateError, match="being built"), store.building("base"):
            pass
        with pytest.raises(TemplateError, match="being built"):
            store.remove("base")
    assert store.remove("base") == "base"
    with pytest.raises(TemplateError, match="no template"):
        store.get("base")


def test_remove_by_id(store: TemplateStore) -> None:
    template = _begin(store, "other")
    assert store.remove(template.id) == "other"
    assert store.list() == []


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"name": "base"}', b"[]"])
def test_corrupt_metadata_is_refused_clearly(store: TemplateStore, content: bytes) -> None:
    _begin(store)
    (store.root / "base" / META_FILE).write_bytes(content)
    with pytest.raises(TemplateError, match="corrupt template metadata") as error:
        store.get("base")
    assert str(store.root / "base" / META_FILE) in str(error.value)
    with pytest.raises(TemplateError, match="corrupt"):
        store.list()
    assert store.lookup("base") is None
    assert store.remove("base") == "base"  # a corrupt template can still be removed by name


def test_metadata_naming_another_template_is_refused(store: TemplateStore) -> None:
    _begin(store)
    (store.root / "base").rename(store.root / "copy")
    with pytest.raises(TemplateError, match="names template 'base'"):
        store.get("copy")


def test_atomic_write_leaves_no_temporary_files(store: TemplateStore) -> None:
    template = _begin(store)
    for _ in range(3):
        template = store.update(template, "ready") if template.status == "building" else template
    files = [p.name for p in (store.root / "base").iterdir() if p.is_file()]
    assert files == [META_FILE]


@pytest.mark.parametrize("name", ["", "Base", "a/b", "..", "-x", "a" * 64, "x y"])
def test_bad_names(store: TemplateStore, name: str) -> None:
    with pytest.raises(TemplateError, match="bad template name"), store.building(name):
        pass


def test_catalog_view(store: TemplateStore) -> None:
    template = _begin(store, "code-interpreter-v1")
    building = store.lookup("code-interpreter-v1")
    assert building is not None and building.image is None and building.status == "building"
    store.update(template, "ready", envd_version="0.2.0", disk_mb=2048)
    info = store.lookup(template.id)
    assert info is not None and info.image is not None
    assert info.alias == "code-interpreter-v1"
    assert info.image.folder == Path(template.snapshot)
    assert (info.image.resources.cpu_count, info.image.resources.memory_mb) == (2, 512)
    assert info.image.resources.disk_mb == 2048
    assert store.lookup("missing") is None

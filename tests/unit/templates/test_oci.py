"""The OCI importer on synthetic images: both image forms, compressions, whiteouts, the image
config, and refusal of every way a layer could reach outside the build folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cube.pool import oci
from cube.pool.layers import LayerError, apply_layer, in_root
from tests.unit.templates.images import (
    Entry,
    compress,
    docker_save,
    image_config,
    layer_tar,
    oci_layout,
)

BASE = [
    Entry("etc/", "dir"),
    Entry("etc/os-release", data=b"ID=test\n"),
    Entry("usr/bin/", "dir"),
    Entry("usr/bin/tool", data=b"#!/bin/sh\n", mode=0o4755),
    Entry("bin", "symlink", link="usr/bin"),
    Entry("app/", "dir"),
    Entry("app/old.txt", data=b"old"),
    Entry("app/keep/", "dir"),
    Entry("app/keep/a", data=b"a"),
    Entry("gone.txt", data=b"x"),
]


def _import(tmp_path: Path, source: Path) -> tuple[Path, oci.ImageConfig]:
    tree, scratch = tmp_path / "tree", tmp_path / "scratch"
    tree.mkdir(exist_ok=True)
    scratch.mkdir(exist_ok=True)
    return tree, oci.import_image(source, tree, scratch, log=lambda _: None)


@pytest.mark.parametrize("how", ["plain", "gzip", "zstd"])
def test_docker_save_tarball_with_each_compression(tmp_path: Path, how: str) -> None:
    if how == "zstd" and shutil.which("zstd") is None:
        pytest.skip("no zstd command")
    layers = [
        compress(layer_tar(BASE), how),
        compress(layer_tar([Entry("app/new", data=b"n")]), how),
    ]
    source = docker_save(tmp_path / "image.tar", layers, image_config())
    tree, _ = _import(tmp_path, source)
    assert (tree / "etc/os-release").read_bytes() == b"ID=test\n"
    assert (tree / "app/new").read_bytes() == b"n"
    assert os.readlink(tree / "bin") == "usr/bin"
    assert (tree / "usr/bin/tool").stat().st_mode & 0o7777 == 0o4755


@pytest.mark.parametrize("nested", [False, True])
def test_oci_layout_follows_index_to_the_amd64_manifest(tmp_path: Path, nested: bool) -> None:
    source = oci_layout(tmp_path / "layout", [compress(layer_tar(BASE), "gzip")],
                        image_config(), nested=nested)  # fmt: skip
    tree, _ = _import(tmp_path, source)
    assert (tree / "app/keep/a").read_bytes() == b"a"


def test_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    upper = [
        # the opaque marker comes after a same-layer entry: it still only hides lower content
        Entry("app/fresh", data=b"f"),
        Entry("app/.wh..wh..opq"),
        Entry(".wh.gone.txt"),
        Entry("etc/.wh.os-release"),
        Entry("etc/os-release2", data=b"2"),
    ]
    source = docker_save(tmp_path / "i.tar", [layer_tar(BASE), layer_tar(upper)], image_config())
    tree, _ = _import(tmp_path, source)
    assert sorted(p.name for p in (tree / "app").iterdir()) == ["fresh"]
    assert not (tree / "gone.txt").exists()
    assert not (tree / "etc/os-release").exists()
    assert (tree / "etc/os-release2").read_bytes() == b"2"
    assert not any(p.name.startswith(".wh.") for p in tree.rglob("*"))


def test_later_layers_replace_files_dirs_and_symlinks(tmp_path: Path) -> None:
    upper = [Entry("gone.txt", "dir"), Entry("app/old.txt", "symlink", link="keep/a"),
             Entry("bin/extra", data=b"e")]  # fmt: skip
    source = docker_save(tmp_path / "i.tar", [layer_tar(BASE), layer_tar(upper)], image_config())
    tree, _ = _import(tmp_path, source)
    assert (tree / "gone.txt").is_dir()
    assert (tree / "app/old.txt").read_bytes() == b"a"
    # bin -> usr/bin: a write below the symlink lands where the guest will look for it
    assert (tree / "usr/bin/extra").read_bytes() == b"e"


def test_image_config_env_workdir_user(tmp_path: Path) -> None:
    config = image_config(["PATH=/usr/local/bin:/usr/bin", "A=b=c"], "/srv/app", "app:app")
    source = docker_save(tmp_path / "i.tar", [layer_tar(BASE)], config)
    _, parsed = _import(tmp_path, source)
    assert parsed == oci.ImageConfig(
        env={"PATH": "/usr/local/bin:/usr/bin", "A": "b=c"}, workdir="/srv/app", user="app"
    )


@pytest.mark.parametrize(
    "config",
    [
        {"config": {"Env": ["NOEQUALS"]}},
        {"config": {"WorkingDir": "relative"}},
        {"config": {"User": 5}},
    ],
)
def test_malformed_image_config_is_refused(config: dict) -> None:
    with pytest.raises(oci.ImageError):
        oci.parse_config(config)


def test_hard_links_and_fifos_inside_the_tree(tmp_path: Path) -> None:
    layer = [*BASE, Entry("app/hard", "hardlink", link="app/keep/a"), Entry("app/pipe", "fifo"),
             Entry("dev/null", "chr")]  # fmt: skip
    source = docker_save(tmp_path / "i.tar", [layer_tar(layer)], image_config())
    tree, _ = _import(tmp_path, source)
    assert (tree / "app/hard").stat().st_ino == (tree / "app/keep/a").stat().st_ino
    assert (tree / "app/pipe").is_fifo()
    assert not (tree / "dev/null").exists()  # device nodes are skipped: /dev is devtmpfs


ATTACKS = {
    "absolute path": [Entry("/etc/evil", data=b"x")],
    "dot-dot path": [Entry("app/../../evil", data=b"x")],
    "escaping relative symlink": [Entry("app/up", "symlink", link="../../../outside")],
    "hard link outside by dot-dot": [Entry("h", "hardlink", link="../outside/secret")],
    "hard link to an absolute path": [Entry("h", "hardlink", link="/outside/secret")],
    "whiteout climbing out": [Entry("app/.wh...")],
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_traversal_attacks_are_refused(tmp_path: Path, attack: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    source = docker_save(tmp_path / "i.tar", [layer_tar(BASE), layer_tar(ATTACKS[attack])],
                         image_config())  # fmt: skip
    with pytest.raises(oci.ImageError):
        _import(tmp_path, source)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "host secret"
    assert not (tmp_path / "evil").exists()


def test_absolute_symlinks_are_read_inside_the_tree(tmp_path: Path) -> None:
    """A symlink to / or to a host path, then members below it: they land inside the tree, and
    a hard link through such a symlink links the tree's file, not the host's."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    layer = [
        Entry("root", "symlink", link="/"),
        Entry("host", "symlink", link=str(outside)),
        Entry("root/etc/planted", data=b"p"),
        Entry("host/secret", data=b"tree copy"),
        Entry("h", "hardlink", link="host/secret"),
    ]
    source = docker_save(tmp_path / "i.tar", [layer_tar(layer)], image_config())
    tree, _ = _import(tmp_path, source)
    assert (tree / "etc/planted").read_bytes() == b"p"
    assert (outside / "secret").read_text() == "host secret"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    inside = tree.joinpath(*str(outside).strip("/").split("/"), "secret")
    assert inside.read_bytes() == b"tree copy"
    assert (tree / "h").stat().st_ino == inside.stat().st_ino


def test_in_root_clamps_dot_dot_symlink_chains(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    os.symlink("../../../../..", tree / "a" / "up")
    assert in_root(tree, ["a", "up", "etc", "x"]) == tree / "etc" / "x"
    os.symlink("loop2", tree / "loop1")
    os.symlink("loop1", tree / "loop2")
    with pytest.raises(LayerError):
        in_root(tree, ["loop1", "x"])


def test_blob_digest_mismatch_is_refused(tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "layout", [layer_tar(BASE)], image_config())
    manifest_blobs = sorted((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    largest = manifest_blobs[-1]  # the layer
    largest.write_bytes(largest.read_bytes()[:-1] + b"\x01")
    with pytest.raises(oci.ImageError, match="digest"):
        _import(tmp_path, layout)


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(oci.ImageError, match="neither"):
        _import(tmp_path, tmp_path / "folder")
    (tmp_path / "file").write_text("nope")
    with pytest.raises(oci.ImageError, match="not a tar"):
        _import(tmp_path, tmp_path / "file")


def test_manifest_naming_files_outside_the_image_is_refused(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "manifest.json").write_text(json.dumps([{"Config": "../config.json", "Layers": []}]))
    with pytest.raises(oci.ImageError, match="outside"):
        _import(tmp_path, layout)


def test_broken_tar_layer(tmp_path: Path) -> None:
    source = docker_save(tmp_path / "i.tar", [b"this is not a tar" * 100], image_config())
    with pytest.raises(oci.ImageError):
        _import(tmp_path, source)


def test_apply_layer_returns_skipped_devices(tmp_path: Path) -> None:
    (tmp_path / "l.tar").write_bytes(layer_tar([Entry("dev/x", "chr"), Entry("f", data=b"1")]))
    (tmp_path / "t").mkdir()
    assert apply_layer(tmp_path / "t", tmp_path / "l.tar") == 1

"""Layered copy-on-write disks: the base and frozen layers never change, clones never meet."""

import os
from pathlib import Path

import pytest

from cube.vmm.disk import CHUNK, DiskError, LayeredDisk


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(bytes(range(256)) * (64 * CHUNK // 256))
    os.chmod(path, 0o444)
    return path


def test_reads_fall_through_to_the_base(base: Path, tmp_path: Path) -> None:
    disk = LayeredDisk.open(base, [], tmp_path / "a.overlay")
    assert disk.read(100, 50) == base.read_bytes()[100:150]
    disk.close()


def test_partial_write_copies_the_chunk_up_and_leaves_base_alone(
    base: Path, tmp_path: Path
) -> None:
    original = base.read_bytes()
    disk = LayeredDisk.open(base, [], tmp_path / "a.overlay")
    disk.write(CHUNK + 512, b"X" * 512)
    expected = bytearray(original)
    expected[CHUNK + 512 : CHUNK + 1024] = b"X" * 512
    assert disk.read(0, len(original)) == bytes(expected)
    assert base.read_bytes() == original
    disk.close()


def test_clones_of_one_base_are_isolated(base: Path, tmp_path: Path) -> None:
    a = LayeredDisk.open(base, [], tmp_path / "a.overlay")
    b = LayeredDisk.open(base, [], tmp_path / "b.overlay")
    a.write(0, b"A" * CHUNK)
    assert b.read(0, 4) == bytes(range(4))
    assert a.read(0, 4) == b"AAAA"
    a.close()
    b.close()


def test_frozen_layer_stacks_under_a_new_overlay(base: Path, tmp_path: Path) -> None:
    first = LayeredDisk.open(base, [], tmp_path / "frozen.overlay")
    first.write(2 * CHUNK, b"F" * 1024)
    first.save_chunk_map(tmp_path / "frozen.overlay.map")
    first.close()
    second = LayeredDisk.open(base, [tmp_path / "frozen.overlay"], tmp_path / "top.overlay")
    assert second.read(2 * CHUNK, 2) == b"FF"
    second.write(2 * CHUNK + 1, b"T")
    assert second.read(2 * CHUNK, 3) == b"FTF"
    assert second.read(0, 2) == bytes(range(2))
    second.close()
    third = LayeredDisk.open(base, [tmp_path / "frozen.overlay"], tmp_path / "other.overlay")
    assert third.read(2 * CHUNK, 3) == b"FFF"
    third.close()


def test_out_of_range_and_bad_maps_are_refused(base: Path, tmp_path: Path) -> None:
    disk = LayeredDisk.open(base, [], tmp_path / "a.overlay")
    with pytest.raises(DiskError):
        disk.read(disk.size - 1, 2)
    with pytest.raises(DiskError):
        disk.write(-512, b"x")
    disk.close()
    (tmp_path / "bad.overlay").write_bytes(b"")
    (tmp_path / "bad.overlay.map").write_bytes(b"\0")
    with pytest.raises(DiskError, match="chunk map"):
        LayeredDisk.open(base, [tmp_path / "bad.overlay"], tmp_path / "c.overlay")
    assert not (tmp_path / "c.overlay").exists()


def test_overlay_is_never_reused(base: Path, tmp_path: Path) -> None:
    LayeredDisk.open(base, [], tmp_path / "a.overlay").close()
    with pytest.raises(FileExistsError):
        LayeredDisk.open(base, [], tmp_path / "a.overlay")

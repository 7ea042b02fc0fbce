"""sandbox.files through the real E2B SDK against the host-mode agent."""

from __future__ import annotations

import io
import os

import pytest
from e2b import (
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry

from tests.unit.agent.harness import Agent


def test_write_and_read_text_bytes_and_stream(agent: Agent, sandbox: Sandbox, name: str) -> None:
    info = sandbox.files.write(f"{name}/deep/a.txt", "héllo")
    assert (info.name, info.type, info.path) == (
        "a.txt",
        FileType.FILE,
        f"{agent.user_home}/{name}/deep/a.txt",
    )
    assert sandbox.files.read(f"{name}/deep/a.txt") == "héllo"
    payload = bytes(range(256)) * 1000
    sandbox.files.write(f"{name}/b.bin", payload)
    assert sandbox.files.read(f"{name}/b.bin", format="bytes") == payload
    assert b"".join(sandbox.files.read(f"{name}/b.bin", format="stream")) == payload


def test_write_overwrites(sandbox: Sandbox, name: str) -> None:
    sandbox.files.write(name, "a much longer first version")
    sandbox.files.write(name, "short")
    assert sandbox.files.read(name) == "short"


def test_streamed_and_gzip_uploads_and_downloads(sandbox: Sandbox, name: str) -> None:
    data = os.urandom(300_000)
    sandbox.files.write(f"{name}/stream.bin", io.BytesIO(data))
    assert sandbox.files.read(f"{name}/stream.bin", format="bytes") == data
    sandbox.files.write(f"{name}/chunks.bin", iter([data[:1000], data[1000:]]))
    assert sandbox.files.read(f"{name}/chunks.bin", format="bytes", gzip=True) == data
    sandbox.files.write(f"{name}/gz.txt", "zipped " * 1000, gzip=True)
    assert sandbox.files.read(f"{name}/gz.txt", gzip=True) == "zipped " * 1000


def test_write_files_multi(agent: Agent, sandbox: Sandbox, name: str) -> None:
    entries = [
        WriteEntry(path=f"{name}/one.txt", data="1"),
        WriteEntry(path=f"{name}/2/two", data=b"2"),
    ]
    infos = sandbox.files.write_files(entries)
    assert [i.path for i in infos] == [
        f"{agent.user_home}/{name}/one.txt",
        f"{agent.user_home}/{name}/2/two",
    ]
    assert sandbox.files.read(f"{name}/2/two") == "2"


def test_list_with_depth(sandbox: Sandbox, name: str) -> None:
    sandbox.files.write(f"{name}/a/b/c.txt", "x")
    sandbox.files.write(f"{name}/top.txt", "x")
    assert sorted(e.name for e in sandbox.files.list(name)) == ["a", "top.txt"]
    deep = sorted(e.path.split(name + "/", 1)[1] for e in sandbox.files.list(name, depth=3))
    assert deep == ["a", "a/b", "a/b/c.txt", "top.txt"]
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(f"{name}/missing")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(f"{name}/top.txt")


def test_exists_make_dir_remove_rename(sandbox: Sandbox, name: str) -> None:
    assert not sandbox.files.exists(name)
    assert sandbox.files.make_dir(f"{name}/x/y")
    assert not sandbox.files.make_dir(f"{name}/x/y")
    assert sandbox.files.exists(f"{name}/x/y")
    sandbox.files.write(f"{name}/f.txt", "data")
    moved = sandbox.files.rename(f"{name}/f.txt", f"{name}/new/g.txt")
    assert moved.name == "g.txt" and moved.type == FileType.FILE
    assert not sandbox.files.exists(f"{name}/f.txt")
    with pytest.raises(NotFoundException):
        sandbox.files.rename(f"{name}/f.txt", f"{name}/h.txt")
    sandbox.files.remove(name)
    assert not sandbox.files.exists(name)
    sandbox.files.remove(name)  # removing what is gone is fine, as in envd


def test_get_info(agent: Agent, sandbox: Sandbox, name: str) -> None:
    sandbox.files.write(f"{name}/file.txt", "test")
    info = sandbox.files.get_info(f"{name}/file.txt")
    assert (info.name, info.type, info.size, info.mode, info.permissions) == (
        "file.txt",
        FileType.FILE,
        4,
        0o644,
        "-rw-r--r--",
    )
    assert info.path == f"{agent.user_home}/{name}/file.txt"
    assert info.modified_time is not None
    directory = sandbox.files.get_info(name)
    assert (directory.type, directory.mode, directory.permissions) == (
        FileType.DIR,
        0o755,
        "drwxr-xr-x",
    )
    os.symlink(f"{agent.user_home}/{name}/file.txt", agent.user_home / name / "link")
    link = sandbox.files.get_info(f"{name}/link")
    assert link.type == FileType.FILE  # the target's type, as upstream envd reports it
    assert link.symlink_target == f"{agent.user_home}/{name}/file.txt"
    with pytest.raises(NotFoundException):
        sandbox.files.get_info(f"{name}/nope")


def test_metadata_round_trip_and_replace(sandbox: Sandbox, name: str) -> None:
    written = sandbox.files.write(name, "x", metadata={"Owner": "alice", "tag": "v1"})
    assert written.metadata == {"owner": "alice", "tag": "v1"}
    assert sandbox.files.get_info(name).metadata == {"owner": "alice", "tag": "v1"}
    sandbox.files.write(name, "y", metadata={"tag": "v2"})
    assert sandbox.files.get_info(name).metadata == {"tag": "v2"}
    sandbox.files.write(name, "z")
    assert sandbox.files.get_info(name).metadata is None


def test_read_errors(sandbox: Sandbox, name: str) -> None:
    with pytest.raises(FileNotFoundException, match="does not exist"):
        sandbox.files.read(f"{name}/missing")
    sandbox.files.make_dir(name)
    with pytest.raises(InvalidArgumentException, match="is a directory"):
        sandbox.files.read(name)


def test_files_as_root_use_roots_home(agent: Agent, sandbox: Sandbox, name: str) -> None:
    info = sandbox.files.write(name, "r", user="root")
    assert info.path == f"{agent.root_home}/{name}"
    assert sandbox.files.read(f"~/{name}", user="root") == "r"

"""files.watch_dir: the sync SDK's polling watcher and the async SDK's WatchDir stream."""

from __future__ import annotations

import asyncio

import pytest
from e2b import AsyncSandbox, FilesystemEventType, NotFoundException, Sandbox, SandboxException

from tests.unit.agent.conftest import connect_options
from tests.unit.agent.harness import Agent


def test_watch_reports_create_chmod_write(sandbox: Sandbox, name: str) -> None:
    sandbox.files.make_dir(name)
    handle = sandbox.files.watch_dir(name)
    sandbox.files.write(f"{name}/f.txt", "content")
    events = handle.get_new_events()
    assert [(e.type, e.name) for e in events] == [
        (FilesystemEventType.CREATE, "f.txt"),
        (FilesystemEventType.CHMOD, "f.txt"),
        (FilesystemEventType.WRITE, "f.txt"),
    ]
    sandbox.files.remove(f"{name}/f.txt")
    assert [(e.type, e.name) for e in handle.get_new_events()] == [
        (FilesystemEventType.REMOVE, "f.txt")
    ]
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()


def test_recursive_watch_sees_new_subdirectories(sandbox: Sandbox, name: str) -> None:
    sandbox.files.make_dir(name)
    handle = sandbox.files.watch_dir(name, recursive=True, include_entry=True)
    sandbox.files.make_dir(f"{name}/sub")
    sandbox.files.write(f"{name}/sub/f.txt", "x")
    events = handle.get_new_events()
    writes = [e for e in events if e.type == FilesystemEventType.WRITE]
    assert [e.name for e in writes] == ["sub/f.txt"]
    assert writes[0].entry is not None and writes[0].entry.size == 1
    handle.stop()


def test_watch_errors(sandbox: Sandbox, name: str) -> None:
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir(f"{name}/missing")
    sandbox.files.write(name, "a file")
    with pytest.raises(SandboxException):
        sandbox.files.watch_dir(name)


def test_async_watch_stream(agent: Agent, responder: str, name: str) -> None:
    async def scenario() -> list[tuple[FilesystemEventType, str]]:
        sandbox = await AsyncSandbox.create(**connect_options(agent, responder))
        await sandbox.files.make_dir(name)
        seen: list[tuple[FilesystemEventType, str]] = []
        done = asyncio.Event()

        def on_event(event) -> None:  # type: ignore[no-untyped-def]
            seen.append((event.type, event.name))
            if event.type == FilesystemEventType.WRITE:
                done.set()

        handle = await sandbox.files.watch_dir(name, on_event)
        await sandbox.files.write(f"{name}/f.txt", "content")
        await asyncio.wait_for(done.wait(), 20)
        await handle.stop()
        return seen

    seen = asyncio.run(scenario())
    assert seen[:3] == [
        (FilesystemEventType.CREATE, "f.txt"),
        (FilesystemEventType.CHMOD, "f.txt"),
        (FilesystemEventType.WRITE, "f.txt"),
    ]


def test_watch_allows_network_mounts_flag(sandbox: Sandbox, name: str) -> None:
    sandbox.files.make_dir(name)
    handle = sandbox.files.watch_dir(name, allow_network_mounts=True)
    sandbox.files.make_dir(f"{name}/d")
    assert next((e.type, e.name) for e in handle.get_new_events()) == (
        FilesystemEventType.CREATE,
        "d",
    )
    handle.stop()

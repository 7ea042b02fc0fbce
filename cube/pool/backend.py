"""What the daemon needs from "something that runs sandboxes".

The API, the warm pool and the lifecycle only ever talk to a Backend. The VMM backend runs each
sandbox as a KVM microVM restored from a template snapshot and reaches its agent over vsock;
the process backend (tests, development) runs the same agent as a host process over TCP. Both
speak the relay and control formats of cube/guest/wire.py, so nothing above this interface
knows which one is in use.

Folders are the unit of persistence: a template image, a paused sandbox and a snapshot are each
one directory the backend writes and later starts from. The daemon owns where they live and
their lifetimes; the backend owns what is inside them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar

import msgspec
import trio

from cube.guest.wire import ControlRequest, Reply
from cube.net.addressing import Lease


class Resources(msgspec.Struct, frozen=True, kw_only=True):
    """What a sandbox is given; reported by SandboxDetail as cpuCount/memoryMB/diskSizeMB."""

    cpu_count: int
    memory_mb: int
    disk_mb: int


class Image(msgspec.Struct, frozen=True, kw_only=True):
    """A startable template: its id (for logs and pool keys), resources and snapshot folder."""

    template_id: str
    resources: Resources
    folder: Path
    envd_version: str


class Death(msgspec.Struct, frozen=True):
    """Why a sandbox stopped by itself: one line for its record and the API's errors, and the
    report its log keeps afterwards (for a VM: every vCPU's state, its last exits and the
    console tail; cube.vmm.crash_report)."""

    reason: str
    report: tuple[str, ...] = ()


class BackendError(Exception):
    """The backend could not do what was asked (start, pause, snapshot...). The message is
    safe to show to API clients."""


class PortClosed(BackendError):
    """The sandbox runs but nothing listens on the guest port asked for."""


class Instance(Protocol):
    """One running sandbox as the backend knows it. ``name`` is the backend's own label (a VM
    name or a pid), used only in logs."""

    @property
    def name(self) -> str: ...

    @property
    def resources(self) -> Resources: ...

    @property
    def network(self) -> Lease | None:
        """The network slot the sandbox is attached to, closed until the daemon assigns it;
        None when the sandbox has no network device of its own."""
        ...


class Backend(Protocol):
    """Runs sandboxes. Every method may raise BackendError; none may block the trio loop."""

    async def start(self, image: Image) -> Instance:
        """A fresh sandbox restored from ``image``, its agent answering. The identity is the
        template's until the caller pushes a Refresh."""
        ...

    async def connect(self, instance: Instance, port: int) -> trio.abc.Stream:
        """A byte stream spliced to ``127.0.0.1:port`` inside the guest (the relay's CONNECT).
        Raises PortClosed if the agent answers ERR."""
        ...

    async def control(self, instance: Instance, request: ControlRequest) -> Reply:
        """Send one control message to the agent and return its reply."""
        ...

    async def console(self, instance: Instance, limit: int) -> list[str]:
        """The last ``limit`` lines the guest wrote to its console, oldest first."""
        ...

    async def pause(self, instance: Instance, folder: Path) -> None:
        """Write everything needed to resume into the empty ``folder`` (atomically: a crash
        leaves either no state or complete state) and free the sandbox's resources. The caller
        sends Prepare first."""
        ...

    async def resume(self, folder: Path, memory: bool = True) -> Instance:
        """Bring back a sandbox paused into ``folder``; the folder may then be deleted. Without
        ``memory`` it is rebooted instead (E2B's filesystem-only resume): its files are kept,
        its processes and memory are not."""
        ...

    async def discard(self, folder: Path) -> None:
        """A paused sandbox is being deleted without resuming: free anything still held for
        ``folder`` (the caller then deletes the folder)."""
        ...

    async def fork(self, instance: Instance, count: int) -> list[Instance]:
        """``count`` copies of a running sandbox (memory, disk, processes); the source keeps
        running. Identities are the source's until the caller refreshes each copy."""
        ...

    async def snapshot(self, instance: Instance, folder: Path) -> None:
        """Write a template image of a running sandbox into the empty ``folder``, startable
        with ``start(Image(folder=folder, ...))``; the source keeps running."""
        ...

    async def kill(self, instance: Instance) -> None:
        """Stop the sandbox and free everything it holds. Idempotent."""
        ...

    async def wait_dead(self, instance: Instance) -> Death:
        """Return when the sandbox stops by itself (a crash, the guest powering off), saying
        why. Cancelled by the caller when it kills or pauses the sandbox."""
        ...


AnyInstance = TypeVar("AnyInstance")


async def start_all(
    count: int,
    start: Callable[[], Awaitable[AnyInstance]],
    kill: Callable[[AnyInstance], Awaitable[None]],
) -> list[AnyInstance]:
    """``count`` sandboxes from ``start``, or none: a failure (or cancellation) midway kills
    the ones already started before it propagates. For fork."""
    started: list[AnyInstance] = []
    try:
        for _ in range(count):
            started.append(await start())
    except BaseException:
        with trio.CancelScope(shield=True):
            for instance in started:
                await kill(instance)
        raise
    return started

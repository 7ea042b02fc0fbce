"""A stand-in backend: each sandbox is the guest agent run as a host process.

It exists so the API, proxy, pool and lifecycle can be tested end to end without KVM, below the
layer under test and behind the same Backend Protocol as the VMM. It is honest about what a
process cannot do:

- no isolation: the agent runs as the daemon's user on the host (``--host-mode``), and every
  sandbox shares the host's loopback, so guest ports other than envd's and the interpreter's
  are host ports;
- pause is SIGSTOP of the sandbox's processes and resume SIGCONT, with no memory
  snapshot. After a restart of the daemon the stopped processes are gone, so a resume then
  starts new ones on the same state folder (files survive, processes do not: a cold boot), as
  does a resume without memory;
- fork and snapshot copy the state folder and start new processes: files are copied, running
  processes and interpreter kernels are not.

A template image is a folder holding ``process-template.json`` (whether to run the code
interpreter next to the agent) and optionally ``state/``, the files a new sandbox starts with.
Agents listen on loopback TCP ports picked by the kernel; each sandbox's state (homes, the
agent's state files) is a folder under ``work_dir``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import msgspec
import trio

from cube.guest.wire import ENVD_PORT, INTERPRETER_PORT, ControlRequest, Reply
from cube.pool.agent_link import control_call, relay_handshake, wait_answering
from cube.pool.atomic import read, write_atomic
from cube.pool.backend import BackendError, Death, Image, Resources, start_all
from cube.pool.identity import new_id

log = logging.getLogger(__name__)

CONSOLE_LINES = 1000
READY_TIMEOUT_S = 60.0  # a loaded CI machine may take a while to import an interpreter
POLL_S = 0.05
STATE = "state"  # the state folder inside a template image
TEMPLATE_FILE = "process-template.json"
PAUSE_FILE = "process.json"
LAUNCH_ATTEMPTS = 3


class _DiedAtStart(BackendError):
    pass


class ProcessTemplate(msgspec.Struct, frozen=True):
    interpreter: bool = False  # run the code interpreter (guest port 49999) too


def write_template(folder: Path, template: ProcessTemplate) -> None:
    """Make ``folder`` a template image for this backend."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / TEMPLATE_FILE, template, mode=0o644)


def _read_template(folder: Path) -> ProcessTemplate:
    try:
        return read(folder / TEMPLATE_FILE, ProcessTemplate)
    except FileNotFoundError:
        return ProcessTemplate()
    except (OSError, msgspec.DecodeError) as exc:
        raise BackendError(f"bad process template in {folder}: {exc}") from exc


class _Paused(msgspec.Struct, frozen=True):
    state_dir: str
    resources: Resources
    template: ProcessTemplate


@dataclass(eq=False)
class ProcessInstance:
    state_dir: Path
    resources: Resources
    template: ProcessTemplate
    relay_port: int
    control_port: int
    ports: dict[int, int]  # guest port -> host port, for the services every sandbox runs
    processes: list[trio.Process] = field(default_factory=list)  # the agent first
    console_lines: deque[str] = field(default_factory=lambda: deque(maxlen=CONSOLE_LINES))
    dead: trio.Event = field(default_factory=trio.Event)
    death: str = ""

    @property
    def name(self) -> str:
        return f"agent-pid-{self.processes[0].pid}" if self.processes else "agent-starting"

    @property
    def network(self) -> None:
        """Agents share the host's network: there is no slot, and egress rules are stored but
        not enforced (this backend isolates nothing; it stands in for development)."""
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessBackend:
    def __init__(self, work_dir: Path, python: str = sys.executable) -> None:
        self._work_dir = work_dir
        self._python = python
        self._nursery: trio.Nursery | None = None
        self._instances: set[ProcessInstance] = set()
        self._paused: dict[Path, ProcessInstance] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the per-process tasks; on cancellation kill every sandbox still running."""
        self._work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            for instance in list(self._instances):
                self._signal(instance, signal.SIGKILL)

    # ----- starting sandboxes ---------------------------------------------------------------

    async def start(self, image: Image) -> ProcessInstance:
        source = image.folder / STATE
        return await self._launch_fresh(
            source if source.is_dir() else None, image.resources, _read_template(image.folder)
        )

    async def _launch_fresh(
        self, source: Path | None, resources: Resources, template: ProcessTemplate
    ) -> ProcessInstance:
        """A new sandbox whose files are a copy of ``source``; nothing is left if it fails."""
        state_dir = self._work_dir / new_id(12)
        try:
            if source is not None:
                await trio.to_thread.run_sync(_copy_state, source, state_dir)
            return await self._launch(state_dir, resources, template)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, state_dir, True)
            raise

    async def _launch(
        self, state_dir: Path, resources: Resources, template: ProcessTemplate
    ) -> ProcessInstance:
        """Start the sandbox's processes; retried when they die at once, which is what losing
        the race for a just-freed port looks like (another process bound it first)."""
        for attempt in range(1, LAUNCH_ATTEMPTS):
            try:
                return await self._launch_once(state_dir, resources, template)
            except _DiedAtStart as exc:
                log.warning("sandbox died at start", extra={"attempt": attempt, "error": str(exc)})
        return await self._launch_once(state_dir, resources, template)

    async def _launch_once(
        self, state_dir: Path, resources: Resources, template: ProcessTemplate
    ) -> ProcessInstance:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ports = {ENVD_PORT: _free_port()}
        if template.interpreter:
            ports[INTERPRETER_PORT] = _free_port()
        instance = ProcessInstance(
            state_dir, resources, template, _free_port(), _free_port(), ports
        )
        self._instances.add(instance)
        try:
            await self._spawn(instance, self._agent_command(instance))
            self._watch_agent(instance)
            if template.interpreter:
                await self._spawn(instance, self._interpreter_command(instance))
            await self._wait_ready(instance)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._stop(instance)  # the state folder stays: it may be a resume's
            raise
        return instance

    def _agent_command(self, instance: ProcessInstance) -> list[str]:
        return [
            *(self._python, "-m", "cube.guest.agent"),
            *("--relay", f"tcp:127.0.0.1:{instance.relay_port}"),
            *("--control", f"tcp:127.0.0.1:{instance.control_port}"),
            *("--envd", f"127.0.0.1:{instance.ports[ENVD_PORT]}"),
            *("--state-dir", str(instance.state_dir / "run")),
            *("--host-mode", str(instance.state_dir / "home")),
        ]

    def _interpreter_command(self, instance: ProcessInstance) -> list[str]:
        home = instance.state_dir / "home" / "home" / "user"  # the agent's host-mode layout
        home.mkdir(parents=True, exist_ok=True)
        return [
            *(self._python, "-m", "cube.guest.interpreter"),
            *("--listen", f"127.0.0.1:{instance.ports[INTERPRETER_PORT]}"),
            *("--state-dir", str(instance.state_dir / "run")),
            *("--cwd", str(home)),
        ]

    async def _spawn(self, instance: ProcessInstance, command: list[str]) -> None:
        assert self._nursery is not None, "ProcessBackend.run is not running"
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop/continue/kill reach children
        )
        instance.processes.append(process)
        self._nursery.start_soon(self._pump_console, instance, process)

    def _watch_agent(self, instance: ProcessInstance) -> None:
        """The sandbox lives as long as its agent does."""

        async def reap() -> None:
            code = await instance.processes[0].wait()
            instance.death = f"agent exited with status {code}"
            instance.dead.set()
            self._instances.discard(instance)

        assert self._nursery is not None
        self._nursery.start_soon(reap)

    async def _wait_ready(self, instance: ProcessInstance) -> None:
        control = partial(self.control, instance)
        ready = await wait_answering(control, instance.dead, READY_TIMEOUT_S)
        if ready and instance.template.interpreter:
            ready = await self._wait_listening(instance, instance.ports[INTERPRETER_PORT])
        if not ready:
            tail = " | ".join(list(instance.console_lines)[-5:])
            kind = _DiedAtStart if instance.dead.is_set() else BackendError
            raise kind(f"sandbox did not become ready: {instance.death or 'timeout'} {tail}")

    async def _wait_listening(self, instance: ProcessInstance, port: int) -> bool:
        with trio.move_on_after(READY_TIMEOUT_S):
            while not instance.dead.is_set():
                with contextlib.suppress(OSError):
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    return True
                await trio.sleep(POLL_S)
        return False

    async def _pump_console(self, instance: ProcessInstance, process: trio.Process) -> None:
        assert process.stdout is not None
        pending = b""
        async for chunk in process.stdout:
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            instance.console_lines.extend(line.decode("utf-8", "replace") for line in lines)

    def _signal(self, instance: ProcessInstance, signum: int) -> None:
        """Signal everything the sandbox runs: its process groups, and every process below
        them, since a PTY command has a session (so a group) of its own."""
        live = [process for process in instance.processes if process.returncode is None]
        below = _descendants({process.pid for process in live})
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # ----- talking to agents ----------------------------------------------------------------

    async def _open(self, port: int) -> trio.SocketStream:
        try:
            return await trio.open_tcp_stream("127.0.0.1", port)
        except OSError as exc:
            raise BackendError(f"agent unreachable: {exc}") from exc

    async def connect(self, instance: ProcessInstance, port: int) -> trio.abc.Stream:
        stream = await self._open(instance.relay_port)
        try:
            # Sandboxes share the host's loopback, so their envd and interpreter ports differ.
            await relay_handshake(stream, instance.ports.get(port, port))
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def control(self, instance: ProcessInstance, request: ControlRequest) -> Reply:
        stream = await self._open(instance.control_port)
        try:
            return await control_call(stream, request)
        except trio.BrokenResourceError as exc:
            raise BackendError(f"agent connection broke: {exc}") from exc
        finally:
            await trio.aclose_forcefully(stream)

    async def console(self, instance: ProcessInstance, limit: int) -> list[str]:
        return list(instance.console_lines)[-limit:] if limit > 0 else []

    # ----- lifecycle ------------------------------------------------------------------------

    async def kill(self, instance: ProcessInstance) -> None:
        await self._stop(instance)
        await trio.to_thread.run_sync(shutil.rmtree, instance.state_dir, True)

    async def _stop(self, instance: ProcessInstance) -> None:
        self._signal(instance, signal.SIGKILL)
        for process in instance.processes:
            await process.wait()
        self._instances.discard(instance)

    async def wait_dead(self, instance: ProcessInstance) -> Death:
        await instance.dead.wait()
        return Death(instance.death, (instance.death, "--- console tail ---",
                                      *instance.console_lines))  # fmt: skip

    async def pause(self, instance: ProcessInstance, folder: Path) -> None:
        self._signal(instance, signal.SIGSTOP)
        paused = _Paused(str(instance.state_dir), instance.resources, instance.template)
        await trio.to_thread.run_sync(write_atomic, folder / PAUSE_FILE, paused)
        self._paused[instance.state_dir] = instance

    async def resume(self, folder: Path, memory: bool = True) -> ProcessInstance:
        try:
            paused = read(folder / PAUSE_FILE, _Paused)
        except (OSError, msgspec.DecodeError) as exc:
            raise BackendError(f"no paused sandbox in {folder}: {exc}") from exc
        state_dir = Path(paused.state_dir)
        instance = self._paused.pop(state_dir, None)
        if instance is not None and not instance.dead.is_set():
            if memory:
                self._signal(instance, signal.SIGCONT)
                return instance
            await self._stop(instance)  # its processes go; its state folder stays
        log.info("cold-starting a paused sandbox", extra={"state_dir": str(state_dir)})
        return await self._launch(state_dir, paused.resources, paused.template)

    async def discard(self, folder: Path) -> None:
        try:
            paused = read(folder / PAUSE_FILE, _Paused)
        except (OSError, msgspec.DecodeError):
            return
        state_dir = Path(paused.state_dir)
        instance = self._paused.pop(state_dir, None)
        if instance is not None:
            await self.kill(instance)
        await trio.to_thread.run_sync(shutil.rmtree, state_dir, True)

    async def fork(self, instance: ProcessInstance, count: int) -> list[ProcessInstance]:
        launch = partial(
            self._launch_fresh, instance.state_dir, instance.resources, instance.template
        )
        return await start_all(count, launch, self.kill)

    async def snapshot(self, instance: ProcessInstance, folder: Path) -> None:
        await trio.to_thread.run_sync(_copy_state, instance.state_dir, folder / STATE)
        await trio.to_thread.run_sync(write_template, folder, instance.template)


def _descendants(roots: set[int]) -> set[int]:
    """Every process below ``roots``, from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # it exited while we looked
            continue
        parent = int(stat.rpartition(")")[2].split()[1])  # the name before ")" may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _copy_state(source: Path, target: Path) -> None:
    """Copy files only: sockets and fifos of live processes would not survive a copy."""
    shutil.copytree(source, target, symlinks=True, ignore=_special_files)


def _special_files(folder: str, names: list[str]) -> set[str]:
    special = set()
    for name in names:
        path = os.path.join(folder, name)
        if not (os.path.islink(path) or os.path.isdir(path) or os.path.isfile(path)):
            special.add(name)
    return special

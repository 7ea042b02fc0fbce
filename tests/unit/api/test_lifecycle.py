"""Sandbox lifecycle through the SDK: expiry, pause and connect, fork, snapshots, and what a
restart of the daemon keeps."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from e2b import PtySize, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import SandboxException, SandboxNotFoundException

from cube.pool.atomic import read, write_atomic
from cube.pool.records import SandboxRecord
from tests.unit.api.daemon import Daemon, running_daemon

PATIENCE_S = 30.0  # generous: how long a state change may take before the test gives up


def eventually(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not check():
        assert time.monotonic() < deadline, "state did not change in time"
        time.sleep(0.1)


def state_of(daemon: Daemon, sandbox_id: str) -> str | None:
    response = httpx.get(
        f"{daemon.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": daemon.api_key}
    )
    return response.json()["state"] if response.status_code == 200 else None


def test_expiry_kills(daemon: Daemon) -> None:
    sbx = Sandbox.create(timeout=1, **daemon.opts())
    eventually(lambda: state_of(daemon, sbx.sandbox_id) is None)
    assert not sbx.is_running()
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()


def test_expiry_pauses_when_asked_and_connect_resumes(daemon: Daemon) -> None:
    sbx = Sandbox.create(lifecycle={"on_timeout": "pause"}, **daemon.opts())
    sbx.files.write("kept.txt", "still here")
    sbx.set_timeout(1)
    eventually(lambda: state_of(daemon, sbx.sandbox_id) == "paused")
    assert sbx.get_info().lifecycle == {"auto_resume": False, "on_timeout": "pause"}
    with httpx.Client(base_url=daemon.url, headers={"X-API-Key": daemon.api_key}) as client:
        resumed = client.post(f"/v2/sandboxes/{sbx.sandbox_id}/connect", json={"timeout": 60})
        assert resumed.status_code == 201
    assert sbx.files.read("kept.txt") == "still here"
    sbx.kill()


def test_pause_and_connect(daemon: Daemon) -> None:
    sbx = Sandbox.create(**daemon.opts())
    sbx.files.write("notes.txt", "before pause")
    assert sbx.pause() is True
    assert sbx.pause() is False  # already paused: 409
    assert sbx.get_info().state == SandboxState.PAUSED
    paused = SandboxQuery(state=[SandboxState.PAUSED])
    assert sbx.sandbox_id in [
        s.sandbox_id for s in Sandbox.list(query=paused, **daemon.opts()).next_items()
    ]
    assert sbx.get_metrics() == []
    assert not sbx.is_running()
    with pytest.raises(SandboxNotFoundException):
        sbx.set_timeout(60)

    again = Sandbox.connect(sbx.sandbox_id, **daemon.opts())
    assert again.get_info().state == SandboxState.RUNNING
    assert again.files.read("notes.txt") == "before pause"
    assert again.commands.run("echo alive").stdout == "alive\n"

    with httpx.Client(base_url=daemon.url, headers={"X-API-Key": daemon.api_key}) as client:
        sid = sbx.sandbox_id
        assert client.post(f"/sandboxes/{sid}/resume", json={}).status_code == 409
        assert client.post(f"/sandboxes/{sid}/pause", json={}).status_code == 204
        resumed = client.post(f"/sandboxes/{sid}/resume", json={"timeout": 60})
        assert resumed.status_code == 201 and resumed.json()["sandboxID"] == sid
    again.kill()
    assert Sandbox.kill(sbx.sandbox_id, **daemon.opts()) is False


def test_a_filesystem_only_pause_keeps_files_not_processes(daemon: Daemon) -> None:
    """E2B's keep_memory=False: the resume is a cold start on the paused files."""
    sbx = Sandbox.create(**daemon.opts())
    sbx.files.write("notes.txt", "kept")
    sleeper = sbx.commands.run("sleep 600", background=True)
    assert sbx.pause(keep_memory=False) is True
    again = Sandbox.connect(sbx.sandbox_id, **daemon.opts())
    assert again.files.read("notes.txt") == "kept"
    assert sleeper.pid not in [p.pid for p in again.commands.list()]
    sleeper = again.commands.run("sleep 600", background=True)
    again.pause()  # with memory: the next resume keeps what runs
    again = Sandbox.connect(sbx.sandbox_id, **daemon.opts())
    assert sleeper.pid in [p.pid for p in again.commands.list()]
    again.kill()


def test_kill_paused(daemon: Daemon) -> None:
    sbx = Sandbox.create(**daemon.opts())
    sbx.pause()
    assert sbx.kill() is True
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **daemon.opts())


def test_fork(daemon: Daemon) -> None:
    sbx = Sandbox.create(metadata={"origin": "yes"}, **daemon.opts())
    try:
        sbx.files.write("shared.txt", "from the source")
        forks = sbx.fork(count=2, timeout=120)
        assert len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks)
        ids = {sbx.sandbox_id} | {f.sandbox_id for f in forks}  # type: ignore[union-attr]
        assert len(ids) == 3
        for fork in forks:
            assert isinstance(fork, Sandbox)
            assert fork.files.read("shared.txt") == "from the source"
            assert fork.get_info().metadata == {"origin": "yes"}
            fork.files.write("shared.txt", "changed in the fork")
            fork.kill()
        assert sbx.files.read("shared.txt") == "from the source"
        with pytest.raises(SandboxException):
            sbx.fork(count=21)
    finally:
        sbx.kill()


def test_snapshots(daemon: Daemon) -> None:
    sbx = Sandbox.create(**daemon.opts())
    try:
        sbx.files.write("snap.txt", "in the snapshot")
        first = sbx.create_snapshot(name="lifecycle-snap")
        assert first.names == ["lifecycle-snap"]
        second = sbx.create_snapshot()
        listed = sbx.list_snapshots().next_items()
        assert [s.snapshot_id for s in listed] == [first.snapshot_id, second.snapshot_id]
        pager = Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id, limit=1, **daemon.opts())
        assert len(pager.next_items()) == 1 and pager.has_next
        assert len(pager.next_items()) == 1 and not pager.has_next
        named = Sandbox.list_snapshots(name="lifecycle-snap", **daemon.opts()).next_items()
        assert [s.snapshot_id for s in named] == [first.snapshot_id]

        for template in (first.snapshot_id, "lifecycle-snap"):
            child = Sandbox.create(template, **daemon.opts())
            assert child.files.read("snap.txt") == "in the snapshot"
            assert child.get_info().template_id == first.snapshot_id
            child.kill()

        assert Sandbox.delete_snapshot(first.snapshot_id, **daemon.opts()) is True
        assert Sandbox.delete_snapshot(first.snapshot_id, **daemon.opts()) is False
        with pytest.raises(SandboxException, match="404"):
            Sandbox.create(first.snapshot_id, **daemon.opts())
        assert Sandbox.delete_snapshot(second.snapshot_id, **daemon.opts()) is True
    finally:
        sbx.kill()


def test_restart_keeps_paused_and_reports_lost(tmp_path: Path) -> None:
    with running_daemon(tmp_path, on_shutdown="pause") as first:
        kept = Sandbox.create(**first.opts())
        kept.files.write("kept.txt", "across restarts")
        crashed = Sandbox.create(**first.opts())
        paused = Sandbox.create(**first.opts())
        paused.pause()
    # A crash leaves the record of a running sandbox behind; make one look like that.
    record_path = tmp_path / "sandboxes" / crashed.sandbox_id / "record.json"
    record = read(record_path, SandboxRecord)
    record.state = "running"
    write_atomic(record_path, record)

    with running_daemon(tmp_path) as second:
        states = {s.sandbox_id: s.state for s in Sandbox.list(**second.opts()).next_items()}
        assert states == {
            kept.sandbox_id: SandboxState.PAUSED,
            paused.sandbox_id: SandboxState.PAUSED,
        }
        response = httpx.get(
            f"{second.url}/sandboxes/{crashed.sandbox_id}", headers={"X-API-Key": second.api_key}
        )
        assert response.status_code == 404 and "lost" in response.json()["message"]
        assert 'cube_sandboxes{state="lost"} 1' in httpx.get(second.url + "/metrics").text
        back = Sandbox.connect(kept.sandbox_id, **second.opts())
        assert back.files.read("kept.txt") == "across restarts"
        assert back.kill() and Sandbox.kill(paused.sandbox_id, **second.opts())
        assert Sandbox.kill(crashed.sandbox_id, **second.opts())  # an operator clears it


def test_a_sandbox_that_died_keeps_its_death_report_in_its_log(daemon: Daemon) -> None:
    sbx = Sandbox.create(**daemon.opts())
    sbx.commands.run("kill -9 $PPID", background=True)  # its parent is the agent
    eventually(lambda: state_of(daemon, sbx.sandbox_id) is None)
    headers = {"X-API-Key": daemon.api_key}
    info = httpx.get(f"{daemon.url}/sandboxes/{sbx.sandbox_id}", headers=headers)
    assert info.status_code == 404 and "agent exited with status -9" in info.json()["message"]
    logs = httpx.get(f"{daemon.url}/v2/sandboxes/{sbx.sandbox_id}/logs", headers=headers)
    assert logs.status_code == 200
    lines = [entry["message"] for entry in logs.json()["logs"]]
    assert lines[:2] == ["agent exited with status -9", "--- console tail ---"]
    Sandbox.kill(sbx.sandbox_id, **daemon.opts())


def test_traffic_resumes_an_auto_resume_sandbox(daemon: Daemon) -> None:
    sbx = Sandbox.create(lifecycle={"on_timeout": "pause", "auto_resume": True}, **daemon.opts())
    sbx.files.write("wake.txt", "up")
    sbx.pause()
    assert sbx.files.read("wake.txt") == "up"  # the proxy resumed it on the way in
    assert sbx.get_info().state == SandboxState.RUNNING
    sbx.kill()


def test_pause_cuts_streams_in_flight(daemon: Daemon) -> None:
    """A client streaming from a sandbox that gets paused sees an error, not a hang."""
    sbx = Sandbox.create(**daemon.opts())
    handle = sbx.commands.run("exec sleep 300", background=True)
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            handle.wait()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    sbx.pause()
    waiter.join(PATIENCE_S)
    assert outcome and isinstance(outcome[0], Exception)
    sbx.kill()


def _process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T for stopped, Z), or None once reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _pty_shell_pid(sbx: Sandbox) -> int:
    """The pid of a shell on a PTY, which has a session (and process group) of its own."""
    handle = sbx.pty.create(PtySize(rows=24, cols=80))
    output = bytearray()
    sbx.pty.send_stdin(handle.pid, b"echo PID=$$\n")
    for _, _, pty in handle:
        output += pty or b""
        if match := re.search(rb"PID=(\d+)", output):
            return int(match.group(1))
    raise AssertionError(f"no pid in {output!r}")


def test_pause_stops_commands_in_their_own_session(daemon: Daemon) -> None:
    sbx = Sandbox.create(**daemon.opts())
    shell = _pty_shell_pid(sbx)
    sbx.pause()
    eventually(lambda: _process_state(shell) == "T")
    Sandbox.connect(sbx.sandbox_id, **daemon.opts())
    eventually(lambda: _process_state(shell) in ("R", "S"))
    sbx.kill()
    eventually(lambda: _process_state(shell) in (None, "Z"))

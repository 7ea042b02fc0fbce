"""`cube serve` with the VMM backend, driven by the unmodified E2B SDK (inside the lab).

The `daemon` fixture (tests/lab/daemon.py) builds the default templates and runs the daemon;
every sandbox here is a microVM restored from a template snapshot.
"""

from __future__ import annotations

import base64
import time

import httpx
import pytest
from e2b import PtySize, Sandbox, SandboxQuery
from e2b.exceptions import SandboxException
from e2b_code_interpreter import Sandbox as CodeSandbox

from tests.lab.daemon import INTERPRETER_SPEC, SDK_TIMEOUT, Daemon

pytestmark = pytest.mark.lab

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_commands_and_files_in_a_microvm(daemon: Daemon) -> None:
    sbx = daemon.create(metadata={"suite": "lab"})
    try:
        result = sbx.commands.run("echo hello from $(whoami); uname -r; echo oops >&2; pwd")
        out = result.stdout.splitlines()
        assert out[0] == "hello from user"
        assert out[2] == "/home/user"
        assert result.stderr == "oops\n" and result.exit_code == 0
        assert sbx.commands.run("cat /proc/1/cmdline | tr '\\0' ' '").stdout  # a real guest
        sbx.files.write("notes/a.txt", "written through the SDK")
        assert sbx.files.read("/home/user/notes/a.txt") == "written through the SDK"
        assert [e.name for e in sbx.files.list("notes")] == ["a.txt"]
        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            sbx.commands.run("true")
            rounds.append(time.perf_counter() - started)
        print(f"\ncommands.run('true') through cube serve, median of 5: "
              f"{sorted(rounds)[2] * 1e3:.1f} ms (lab, TCG)")  # fmt: skip
        listed = Sandbox.list(**daemon.sdk()).next_items()
        assert sbx.sandbox_id in {s.sandbox_id for s in listed}
    finally:
        assert sbx.kill()
    assert not Sandbox.kill(sbx.sandbox_id, **daemon.sdk())  # gone: a second kill is False


def test_clones_of_one_template_have_their_own_identity(daemon: Daemon) -> None:
    probe = "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1; date +%s"
    started = time.perf_counter()
    sandboxes = [daemon.create(), daemon.create()]
    print(f"\ntwo creates (one from the warm pool): {time.perf_counter() - started:.2f} s")
    try:
        seen = [s.commands.run(probe).stdout.split("\n", 3) for s in sandboxes]
        now = time.time()
        a, b = sandboxes
        token_a = a._envd_access_token
        assert token_a and token_a != b._envd_access_token
        # b's agent refuses a's token: each clone enforces its own, pushed at hand-out.
        refused = httpx.post(
            f"{daemon.url}/filesystem.Filesystem/Stat",
            json={"path": "/"},
            headers={
                "E2b-Sandbox-Id": b.sandbox_id,
                "E2b-Sandbox-Port": "49983",
                "X-Access-Token": token_a,
            },
        )
        assert refused.status_code == 401
    finally:
        for s in sandboxes:
            s.kill()
    (host_a, id_a, rand_a, clock_a), (host_b, id_b, rand_b, clock_b) = seen
    assert host_a != host_b and id_a != id_b and rand_a != rand_b
    for clock in (clock_a, clock_b):
        assert abs(int(clock) - now) < 120  # the wall clock was set at hand-out, not snapshot


def test_pause_then_connect_keeps_files_and_processes(daemon: Daemon) -> None:
    sbx = daemon.create()
    try:
        sbx.files.write("/home/user/kept.txt", "still here")
        sleeper = sbx.commands.run("sleep 3600", background=True)
        assert sbx.pause()
        info = Sandbox.get_info(sbx.sandbox_id, **daemon.sdk())
        assert info.state.value == "paused"
        again = Sandbox.connect(sbx.sandbox_id, **daemon.sdk())
        assert again.files.read("/home/user/kept.txt") == "still here"
        pids = [p.pid for p in again.commands.list()]
        assert sleeper.pid in pids
    finally:
        Sandbox.kill(sbx.sandbox_id, **daemon.sdk())


def test_a_filesystem_only_pause_reboots_on_the_paused_disk(daemon: Daemon) -> None:
    sbx = daemon.create()
    try:
        sbx.files.write("/home/user/kept.txt", "still here")
        boot_id = sbx.files.read("/proc/sys/kernel/random/boot_id")
        assert sbx.pause(keep_memory=False)
        again = Sandbox.connect(sbx.sandbox_id, **daemon.sdk())
        assert again.files.read("/home/user/kept.txt") == "still here"
        assert again.files.read("/proc/sys/kernel/random/boot_id") != boot_id
        assert again.commands.run("echo alive").stdout == "alive\n"
    finally:
        Sandbox.kill(sbx.sandbox_id, **daemon.sdk())


def test_run_code_draws_a_matplotlib_chart(daemon: Daemon) -> None:
    sbx = CodeSandbox.create(template=INTERPRETER_SPEC.name, timeout=600, **daemon.sdk())
    try:
        assert sbx.run_code("x = 41").error is None
        assert sbx.run_code("x + 1").text == "42"  # state survives between calls
        drawn = sbx.run_code(
            "import matplotlib.pyplot as plt\n"
            "plt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\nplt.show()"
        )
        assert drawn.error is None, drawn.error
        (chart,) = [r for r in drawn.results if r.png]
        assert base64.b64decode(chart.png).startswith(PNG_MAGIC)
        assert chart.chart is not None and chart.chart.title == "squares"
        failed = sbx.run_code("1 / 0")
        assert failed.error is not None and failed.error.name == "ZeroDivisionError"
    finally:
        sbx.kill()


def test_fork_and_snapshot_copy_a_running_microvm(daemon: Daemon) -> None:
    sbx = daemon.create(metadata={"origin": "lab"})
    try:
        sbx.files.write("/home/user/state.txt", "before the fork")
        (fork,) = sbx.fork(count=1, timeout=600)
        assert isinstance(fork, Sandbox) and fork.sandbox_id != sbx.sandbox_id
        assert fork.files.read("/home/user/state.txt") == "before the fork"
        fork.files.write("/home/user/state.txt", "changed in the fork")
        assert sbx.files.read("/home/user/state.txt") == "before the fork"
        assert fork.commands.run("hostname").stdout != sbx.commands.run("hostname").stdout
        fork.kill()
        snap = sbx.create_snapshot(name="lab-snap")
        child = Sandbox.create(template="lab-snap", timeout=600, **daemon.sdk())
        try:
            assert child.files.read("/home/user/state.txt") == "before the fork"
        finally:
            child.kill()
        assert Sandbox.delete_snapshot(snap.snapshot_id, **daemon.sdk())
    finally:
        sbx.kill()


def test_timeout_expiry_list_filter_and_pty(daemon: Daemon) -> None:
    sbx = daemon.create(metadata={"expiry": "soon"})
    listed = Sandbox.list(query=SandboxQuery(metadata={"expiry": "soon"}), **daemon.sdk())
    assert [s.sandbox_id for s in listed.next_items()] == [sbx.sandbox_id]
    out = bytearray()
    terminal = sbx.pty.create(PtySize(rows=24, cols=80), timeout=SDK_TIMEOUT)
    sbx.pty.send_stdin(terminal.pid, b"echo pty-$((6 * 7)); exit\n")
    terminal.wait(on_pty=out.extend)
    assert b"pty-42" in out
    sbx.set_timeout(2)
    deadline = time.monotonic() + 60
    while sbx.is_running() and time.monotonic() < deadline:
        time.sleep(1)
    assert not sbx.is_running()
    with pytest.raises(SandboxException):
        Sandbox.get_info(sbx.sandbox_id, **daemon.sdk())


def test_unknown_template_is_a_clear_error(daemon: Daemon) -> None:
    with pytest.raises(SandboxException, match="404"):
        Sandbox.create(template="no-such-template", **daemon.sdk())

"""sandbox.pty through the real E2B SDK: create, input, resize, kill."""

from __future__ import annotations

import contextlib
import threading

from e2b import CommandExitException, PtySize, Sandbox


class _Screen:
    """Collects PTY output on a thread and lets the test wait for some text to appear."""

    def __init__(self) -> None:
        self.text = ""
        self._changed = threading.Condition()

    def feed(self, data: bytes) -> None:
        with self._changed:
            self.text += data.decode(errors="replace")
            self._changed.notify_all()

    def wait_for(self, needle: str, timeout: float = 20.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: needle in self.text, timeout)


def _watch(handle, screen: _Screen) -> threading.Thread:  # type: ignore[no-untyped-def]
    def run() -> None:
        with contextlib.suppress(CommandExitException):
            handle.wait(on_pty=screen.feed)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_pty_input_resize_and_kill(sandbox: Sandbox) -> None:
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    screen = _Screen()
    thread = _watch(handle, screen)
    sandbox.pty.send_stdin(handle.pid, b"echo $((40+2)) $TERM\n")
    assert screen.wait_for("42 xterm-256color")
    sandbox.pty.resize(handle.pid, PtySize(rows=33, cols=111))
    sandbox.pty.send_stdin(handle.pid, b"stty size\n")
    assert screen.wait_for("33 111")
    sandbox.pty.send_stdin(handle.pid, b"tty\n")
    assert screen.wait_for("/dev/pts/")
    assert sandbox.pty.kill(handle.pid)
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert handle.pid not in [p.pid for p in sandbox.commands.list()]


def test_pty_exit_code(sandbox: Sandbox) -> None:
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(handle.pid, b"exit 7\n")
    try:
        handle.wait()
        raise AssertionError("exit 7 must raise")
    except CommandExitException as e:
        assert e.exit_code == 7

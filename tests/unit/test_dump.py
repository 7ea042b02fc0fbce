"""Hang dumps (cube.dump): SIGUSR1 makes `cube serve` write its threads' stacks and its trio task
tree and go on serving; the stacks come out even while the trio thread is blocked."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import trio

from cube.dump import HEADER, task_tree
from cube.paths import CHECKOUT_DIR

WAIT = 30.0  # seconds for a subprocess to get somewhere (a loaded CI machine is slow)


def _wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {WAIT:g} s"
        time.sleep(0.05)


@contextmanager
def _process(argv: list[str], stderr: Path, **kwargs: object) -> Iterator[subprocess.Popen[str]]:
    with open(stderr, "w") as err:
        proc = subprocess.Popen(argv, stderr=err, cwd=CHECKOUT_DIR, text=True, **kwargs)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _bound_url(log: Path) -> str | None:
    """serve's address, from its "listening" log line (it was asked for port 0)."""
    for line in log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("msg") == "listening":
            return str(json.loads(line)["binds"])
    return None


def test_serve_dumps_its_tasks_and_threads_on_sigusr1_and_goes_on_serving(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "cube", "serve", "--backend", "process",
            "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]  # fmt: skip
    with _process(argv, log) as serve:
        _wait_for("listening line", lambda: _bound_url(log) is not None)
        url = _bound_url(log)
        assert httpx.get(f"{url}/health").status_code == 204

        serve.send_signal(signal.SIGUSR1)
        _wait_for("task tree", lambda: "task cube.serve._serve" in log.read_text())
        text = log.read_text()
        threads, _, tree = text.partition(HEADER)
        assert f"pid {serve.pid}" in text
        assert "Current thread 0x" in threads and "in serve_command" in threads
        assert "task cube.dump.dump_on_signal" in tree
        assert "in _until_signal" in tree  # the frames a task is awaiting in
        main_thread = re.search(r"Current thread (0x[0-9a-f]+)", threads)
        assert main_thread and f"Thread {main_thread[1]} MainThread" in tree  # ids named

        assert httpx.get(f"{url}/health").status_code == 204
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(WAIT) == 0


BLOCKED_LOOP = """
import sys
import trio
from cube.dump import dump_on_signal

def block_the_loop():
    # "ready" from in here, so that the dump the test asks for finds this frame on the stack
    print("ready", flush=True)
    sys.stdin.readline()  # the trio thread is stuck until the test writes a line

async def main():
    secret = "hunter2-never-in-a-dump"
    async with trio.open_nursery() as nursery:
        await nursery.start(dump_on_signal)
        block_the_loop()
        await trio.sleep_forever()

trio.run(main)
"""


def test_thread_stacks_come_out_while_the_trio_thread_is_blocked(tmp_path: Path) -> None:
    """The C-level dump comes at once; the trio task's tree once the loop runs again, which
    also shows that faulthandler's handler chains to the one that wakes trio."""
    err = tmp_path / "stderr"
    argv = [sys.executable, "-c", textwrap.dedent(BLOCKED_LOOP)]
    with _process(argv, err, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGUSR1)
        _wait_for("thread stacks", lambda: "in block_the_loop" in err.read_text())
        time.sleep(0.2)
        assert HEADER not in err.read_text()  # the loop is still blocked

        proc.stdin.write("go on\n")
        proc.stdin.flush()
        _wait_for("task tree", lambda: "task __main__.main" in err.read_text())
        assert "hunter2" not in err.read_text()  # frames only, never locals
        assert proc.poll() is None  # and it goes on


def test_the_task_tree_nests_children_under_their_parents() -> None:
    async def waits_for_ever() -> None:
        await trio.sleep_forever()

    async def main() -> list[str]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waits_for_ever, name="the-child")
            await trio.sleep(0.01)
            tree = task_tree()
            nursery.cancel_scope.cancel()
        return tree

    tree = trio.run(main)
    parent = next(line for line in tree if line.endswith(".main"))
    child = tree.index(next(line for line in tree if line.endswith("task the-child")))
    indent = len(tree[child]) - len(tree[child].lstrip())
    assert indent > len(parent) - len(parent.lstrip())
    assert "in waits_for_ever" in tree[child + 1]  # its frames, outermost first
    assert tree[0].strip() == "task <init>"

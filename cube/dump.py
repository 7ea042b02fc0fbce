"""Hang dumps: on SIGUSR1 a process writes every thread's stack and its trio task tree to stderr
(for `cube serve`, its log) and goes on as before.

Two writers, because a hang can be anywhere. faulthandler dumps every thread's Python stack from
C, inside the signal handler, so the stacks come out even when the trio thread itself is stuck
(in a blocking call, or spinning); being written at the signal, they come first. Then, if the
loop is alive, a trio task writes a header (time, pid), the task tree (each task's name and the
frames it is awaiting in, which no thread stack shows, since a waiting task is on no thread) and
the threads' names by the ids faulthandler gave them. Frames only, never locals: a dump lands
in logs, and locals can hold keys.

The order of installation matters. trio's signal receiver sets Python's C-level handler (which
wakes the loop); faulthandler's handler goes on top of it and, with chain=True, calls it after
dumping. Installed the other way round, the receiver would replace faulthandler's handler.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

import trio

DUMP_SIGNAL = signal.SIGUSR1
HEADER = "trio tasks"  # in the header line, for people and tests to find the block by


async def dump_on_signal(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer DUMP_SIGNAL with a dump to stderr until cancelled; started once both handlers are
    in place, so that a signal from then on never takes the default action (ending the
    process)."""
    with trio.open_signal_receiver(DUMP_SIGNAL) as signals:
        faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=True)
        try:
            task_status.started()
            async for _ in signals:
                # one write, so that log lines from other threads do not cut through it
                sys.stderr.write("".join(f"{line}\n" for line in dump_lines()))
                sys.stderr.flush()
        finally:
            # before the receiver puts back the handler it found, which faulthandler chains to
            faulthandler.unregister(DUMP_SIGNAL)


def dump_lines() -> list[str]:
    """The trio part of a dump: the header, the task tree, the threads' names."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    return [
        f"=== dump at {stamp}, pid {os.getpid()}: {HEADER}, then thread names "
        "(every thread's stack was written at the signal, above) ===",
        *task_tree(),
        "  threads:",
        *(f"    Thread 0x{t.ident:016x} {t.name}" for t in threading.enumerate() if t.ident),
    ]


def task_tree() -> list[str]:
    """Every task of the running trio loop, children indented under their parent, with the
    frames each is awaiting in (outermost first)."""
    lines: list[str] = []
    _walk(trio.lowlevel.current_root_task(), 1, lines)
    return lines


def _walk(task: trio.lowlevel.Task | None, depth: int, lines: list[str]) -> None:
    if task is None:
        return
    pad = "  " * depth
    lines.append(f"{pad}task {task.name}")
    for frame, lineno in task.iter_await_frames():
        code = frame.f_code
        lines.append(f'{pad}    File "{code.co_filename}", line {lineno}, in {code.co_name}')
    for nursery in task.child_nurseries:
        for child in sorted(nursery.child_tasks, key=lambda child: child.name):
            _walk(child, depth + 1, lines)

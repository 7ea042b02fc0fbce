"""Exec a kernel command so that the kernel dies with the interpreter that started it.

Every kernel spec starts with ``python <this file> <interpreter pid> <kernel argv...>``, run by
path so that it needs no importable ``cube``. It asks Linux to SIGKILL this process when its
parent dies (``PR_SET_PDEATHSIG`` survives the exec that follows) and then becomes the kernel.
ipykernel has its own parent poller but Deno's kernel has none: without this an interpreter that
crashed or was killed would leave kernels running in a guest that may then be snapshotted.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent, command = int(argv[1]), argv[2:]
    with contextlib.suppress(OSError, AttributeError):  # elsewhere than Linux: no guard
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit("the interpreter exited before its kernel started")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv)

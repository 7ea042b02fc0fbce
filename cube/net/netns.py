"""Run a piece of code inside a named network namespace, or in the current one.

Everything in cube/net takes an optional namespace name so that tests (and a lab) can run the
whole stack inside a throwaway namespace without touching the host's network. `setns` switches
only the calling thread and only its network namespace (not the mount namespace, so /sys/fs/bpf
and the cache stay where they are, unlike `ip netns exec`; see ebpf-here.md P3). Sockets,
netlink handles and tap fds opened inside keep their namespace after the switch back.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    """setns(2) for a network namespace (os.setns arrives only in Python 3.12)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def path(name: str) -> Path:
    return NETNS_DIR / name


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Switch this thread into namespace `name` for the block (no-op for None)."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path(name), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def command(name: str | None, argv: list[str]) -> list[str]:
    """`argv` wrapped to run inside namespace `name` (unchanged for None)."""
    if name is None:
        return argv
    return ["nsenter", f"--net={path(name)}", "--", *argv]

"""Lab fixtures: one `cube serve` for every lab test that needs the daemon (templates take
minutes to build under nested TCG, so they are built once per session).

A hung lab run is diagnosable: before the runner stops L1 it asks for dumps, and L1's init
sends SIGUSR1 to pytest (and to `cube serve`), which then writes every thread's stack.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from collections.abc import Iterator

import pytest

from cube.dump import DUMP_SIGNAL
from tests.lab.daemon import Daemon, running_daemon

_DUMP_FD = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    """Dump on DUMP_SIGNAL to a copy of the real stderr (the lab streams it to the host): while a
    test runs, pytest's capture points fd 2 at a file that a killed run never shows. No
    chaining: the handler before ours is the default action, which would end pytest."""
    config.stash[_DUMP_FD] = fd = os.dup(sys.stderr.fileno())
    faulthandler.register(DUMP_SIGNAL, file=fd, all_threads=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.unregister(DUMP_SIGNAL)
    os.close(config.stash[_DUMP_FD])


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    with running_daemon() as serving:
        yield serving

"""Lab fixtures: one `cube serve` for every lab test that needs the daemon (templates take
minutes to build under nested TCG, so they are built once per session)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab.daemon import Daemon, running_daemon


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    with running_daemon() as serving:
        yield serving

"""One daemon for the folder (process backend, warm pool of one `base`), plus helpers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.api.daemon import Daemon, running_daemon


@pytest.fixture(scope="package")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("cube-data"), pool={"base": 1}) as d:
        yield d

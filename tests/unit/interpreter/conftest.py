"""One code-interpreter server for the whole folder, run as a host process.

Kernels take seconds to start, so the server (and the default kernels it pre-starts) is shared
by every test here; tests that need a clean kernel make their own context. The real
e2b-code-interpreter SDK drives it in debug mode (no control plane) with ``sandbox_url``
pointing at the server, so nothing depends on E2B_* variables in the environment and the port
can be a free one rather than 49999.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from e2b_code_interpreter import Sandbox

from cube.guest.interpreter import languages
from tests.processes import stop

START_TIMEOUT = 90.0

needs_deno = pytest.mark.skipif(
    languages.deno_binary() is None, reason="the deno package (JavaScript kernel) is not installed"
)


@dataclass(frozen=True)
class Server:
    url: str
    state_dir: Path
    home: Path
    log: Path

    def write_envs(self, envs: dict[str, str]) -> None:
        """Replace envs.json atomically, as the guest agent does."""
        tmp = self.state_dir / "envs.json.tmp"
        tmp.write_text(json.dumps(envs))
        tmp.replace(self.state_dir / "envs.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"interpreter exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"interpreter not healthy after {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("interpreter")
    state_dir, home = root / "state", root / "home"
    state_dir.mkdir()
    home.mkdir()
    log = root / "server.log"
    url = f"http://127.0.0.1:{_free_port()}"
    argv = [sys.executable, "-m", "cube.guest.interpreter", "--listen", url.removeprefix("http://")]
    argv += ["--state-dir", str(state_dir), "--cwd", str(home)]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, proc, log)
        yield Server(url=url, state_dir=state_dir, home=home, log=log)
    finally:
        stop(proc, grace=20)


@pytest.fixture(scope="package")
def sandbox(server: Server) -> Sandbox:
    return Sandbox.create(debug=True, api_key="test", sandbox_url=server.url)

"""Running the guest agent as a host process for tests, and talking to its control port.

The agent runs in host mode (users ``root`` and ``user`` are the test's own uid, homes under a
temporary folder; the host's clock, hostname, machine-id, RNG and network are never touched),
with its relay and control ports on Unix sockets in the same folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cube.guest import wire
from tests.processes import stop

READY_WAIT = 20.0  # seconds the agent may take to start listening (generous: loaded CI hosts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Agent:
    process: subprocess.Popen[bytes]
    base: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def relay_socket(self) -> str:
        return str(self.base / "relay.sock")

    @property
    def control_socket(self) -> str:
        return str(self.base / "control.sock")

    @property
    def user_home(self) -> Path:
        return self.base / "home" / "home" / "user"

    @property
    def root_home(self) -> Path:
        return self.base / "home" / "root"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    def control(self, *requests: wire.ControlRequest) -> list[wire.Reply]:
        """Send requests on one control connection; their replies, in order."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.control_socket)
            payload = b"".join(wire.control_encoder.encode(r) + b"\n" for r in requests)
            s.sendall(payload)
            return [wire.reply_decoder.decode(line) for line in _lines(s, len(requests))]

    def refresh(self, **fields: Any) -> wire.Reply:
        identity = wire.Identity(
            sandbox_id="test-sandbox",
            hostname="test-host",
            machine_id="0" * 32,
            wall_clock_ns=time.time_ns(),
            rng_seed=os.urandom(32),
            **fields,
        )
        (reply,) = self.control(wire.Refresh(identity))
        return reply


def _lines(s: socket.socket, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\n") < count:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.splitlines()[:count]


def _wait_ready(agent: Agent) -> None:
    deadline = time.monotonic() + READY_WAIT
    while True:
        if agent.process.poll() is not None:
            raise RuntimeError(f"agent exited with {agent.process.returncode}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(f"{agent.url}/health", timeout=2) as r,
        ):
            if r.status == 204 and os.path.exists(agent.control_socket):
                return
        if time.monotonic() > deadline:
            raise RuntimeError("agent did not become ready")
        time.sleep(0.05)


@contextlib.contextmanager
def run_agent(base: Path, port: int, host_mode: bool = True) -> Iterator[Agent]:
    """Start an agent; ``host_mode=False`` runs it with the machine's real users (never send
    such an agent a Refresh: in guest mode that would set the host's clock and hostname)."""
    base.mkdir(parents=True, exist_ok=True)
    log = open(base / "agent.log", "wb")  # noqa: SIM115 - closed below, after the process
    command = [
        sys.executable,
        "-m",
        "cube.guest.agent",
        *(["--host-mode", str(base / "home")] if host_mode else []),
        "--envd",
        f"127.0.0.1:{port}",
        "--relay",
        f"unix:{base / 'relay.sock'}",
        "--control",
        f"unix:{base / 'control.sock'}",
        "--state-dir",
        str(base / "state"),
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    agent = Agent(process, base, port)
    try:
        _wait_ready(agent)
        yield agent
    finally:
        stop(process, grace=10)
        log.close()


def envs_file(agent: Agent) -> dict[str, str]:
    return json.loads((agent.state_dir / "envs.json").read_text())


def frames(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    """Split a Connect streaming body into (flags, JSON message) pairs."""
    out = []
    while data:
        flags, length = struct.unpack(">BI", data[:5])
        out.append((flags, json.loads(data[5 : 5 + length])))
        data = data[5 + length :]
    return out

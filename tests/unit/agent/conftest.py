"""Fixtures: a host-mode agent, a second one secured with an access token, and the SDK pointed
at them through a tiny test-only create responder.

The SDK's debug mode would need envd on the fixed port 49983, which collides with any other run
of these tests on the machine; instead each agent listens on a free port, the SDK gets it as
``sandbox_url``, and the responder answers the SDK's create call (``POST /v2/sandboxes``) with
the sandbox's envd version and token, the way the real control plane would. It is a harness
only: every envd request goes to the agent under test.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import uuid
from collections.abc import Iterator

import pytest
from e2b import Sandbox

from cube.guest.agent import ENVD_VERSION
from tests.unit.agent.harness import Agent, free_port, run_agent

TOKEN = "test-envd-token"


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with run_agent(tmp_path_factory.mktemp("agent"), free_port()) as running:
        yield running


@pytest.fixture
def sandbox(agent: Agent, responder: str) -> Sandbox:
    return Sandbox.create(**connect_options(agent, responder))


@pytest.fixture
def name() -> str:
    """A fresh relative name, so tests sharing the agent's home never collide."""
    return f"t-{uuid.uuid4().hex[:10]}"


def _responder_class(token: str | None) -> type[http.server.BaseHTTPRequestHandler]:
    class CreateResponder(http.server.BaseHTTPRequestHandler):
        """POST /v2/sandboxes -> 201 with envd's version (and token); anything else 204."""

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self.path.startswith("/v2/sandboxes"):
                self.send_response(204)
                self.end_headers()
                return
            created = {
                "sandboxID": "agent-test",
                "templateID": "base",
                "clientID": "test",
                "envdVersion": ENVD_VERSION,
            }
            if token:
                created["envdAccessToken"] = token
            body = json.dumps(created).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_DELETE = do_POST

        def log_message(self, format: str, *args: object) -> None:
            pass

    return CreateResponder


@contextlib.contextmanager
def _responder(token: str | None) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _responder_class(token))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def responder() -> Iterator[str]:
    with _responder(None) as url:
        yield url


@pytest.fixture(scope="session")
def secured_responder() -> Iterator[str]:
    with _responder(TOKEN) as url:
        yield url


def connect_options(agent: Agent, api_url: str) -> dict[str, str]:
    """What Sandbox.create / AsyncSandbox.create need to reach ``agent``."""
    return {"api_url": api_url, "sandbox_url": agent.url, "api_key": "test-key"}


@pytest.fixture(scope="session")
def secured_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with run_agent(tmp_path_factory.mktemp("secured"), free_port()) as running:
        assert running.refresh(access_token=TOKEN).ok
        yield running


@pytest.fixture
def secured_sandbox(secured_agent: Agent, secured_responder: str) -> Sandbox:
    return Sandbox.create(**connect_options(secured_agent, secured_responder))

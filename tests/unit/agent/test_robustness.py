"""Bad input must get the documented error shapes and never take the agent down."""

from __future__ import annotations

import base64
import gzip
import json

import httpx
import pytest
from e2b import AuthenticationException, Sandbox

from cube.guest.agent.connect import envelope
from tests.unit.agent.conftest import connect_options
from tests.unit.agent.harness import Agent, frames

STREAM = {"Content-Type": "application/connect+json"}


def _start(agent: Agent, message: dict[str, object], **headers: str) -> list[dict[str, object]]:
    body = envelope(json.dumps(message).encode())
    response = httpx.post(
        f"{agent.url}/process.Process/Start",
        content=body,
        headers={**STREAM, **headers},
        timeout=30,
    )
    assert response.status_code == 200
    return [payload for _, payload in frames(response.content)]


def test_keepalive_and_lifetime_headers(agent: Agent) -> None:
    events = _start(
        agent,
        {"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 30"]}, "stdin": False},
        **{"Keepalive-Ping-Interval": "1", "Connect-Timeout-Ms": "2500"},
    )
    kinds = [next(iter(e["event"])) for e in events[:-1]]  # type: ignore[arg-type]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert "keepalive" in kinds
    end = events[-2]["event"]["end"]  # type: ignore[index]
    assert end == {"exitCode": -1, "status": "signal: killed", "error": "signal: killed"}
    assert events[-1] == {}


def test_process_event_wire_format(agent: Agent) -> None:
    events = _start(agent, {"process": {"cmd": "/bin/echo", "args": ["hi"]}, "stdin": False})
    assert events[1] == {"event": {"data": {"stdout": base64.b64encode(b"hi\n").decode()}}}
    assert events[2] == {"event": {"end": {"exited": True, "status": "exit status 0"}}}


def test_unknown_user_is_unauthenticated(agent: Agent, responder: str) -> None:
    sandbox = Sandbox.create(**connect_options(agent, responder))
    with pytest.raises(AuthenticationException):
        sandbox.commands.run("true", user="nobody-here")  # type: ignore[arg-type]
    response = httpx.get(f"{agent.url}/files", params={"path": "x", "username": "nobody-here"})
    assert response.status_code == 401 and "nobody-here" in response.json()["message"]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status"),
    [
        ("/process.Process/List", b"{", {"Content-Type": "application/json"}, 400),
        ("/process.Process/List", b"{}", {"Content-Type": "text/plain"}, 415),
        ("/nope.Service/Method", b"{}", {"Content-Type": "application/json"}, 404),
        (
            "/filesystem.Filesystem/Stat",
            b'{"path": "a\\u0000b"}',
            {"Content-Type": "application/json"},
            400,
        ),
        (
            "/filesystem.Filesystem/Stat",
            json.dumps({"path": "x" * 5000}).encode(),
            {"Content-Type": "application/json"},
            400,
        ),
        (
            "/filesystem.Filesystem/Stat",
            b'{"path": "~other/x"}',
            {"Content-Type": "application/json"},
            400,
        ),
        ("/files?path=x", b"data", {"Content-Type": "text/plain"}, 400),
        (
            "/files?path=x",
            b"data",
            {"Content-Type": "application/octet-stream", "Content-Encoding": "br"},
            400,
        ),
        (
            "/files?path=x",
            b"not gzip",
            {"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
            400,
        ),
        ("/files", b"data", {"Content-Type": "application/octet-stream"}, 400),
        (
            "/files?path=x",
            b"--b\r\nbroken",
            {"Content-Type": "multipart/form-data; boundary=b"},
            400,
        ),
        (
            "/files?path=x",
            b"x",
            {"Content-Type": "application/octet-stream", "X-Metadata-K": "\u00e9".encode()},
            400,
        ),
    ],
)
def test_bad_requests(
    agent: Agent, path: str, body: bytes, headers: dict[str, str], status: int
) -> None:
    response = httpx.post(f"{agent.url}{path}", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert httpx.get(f"{agent.url}/health").status_code == 204


def test_download_encodings(agent: Agent, name: str) -> None:
    (agent.user_home / name).write_bytes(b"payload" * 100)
    url = f"{agent.url}/files"
    plain = httpx.get(url, params={"path": name}, headers={"Accept-Encoding": "identity"})
    assert plain.content == b"payload" * 100 and "content-encoding" not in plain.headers
    zipped = httpx.get(url, params={"path": name}, headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.content == b"payload" * 100  # httpx decodes it
    refused = httpx.get(url, params={"path": name}, headers={"Accept-Encoding": "br, identity;q=0"})
    assert refused.status_code == 406
    raw = httpx.post(
        url,
        params={"path": f"{name}.gz"},
        content=gzip.compress(b"up"),
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert raw.status_code == 200 and (agent.user_home / f"{name}.gz").read_bytes() == b"up"


def test_oversized_headers_are_refused(agent: Agent) -> None:
    response = httpx.get(f"{agent.url}/health", headers={"X-Big": "x" * 70_000})
    assert response.status_code in (400, 431)
    assert httpx.get(f"{agent.url}/health").status_code == 204


def test_tagged_process_is_listed_and_found_by_tag(agent: Agent) -> None:
    body = envelope(
        json.dumps(
            {"process": {"cmd": "/bin/sh", "args": ["-c", "read x"]}, "tag": "my-tag"}
        ).encode()
    )
    unary = {"Content-Type": "application/json"}
    with httpx.stream(
        "POST", f"{agent.url}/process.Process/Start", content=body, headers=STREAM, timeout=30
    ) as started:
        listed = httpx.post(f"{agent.url}/process.Process/List", content=b"{}", headers=unary)
        tags = {p.get("tag") for p in listed.json()["processes"]}
        assert "my-tag" in tags
        by_tag = json.dumps({"process": {"tag": "my-tag"}, "input": {"stdin": "eAo="}}).encode()
        sent = httpx.post(f"{agent.url}/process.Process/SendInput", content=by_tag, headers=unary)
        assert sent.status_code == 200
        messages = [payload for _, payload in frames(started.read())]
    assert messages[-2]["event"]["end"]["status"] == "exit status 0"

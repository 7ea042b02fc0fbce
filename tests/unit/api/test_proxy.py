"""Sandbox traffic through the daemon's proxy: routing, streaming both ways, signed URLs and
the exact 502 bodies the SDK parses."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxNotRunningException

from tests.unit.api.daemon import Daemon

BIG = 24 << 20


@pytest.fixture(scope="module")
def sbx(daemon: Daemon) -> Iterator[Sandbox]:
    box = Sandbox.create(**daemon.opts())
    yield box
    box.kill()


def envd_headers(sandbox: Sandbox, port: int = 49983) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": str(port)}


def test_process_output_streams_before_the_process_ends(sbx: Sandbox) -> None:
    handle = sbx.commands.run("echo first; exec sleep 300", background=True)
    try:
        for stdout, _, _ in handle:
            if stdout:
                assert stdout == "first\n"
                break
        assert handle.pid in [p.pid for p in sbx.commands.list()]  # still running
    finally:
        handle.kill()


def test_foreground_command(sbx: Sandbox) -> None:
    chunks: list[str] = []
    result = sbx.commands.run(
        "for i in 1 2 3; do echo $i; done; echo err >&2", on_stdout=chunks.append
    )
    assert result.exit_code == 0 and result.stdout == "1\n2\n3\n" and result.stderr == "err\n"
    assert "".join(chunks) == result.stdout


def test_large_upload_and_download(sbx: Sandbox) -> None:
    data = os.urandom(BIG)
    sbx.files.write("big.bin", data)
    assert sbx.files.read("big.bin", format="bytes") == data
    sbx.files.write("big-stream.bin", io.BytesIO(data))  # octet-stream body
    assert sbx.files.read("big-stream.bin", format="bytes") == data


def test_signed_urls_route_without_sandbox_headers(daemon: Daemon, sbx: Sandbox) -> None:
    other = Sandbox.create(**daemon.opts())  # two live sandboxes: the signature must pick
    try:
        other.files.write("who.txt", "other")
        sbx.files.write("who.txt", "me")
        assert httpx.get(sbx.download_url("who.txt")).text == "me"
        assert httpx.get(other.download_url("who.txt", use_signature_expiration=60)).text == "other"

        def chunks() -> Iterator[bytes]:
            yield b"chunked "
            yield b"upload"

        url = sbx.upload_url("up.txt")
        uploaded = httpx.post(url, files={"file": ("up.txt", b"via signed url")})
        assert uploaded.status_code == 200, uploaded.text
        assert sbx.files.read("up.txt") == "via signed url"
        stream = httpx.post(
            url,
            content=chunks(),
            headers={"Content-Type": "application/octet-stream"},
        )
        assert stream.status_code == 200, stream.text
        assert sbx.files.read("up.txt") == "chunked upload"

        expired = sbx.download_url("who.txt", use_signature_expiration=-10)
        response = httpx.get(expired)
        assert response.status_code == 401
        assert response.json() == {"code": 401, "message": "signature is already expired"}
        forged = httpx.get(daemon.url + "/files?path=who.txt&signature=v1_forged")
        assert response.status_code == 401 and forged.status_code == 502
        assert "was not found" in forged.json()["message"]
    finally:
        other.kill()


def test_bad_gateway_bodies(daemon: Daemon, sbx: Sandbox) -> None:
    with httpx.Client(base_url=daemon.url) as client:
        gone = client.get(
            "/health", headers={"E2b-Sandbox-Id": "nosuch", "E2b-Sandbox-Port": "49983"}
        )
        assert gone.status_code == 502
        assert gone.json() == {
            "sandboxId": "nosuch",
            "message": "The sandbox was not found",
            "code": 502,
        }
        closed = client.get("/", headers=envd_headers(sbx, port=1))
        assert closed.status_code == 502
        assert closed.json() == {
            "sandboxId": sbx.sandbox_id,
            "message": "The sandbox is running but port is not open",
            "port": 1,
            "code": 502,
        }
        half = client.get("/health", headers={"E2b-Sandbox-Id": sbx.sandbox_id})
        assert half.status_code == 400 and half.json()["code"] == 400
        huge = client.get("/health", headers=envd_headers(sbx, port=70000))
        assert huge.status_code == 400 and huge.json()["code"] == 400


def test_host_routing_and_keep_alive(daemon: Daemon, sbx: Sandbox) -> None:
    host = f"49983-{sbx.sandbox_id}.sandbox.test"
    with httpx.Client(base_url=daemon.url) as client:  # one connection, reused throughout
        for _ in range(3):
            assert client.get("/health", headers={"Host": host}).status_code == 204
            assert client.get("/health", headers=envd_headers(sbx)).status_code == 204
            assert client.get("/health", headers=envd_headers(sbx, port=1)).status_code == 502
            listed = client.get("/v2/sandboxes", headers={"X-API-Key": daemon.api_key})
            assert listed.status_code == 200


def test_killed_sandbox_is_not_running(daemon: Daemon) -> None:
    box = Sandbox.create(**daemon.opts())
    assert box.is_running()
    box.kill()
    assert not box.is_running()
    with pytest.raises(SandboxNotRunningException):
        box.commands.run("true")


def test_any_guest_port_is_reachable(daemon: Daemon, sbx: Sandbox) -> None:
    """A server the user starts in the sandbox, by header and by Host.

    Host mode shares the host's loopback, so the server picks its own port: a port probed
    here and freed could be taken by a warm-pool agent before the server binds it."""
    sbx.files.write("site/index.html", "hello from a user server")
    server = sbx.commands.run(
        "cd site && exec python3 -c 'import http.server as h, pathlib; "
        's = h.ThreadingHTTPServer(("127.0.0.1", 0), h.SimpleHTTPRequestHandler); '
        'pathlib.Path("../port").write_text(str(s.server_port)); s.serve_forever()\'',
        background=True,
    )
    deadline = time.monotonic() + 30
    while not sbx.files.exists("port"):
        assert time.monotonic() < deadline, "the server never wrote its port"
        time.sleep(0.05)
    port = int(sbx.files.read("port"))
    try:
        with httpx.Client(base_url=daemon.url) as client:
            deadline = time.monotonic() + 30
            while (
                page := client.get("/index.html", headers=envd_headers(sbx, port))
            ).status_code == 502:
                assert time.monotonic() < deadline, page.text
                time.sleep(0.1)
            assert page.text == "hello from a user server"
            by_host = client.get(
                "/index.html", headers={"Host": f"{port}-{sbx.sandbox_id}.cube.test"}
            )
            assert by_host.text == "hello from a user server"
    finally:
        server.kill()


def test_code_interpreter_through_the_proxy(daemon: Daemon) -> None:
    """NDJSON streaming from port 49999, and /contexts calls that carry no access token."""
    from e2b_code_interpreter import Sandbox as CodeInterpreter

    sbx = CodeInterpreter.create(**daemon.opts())
    try:
        lines: list[str] = []
        execution = sbx.run_code("print('hi')\n6 * 7", on_stdout=lambda m: lines.append(m.line))
        assert execution.text == "42" and lines == ["hi\n"]
        context = sbx.create_code_context()
        sbx.run_code("x = 5", context=context)
        assert sbx.run_code("x + 1", context=context).text == "6"
        assert sbx.run_code("1/0").error.name == "ZeroDivisionError"  # type: ignore[union-attr]
    finally:
        sbx.kill()


def test_private_traffic_needs_the_traffic_token(daemon: Daemon) -> None:
    box = Sandbox.create(network={"allow_public_traffic": False}, **daemon.opts())
    try:
        token = box.traffic_access_token
        assert token
        assert box.commands.run("echo envd is exempt").exit_code == 0
        with httpx.Client(base_url=daemon.url) as client:
            refused = client.get("/", headers=envd_headers(box, port=1))
            assert refused.status_code == 403 and refused.json()["code"] == 403
            wrong = {**envd_headers(box, port=1), "E2B-Traffic-Access-Token": "nope"}
            assert client.get("/", headers=wrong).status_code == 403
            let_in = {**envd_headers(box, port=1), "E2B-Traffic-Access-Token": token}
            assert "port is not open" in client.get("/", headers=let_in).json()["message"]
    finally:
        box.kill()

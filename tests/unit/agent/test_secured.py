"""Access tokens and signed file URLs, against an agent refreshed with a token.

The SDK gets the token from a create call answered by the test responder (conftest), then
sends it on every envd request; raw HTTP shows what happens without it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from e2b import Sandbox

from tests.unit.agent.conftest import TOKEN
from tests.unit.agent.harness import Agent

UNAUTHORIZED = {
    "code": 401,
    "message": "unauthorized access, please provide a valid access token or method signing "
    "if supported",
}


def _http(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_sdk_with_token_works(secured_sandbox: Sandbox, name: str) -> None:
    assert secured_sandbox.commands.run("echo ok").stdout == "ok\n"
    secured_sandbox.files.write(name, "secret")
    assert secured_sandbox.files.read(name) == "secret"


def test_requests_without_token_are_refused(secured_agent: Agent) -> None:
    body = json.dumps({"path": "/"}).encode()
    rpc = f"{secured_agent.url}/filesystem.Filesystem/Stat"
    status, payload = _http(rpc, body, {"Content-Type": "application/json"})
    assert (status, json.loads(payload)) == (401, UNAUTHORIZED)
    status, _ = _http(rpc, body, {"Content-Type": "application/json", "X-Access-Token": TOKEN})
    assert status == 200
    assert _http(f"{secured_agent.url}/envs")[0] == 401
    assert _http(f"{secured_agent.url}/health")[0] == 204
    status, payload = _http(f"{secured_agent.url}/files?path=/etc/hostname")
    assert (status, json.loads(payload)["message"]) == (401, "missing signature query parameter")


def test_signed_download_and_upload(secured_sandbox: Sandbox, name: str) -> None:
    secured_sandbox.files.write(name, "signed content")
    assert _http(secured_sandbox.download_url(name, "user")) == (200, b"signed content")
    assert _http(secured_sandbox.download_url(name, "user", 120)) == (200, b"signed content")
    tampered = secured_sandbox.download_url(name, "root")
    status, payload = _http(tampered.replace("username=root", "username=user"))
    assert (status, json.loads(payload)["message"]) == (401, "invalid signature")
    upload = secured_sandbox.upload_url(f"{name}.up", "user", 60)
    boundary = "testboundary"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\nuploaded\r\n--{boundary}--\r\n"
    ).encode()
    status, payload = _http(
        upload, form, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert status == 200, payload
    assert secured_sandbox.files.read(f"{name}.up") == "uploaded"


def test_expired_signature_body(secured_sandbox: Sandbox, name: str) -> None:
    secured_sandbox.files.write(name, "x")
    status, payload = _http(secured_sandbox.download_url(name, "user", -120))
    assert status == 401
    assert json.loads(payload) == {"code": 401, "message": "signature is already expired"}


@pytest.mark.parametrize("path", ["/files", "/process.Process/List"])
def test_wrong_token_header(secured_agent: Agent, path: str) -> None:
    headers = {"X-Access-Token": "wrong", "Content-Type": "application/json"}
    data = b"{}" if path != "/files" else None
    status, _ = _http(f"{secured_agent.url}{path}?path=x", data, headers)
    assert status == 401

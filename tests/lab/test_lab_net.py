"""Sandbox networking with real guests: egress rules, isolation and live rule changes.

Each check is a TCP connect from inside a microVM (Python in the guest, through the E2B SDK's
`commands.run`) to a server in the fake internet, to another sandbox, or to the daemon's own
host. A refused destination is dropped by the tap's filter, so the connect times out.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from e2b import CommandExitException, Sandbox

from tests.lab.daemon import SERVER_PORT, UPLINK4, Daemon

pytestmark = pytest.mark.lab

ALLOWED, DENIED, ELSEWHERE = "198.51.100.1", "198.51.100.2", "203.0.113.1"
CONNECT_TIMEOUT = 5  # seconds the guest waits for a dropped SYN; not a pass/fail threshold


def reaches(sbx: Sandbox, address: str, port: int = SERVER_PORT) -> bool:
    """Whether a TCP connect from inside the sandbox to address:port succeeds."""
    script = (
        "import socket; "
        f"socket.create_connection(({address!r}, {port}), timeout={CONNECT_TIMEOUT}).close()"
    )
    try:
        sbx.commands.run(f'python3 -c "{script}"', timeout=60)
    except CommandExitException as exc:
        print(f"\n{address}:{port} not reached: {exc.stderr.strip().splitlines()[-1:]}")
        return False
    return True


def guest_address(sbx: Sandbox) -> str:
    """eth0's IPv4 address, as the guest's routing picks it (no packet is sent)."""
    script = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.connect(({ALLOWED!r}, 9)); print(s.getsockname()[0])"
    )
    return sbx.commands.run(f'python3 -c "{script}"').stdout.strip()


def stats(daemon: Daemon, sbx: Sandbox) -> dict[str, object]:
    answer = httpx.get(
        f"{daemon.url}/sandboxes/{sbx.sandbox_id}/network", headers={"X-API-Key": daemon.key}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def put_network(daemon: Daemon, sbx: Sandbox, body: dict[str, object]) -> None:
    """PUT /network with allow_internet_access, which the SDK's update_network never sends."""
    answer = httpx.put(
        f"{daemon.url}/sandboxes/{sbx.sandbox_id}/network",
        json=body,
        headers={"X-API-Key": daemon.key},
    )
    assert answer.status_code == 204, answer.text


def test_egress_rules_and_isolation(daemon: Daemon) -> None:
    sbx = daemon.create(network={"allow_out": [ALLOWED], "deny_out": ["198.51.100.0/24"]})
    other = daemon.create()
    try:
        assert reaches(sbx, ALLOWED)  # allow wins over a deny that covers it
        assert not reaches(sbx, DENIED)
        assert reaches(sbx, ELSEWHERE)  # internet access is on by default
        mine, theirs = guest_address(sbx), guest_address(other)
        assert mine != theirs  # clones of one snapshot never share an address
        other.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True)
        deadline = time.monotonic() + 60
        while not reaches(other, theirs, 8000):  # the server is up...
            assert time.monotonic() < deadline, "the other sandbox's server did not start"
        assert not reaches(sbx, theirs, 8000)  # ...but not for another sandbox
        gateway = mine.rsplit(".", 1)[0] + ".1"
        for host_address in (gateway, UPLINK4):
            assert not reaches(sbx, host_address, daemon.port)  # the daemon's API
        counts = stats(daemon, sbx)
        assert counts["packets"]["PASS_ALLOW"] > 0  # type: ignore[index]
        assert {DENIED, theirs, gateway} <= {drop["destination"] for drop in counts["log"]}  # type: ignore[attr-defined,union-attr]
        shown = subprocess.run(
            [sys.executable, "-m", "cube", "sandbox", "net", sbx.sandbox_id,
             "--url", daemon.url, "--api-key", daemon.key],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"allow out: {ALLOWED}" in shown and f"dropped {DENIED}:{SERVER_PORT}" in shown
    finally:
        sbx.kill()
        other.kill()


def test_rule_changes_apply_while_the_sandbox_runs(daemon: Daemon) -> None:
    sbx = daemon.create()
    try:
        assert reaches(sbx, ELSEWHERE)
        sbx.update_network({"deny_out": ["203.0.113.0/24"]})  # the SDK's own call
        assert not reaches(sbx, ELSEWHERE)
        sbx.update_network({})  # omitted lists are cleared, as in E2B
        assert reaches(sbx, ELSEWHERE)
        put_network(daemon, sbx, {"allow_internet_access": False})
        assert not reaches(sbx, ALLOWED)
    finally:
        sbx.kill()


def test_no_internet_access_and_rules_survive_pause(daemon: Daemon) -> None:
    sbx = daemon.create(allow_internet_access=False)
    try:
        assert not reaches(sbx, ELSEWHERE)
        assert sbx.pause()
        again = Sandbox.connect(sbx.sandbox_id, **daemon.sdk())  # a new tap, the same rules
        assert not reaches(again, ELSEWHERE)
        put_network(daemon, again, {"allow_internet_access": True})
        assert reaches(again, ELSEWHERE)
    finally:
        Sandbox.kill(sbx.sandbox_id, **daemon.sdk())

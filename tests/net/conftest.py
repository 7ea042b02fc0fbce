"""Host-tier network fixtures: two throwaway namespaces per test, never the host's network.

`host` plays the Cube host (NetworkManager runs there, with NAT out of `up0`); `inet` plays the
internet behind it, with the destinations the guest talks to bound on its loopback:

    guest (test, via the tap fd) -> cubeN [filter] -> host ns -> up0 ==veth== wan0 -> inet ns lo

Both namespaces are deleted after the test whatever happens, which also deletes every tap,
veth, address and nft table inside them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from cube.net.manager import NetworkConfig, NetworkManager
from tests.net.topology import DESTINATIONS, INET4, INET6, UPLINK4, UPLINK6, Topology, ip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "net tier needs root (network namespaces, taps, BPF)"
    elif shutil.which("clang") is None or shutil.which("nft") is None:
        reason = "net tier needs clang and nftables (scripts/install-deps.sh)"
    if reason:
        for item in items:
            if "net" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def topo() -> Iterator[Topology]:
    tag = uuid.uuid4().hex[:8]
    t = Topology(host=f"cubet-{tag}-h", inet=f"cubet-{tag}-i")
    try:
        for ns in (t.host, t.inet):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip(
            "-n",
            t.host,
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            "wan0",
            "netns",
            t.inet,
        )
        for ns, dev, a4, a6 in ((t.host, "up0", UPLINK4, UPLINK6), (t.inet, "wan0", INET4, INET6)):
            ip("-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            ip("-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", t.host, "route", "add", "default", "via", INET4)
        ip("-n", t.host, "-6", "route", "add", "default", "via", INET6)
        for dest in DESTINATIONS:
            ip("-n", t.inet, "addr", "add", dest, "dev", "lo")
        yield t
    finally:
        for ns in (t.host, t.inet):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.fixture(params=["tc", "tcx"])
def manager(topo: Topology, request: pytest.FixtureRequest) -> Iterator[NetworkManager]:
    """A started manager in `host`, once per attach mode (clsact and TCX)."""
    config = NetworkConfig(pool_size=1, ipv6_forwarding=True, tcx=request.param == "tcx")
    mgr = NetworkManager(config, ns=topo.host)
    mgr.start()
    try:
        yield mgr
    finally:
        mgr.close()

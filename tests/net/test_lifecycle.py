"""Allocation, release, reconcile and the host guard: nothing outlives a sandbox."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import socket
import subprocess
import time

import pytest
import trio
from pyroute2 import IPRoute

from cube.net import conntrack, frames, layout, nat, netns, tap
from cube.net.addressing import AddressPlan
from cube.net.build import object_path
from cube.net.filter import LOG_KEEP, MAPS, EgressFilter
from cube.net.manager import NetworkConfig, NetworkError, NetworkManager
from cube.net.policy import EgressPolicy
from tests.net.guest import WAIT, Guest, Sink, allocate
from tests.net.topology import UPLINK4

pytestmark = pytest.mark.net

CYCLES = 1000


def taps(ns: str) -> list[str]:
    with netns.entered(ns), IPRoute() as ipr:
        return sorted(tap.cube_taps(ipr, "cube"))


def bpf_objects() -> tuple[int, int]:
    """(programs, maps) of Cube's in the whole kernel (BPF objects are not per namespace)."""
    progs = json.loads(
        subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, check=True).stdout
    )
    maps = json.loads(
        subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, check=True).stdout
    )
    return (
        sum(p.get("name") == "cube_egress" for p in progs),
        sum(m.get("name", "").startswith("cube_") for m in maps),
    )


def settled_bpf_objects(expected: tuple[int, int]) -> tuple[int, int]:
    """Maps are freed after an RCU grace period, not when the last fd closes: wait for it."""
    deadline = time.monotonic() + 60
    while (found := bpf_objects()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def nft_rules(ns: str) -> int:
    out = subprocess.run(
        netns.command(ns, ["nft", "-j", "list", "ruleset"]), capture_output=True, check=True
    ).stdout
    return sum("rule" in item for item in json.loads(out)["nftables"])


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_many_cycles_leak_nothing(topo):
    pool = 4
    manager = NetworkManager(NetworkConfig(pool_size=pool), ns=topo.host)
    manager.start()
    trio.run(manager.fill_pool)
    policy = EgressPolicy(allow_out=("198.51.100.0/24", "2001:db8:1::/64"), deny_out=("0.0.0.0/0",))

    async def cycles(n: int) -> None:
        for _ in range(n):
            manager.release(await manager.allocate("sbx", policy))
            await manager.fill_pool()  # maintain's part: the slot is recycled

    pooled = (pool, pool * len(MAPS))  # one program and its maps per pooled tap
    trio.run(cycles, 1)  # warm up: libraries loaded, pool in its steady state
    before = (fds(), taps(topo.host), nft_rules(topo.host))
    assert len(before[1]) == pool and settled_bpf_objects(pooled) == pooled
    trio.run(cycles, CYCLES)
    assert (fds(), taps(topo.host), nft_rules(topo.host)) == before
    assert settled_bpf_objects(pooled) == pooled
    manager.close()
    assert taps(topo.host) == []
    assert not nat.exists(topo.host)
    assert settled_bpf_objects((0, 0)) == (0, 0)


def test_a_slot_whose_recycling_was_cancelled_is_still_deleted(topo):
    """The daemon stops (its upkeep cancelled) before a released slot was recycled."""
    manager = NetworkManager(NetworkConfig(pool_size=1), ns=topo.host)
    manager.start()

    async def release_then_stop() -> None:
        manager.release(await manager.allocate("sbx", EgressPolicy()))
        with trio.CancelScope() as upkeep:
            upkeep.cancel()
            await manager.fill_pool()

    trio.run(release_then_stop)
    manager.close()
    assert taps(topo.host) == []
    assert settled_bpf_objects((0, 0)) == (0, 0)


def test_a_tap_still_held_open_is_deleted_not_reused(manager, topo):
    net = allocate(manager, "sbx1", EgressPolicy())
    guest = Guest(topo.host, net)  # a VMM that was never stopped
    try:
        manager.release(net)
        trio.run(manager.fill_pool)
        assert net.tap not in taps(topo.host)
        with pytest.raises(OSError):
            guest.send("198.51.100.1")
    finally:
        guest.close()


def test_reconcile_removes_what_a_crash_left(topo):
    plan = AddressPlan("10.20.0.0/16", "fd63:7562:6500::/64", "cube")
    obj = object_path()
    with netns.entered(topo.host), IPRoute() as ipr:
        for _ in range(3):
            tap.create(ipr, plan.take())
        leftover = tap.create(ipr, plan.take())
        orphan = EgressFilter(obj, leftover, topo.host)  # a clsact filter outlives its loader
    nat.install(topo.host, "cube", "up0", "10.20.0.0/16", "fd63:7562:6500::/64")
    assert len(taps(topo.host)) == 4 and nat.exists(topo.host)
    NetworkManager(ns=topo.host).reconcile()
    assert taps(topo.host) == [] and not nat.exists(topo.host)
    orphan.close()


def test_release_forgets_the_sandboxs_connections(manager, topo):
    net = allocate(manager, "sbx1", EgressPolicy())
    guest, sink = Guest(topo.host, net), Sink(topo.inet)
    guest4 = guest.ip4
    try:
        guest.send("198.51.100.1", payload=b"one")
        sink.until(b"one")
        with netns.entered(topo.host):
            assert conntrack.forget([guest4]) == 1
        guest.send("198.51.100.1", payload=b"two")
        sink.until(b"two")
    finally:
        guest.close()
        sink.close()
    manager.release(net)
    trio.run(manager.fill_pool)  # maintain recycles the slot and forgets its flows
    again = allocate(manager, "sbx2", EgressPolicy())
    assert again.guest.address == net.guest.address  # same slot, handed out clean
    with netns.entered(topo.host):
        assert conntrack.forget([guest4]) == 0


def test_a_pooled_tap_drops_everything(topo):
    plan = AddressPlan("10.20.0.0/16", "fd63:7562:6500::/64", "cube")
    addresses = plan.take()
    with netns.entered(topo.host), IPRoute() as ipr:
        index = tap.create(ipr, addresses)
        flt = EgressFilter(object_path(), index, topo.host)
    try:
        assert flt.attach_mode == "tc"
        with netns.entered(topo.host):
            fd = tap.open_tap(addresses.tap)
        os.write(
            fd,
            frames.VNET_HDR
            + frames.arp_request(addresses.mac, addresses.guest4, addresses.gateway4),
        )
        os.close(fd)
        counts = flt.counters()
        assert counts[layout.Reason.DROP_DISABLED] == 1
        assert sum(counts[: layout.N_REASONS]) == 1
    finally:
        flt.close()


def test_decision_log_is_bounded_and_says_why(manager, topo):
    net = allocate(manager, "sbx1", EgressPolicy(deny_out=("203.0.113.0/24",)))
    guest = Guest(topo.host, net)
    start = time.time()
    try:
        guest.send("203.0.113.7", dport=443)
        guest.send("169.254.169.254", proto=frames.TCP, dport=80)
        first = manager.stats("sbx1")
        for _ in range(2000):
            guest.send("203.0.113.8")
    finally:
        guest.close()
    end = time.time()
    assert [(d.reason, d.destination, d.proto, d.port) for d in first.log] == [
        ("DROP_DENY", "203.0.113.7", frames.UDP, 443),
        ("DROP_ALWAYS", "169.254.169.254", frames.TCP, 80),
    ]
    # event times come from the kernel's clock; allow for float rounding only
    assert all(start - 0.01 <= d.time <= end + 0.01 for d in first.log)
    stats = manager.stats("sbx1")
    assert len(stats.log) == LOG_KEEP
    assert stats.log_lost > 0  # the ring buffer filled before anyone read it
    assert stats.packets["DROP_DENY"] == 2001
    assert stats.bytes_dropped > 0 and stats.bytes_passed == 0


def test_host_services_are_unreachable_from_taps_without_bpf(topo):
    """The nft input guard on its own: a Cube tap with no filter at all."""
    nat.install(topo.host, "cube", "up0", "10.20.0.0/16", "fd63:7562:6500::/64")
    addresses = AddressPlan("10.20.0.0/16", "fd63:7562:6500::/64", "cube").take()
    with netns.entered(topo.host):
        with IPRoute() as ipr:
            tap.create(ipr, addresses)
        service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        service.bind(("0.0.0.0", 5353))
        dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns.bind((str(addresses.gateway4), 53))
        fd = tap.open_tap(addresses.tap)
    try:
        link_mac = _tap_mac(topo.host, addresses.tap)
        for dst, port in (
            (UPLINK4, 5353),
            (str(addresses.gateway4), 5353),
            (str(addresses.gateway4), 53),
        ):
            frame = frames.packet(
                link_mac,
                addresses.mac,
                addresses.guest4,
                ipaddress.ip_address(dst),
                frames.UDP,
                1,
                port,
                dst.encode(),
            )
            os.write(fd, frames.VNET_HDR + frame)
        dns.settimeout(WAIT)
        assert dns.recvfrom(100)[0] == str(addresses.gateway4).encode()
        service.setblocking(False)
        with pytest.raises(BlockingIOError):
            service.recvfrom(100)
    finally:
        os.close(fd)
        service.close()
        dns.close()
    assert _nft_drops(topo.host) == 2


def _tap_mac(ns: str, name: str) -> str:
    with netns.entered(ns), IPRoute() as ipr:
        return ipr.get_links(ipr.link_lookup(ifname=name)[0])[0].get_attr("IFLA_ADDRESS")


def _nft_drops(ns: str) -> int:
    out = subprocess.run(
        netns.command(ns, ["nft", "-j", "list", "chain", "inet", "cube", "input"]),
        capture_output=True,
        check=True,
    ).stdout
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return expr["counter"]["packets"]
    raise AssertionError("no counter in the input chain")


def test_a_leased_slot_passes_nothing_until_assigned(manager, topo):
    """A warm VM holds a lease before any sandbox is made of it: its frames go nowhere."""
    lease = trio.run(manager.lease)
    guest, sink = Guest(topo.host, lease), Sink(topo.inet)
    try:
        guest.send("198.51.100.1", payload=b"early")
        trio.run(manager.assign, lease, "sbx1", EgressPolicy())
        guest.send("198.51.100.1", payload=b"late")
        got = sink.until(b"late")
    finally:
        guest.close()
        sink.close()
    assert [payload for payload, _ in got] == [b"late"]
    with pytest.raises(NetworkError):
        trio.run(manager.assign, lease, "sbx2", EgressPolicy())  # one sandbox per lease
    manager.release(lease)
    assert not manager.has_network("sbx1")
    manager.release(lease)  # idempotent: the VM's stop and a failed start may both give it back


def test_build_taps_go_with_their_builder(topo):
    """A template build's tap is deleted when the build ends, and by reconcile if the
    builder died first."""
    with netns.entered(topo.host):
        with tap.unconnected() as name:
            assert name in all_links(topo.host)
        assert name not in all_links(topo.host)
        dead = f"{tap.BUILD_PREFIX}{2**22 + 1}"  # above any pid_max: no such process
        fd = tap.open_tap(dead)
        fcntl.ioctl(fd, tap.TUNSETPERSIST, 1)
        os.close(fd)
    assert dead in all_links(topo.host)
    NetworkManager(ns=topo.host).reconcile()
    assert dead not in all_links(topo.host)


def all_links(ns: str) -> list[str]:
    with netns.entered(ns), IPRoute() as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]


def test_an_uplink_named_like_a_tap_is_refused(topo):
    """The nft rules match taps by name prefix: such an uplink would be taken for a tap."""
    with pytest.raises(NetworkError, match="tap prefix"):
        NetworkManager(NetworkConfig(uplink="cubeup0"), ns=topo.host).start()

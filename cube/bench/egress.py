"""`cube bench net`: what the egress filter costs per packet, and how long a sandbox's network
takes to set up, measured in one run inside a private network namespace (never the host's).

Per-packet cost: the writer plays the guest and writes one 60-byte UDP frame after another into
the tap, as a VMM would. A tap write runs the host's receive path synchronously (filter, then
routing to a blackhole route, as forwarded egress would be routed), so frames/s is the path's
throughput on one core and 1/rate its time per frame; the difference to the unfiltered tap is
the latency the filter adds to every packet. Cases alternate within each round so that machine
noise spreads over all of them.

Setup time: `allocate` with a warm pool (the daemon's normal case: only map updates) against
an empty pool (tap, addresses and program load from scratch).
"""

from __future__ import annotations

import ipaddress
import os
import statistics
import subprocess
import time

import trio
from pyroute2 import IPRoute

from cube.net import frames, nat, netns, tap
from cube.net.addressing import AddressPlan
from cube.net.build import object_path
from cube.net.filter import EgressFilter, config_for
from cube.net.manager import NetworkConfig, NetworkManager
from cube.net.policy import EgressPolicy, compile_policy
from cube.net.rules import RuleSet

ALLOWED = ipaddress.ip_address("198.51.100.1")
DENIED = ipaddress.ip_address("203.0.113.1")
# 200 allow prefixes besides the one used, like a busy sandbox's rules; plus a deny-all.
POLICY = EgressPolicy(
    allow_out=(
        str(ALLOWED),
        *(f"100.{i}.0.0/16" for i in range(128, 228)),
        *(f"2001:db8:{i:x}::/48" for i in range(100)),
    ),
    deny_out=("0.0.0.0/0",),
)
CASES = (
    ("no filter", None, ALLOWED),
    ("clsact filter, packet passes", False, ALLOWED),
    ("TCX filter, packet passes", True, ALLOWED),
    ("clsact filter, packet dropped", False, DENIED),
)


def _rate(fd: int, frame: bytes, seconds: float) -> float:
    data = frames.VNET_HDR + frame
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(1000):
            os.write(fd, data)
        count += 1000
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def _throughput(ns: str, seconds: float, rounds: int) -> dict[str, list[float]]:
    addresses = AddressPlan("10.20.0.0/16", "fd63:7562:6500::/64", "cube").take()
    obj = object_path()
    config = config_for(addresses, internet=True)
    policy = compile_policy(POLICY)
    with netns.entered(ns), IPRoute() as ipr:
        index = tap.create(ipr, addresses)
        gateway_mac = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
        ipr.route("add", dst="198.51.100.0/24", type="blackhole")
        ipr.route("add", dst="203.0.113.0/24", type="blackhole")
        fd = tap.open_tap(addresses.tap)
    rates: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    try:
        for _ in range(rounds):
            for name, tcx, dst in CASES:
                frame = frames.packet(
                    gateway_mac,
                    addresses.mac,
                    addresses.guest4,
                    dst,
                    frames.UDP,
                    40000,
                    9000,
                    bytes(18),
                )
                flt = None if tcx is None else EgressFilter(obj, index, ns, tcx=tcx)
                try:
                    if flt is not None:
                        RuleSet(flt, config, policy)
                    rates[name].append(_rate(fd, frame, seconds))
                finally:
                    if flt is not None:
                        flt.close()
    finally:
        os.close(fd)
    return rates


def _setup_times(ns: str, count: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"allocate, warm pool": [], "allocate, empty pool": []}
    for label, pool in (("allocate, warm pool", 1), ("allocate, empty pool", 0)):
        manager = NetworkManager(NetworkConfig(uplink="lo", pool_size=pool), ns=ns)
        manager.start()

        async def cycles(manager: NetworkManager = manager, label: str = label) -> None:
            for _ in range(count):
                await manager.fill_pool()  # what the daemon's maintain() does between creates
                start = time.perf_counter()
                lease = await manager.allocate("bench", POLICY)
                times[label].append(time.perf_counter() - start)
                manager.release(lease)

        try:
            trio.run(cycles)
        finally:
            manager.close()
    return times


def run(seconds: float = 1.0, rounds: int = 2, setups: int = 50) -> str:
    """Measure (see the module doc) and return the table."""
    ns = f"cube-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        nat.enable_forwarding(ns, ipv6=False)
        rates = _throughput(ns, seconds, rounds)
        setup = _setup_times(ns, setups)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    base = statistics.median(rates[CASES[0][0]])
    lines = [
        f"{'tap write path (60-byte UDP)':<34} {'frames/s':>12} {'µs/frame':>9} {'added µs':>9}"
    ]
    for name, values in rates.items():
        rate = statistics.median(values)
        added = 1e6 / rate - 1e6 / base
        lines.append(f"{name:<34} {rate:>12,.0f} {1e6 / rate:>9.2f} {added:>+9.2f}")
    lines.append("")
    lines.append(f"{'network setup':<34} {'p50 ms':>12} {'p95 ms':>9}")
    for name, values in setup.items():
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        lines.append(f"{name:<34} {statistics.median(ordered) * 1e3:>12.2f} {p95 * 1e3:>9.2f}")
    return "\n".join(lines)

"""Making a restored guest a new machine: clock, RNG, hostname, machine-id and eth0.

Every clone of a template resumes with the template's wall clock, kernel entropy pool, hostname,
machine-id and address. The host pushes fresh values after each restore (``wire.Refresh``) and
this module applies them. It runs only inside the guest: in host mode (tests) none of this may
touch the machine the agent runs on, and ``apply_guest_identity`` is never called there.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import struct
import time

from cube.guest.agent.atomic import write_atomic
from cube.guest.wire import Identity, NetConfig

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
MAX_SEED = 4096
IFA_F_NODAD = 0x02  # the link has exactly one other end, whose address the host chose
_HOSTNAME = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_MACHINE_ID = re.compile(r"\A[0-9a-f]{32}\Z")


def set_clock(wall_clock_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, wall_clock_ns)


def reseed_rng(seed: bytes) -> None:
    """Mix host randomness into the kernel pool and credit it, so clones diverge at once."""
    seed = seed[:MAX_SEED]
    if not seed:
        return
    request = struct.pack("ii", len(seed) * 8, len(seed)) + seed
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, request)
    finally:
        os.close(fd)


def set_hostname(hostname: str) -> None:
    if not _HOSTNAME.match(hostname):
        raise ValueError(f"invalid hostname {hostname!r}")
    socket.sethostname(hostname)
    write_atomic("/etc/hostname", hostname.encode() + b"\n")


def set_machine_id(machine_id: str) -> None:
    if not _MACHINE_ID.match(machine_id):
        raise ValueError("machine-id must be 32 lowercase hex digits")
    write_atomic("/etc/machine-id", machine_id.encode() + b"\n", 0o444)


def preload() -> None:
    """Import pyroute2 before the template's snapshot is taken, so every clone has it in memory.

    Imported on the first Refresh instead, it was paid by every clone on its way to its first
    request: about 0.2 s on this host's CPU, and about 5 s of each create in the TCG-nested lab.
    Host mode never configures a network, so it never calls this. pyroute2 warns on import that
    the guest kernel has no traffic control (/proc/net/psched); nothing here uses it.
    """
    logging.getLogger("pyroute2.netlink.rtnl.tcmsg").setLevel(logging.ERROR)
    import pyroute2  # noqa: F401


def configure_network(net: NetConfig, ifname: str = "eth0") -> None:
    """Give eth0 this clone's MAC, addresses, default routes and resolvers (pyroute2: only the
    guest needs it, imported by `preload`). The link goes down for the MAC change, which also
    drops the template's (or the previous clone's) neighbours and routes."""
    import ipaddress

    from pyroute2 import IPRoute

    interfaces = [ipaddress.ip_interface(net.address)]
    gateways = [ipaddress.ip_address(net.gateway)]
    if net.address6 and net.gateway6:
        interfaces.append(ipaddress.ip_interface(net.address6))
        gateways.append(ipaddress.ip_address(net.gateway6))
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            raise OSError(f"no interface {ifname}")
        index = links[0]
        if net.mac:
            ipr.link("set", index=index, state="down")
            ipr.link("set", index=index, address=net.mac)
        ipr.flush_addr(index=index)
        for interface in interfaces:
            ipr.addr(
                "add",
                index=index,
                address=str(interface.ip),
                prefixlen=interface.network.prefixlen,
                flags=IFA_F_NODAD,
            )
        ipr.link("set", index=index, state="up")
        for gateway in gateways:
            family = socket.AF_INET if gateway.version == 4 else socket.AF_INET6
            ipr.route("replace", family=family, dst="default", gateway=str(gateway), oif=index)
    resolv = "".join(f"nameserver {ipaddress.ip_address(d)}\n" for d in net.dns)
    write_atomic("/etc/resolv.conf", resolv.encode())


def apply_guest_identity(identity: Identity) -> list[str]:
    """Apply every machine-level part; returns the failures (each step is tried regardless)."""
    steps = [
        ("clock", lambda: set_clock(identity.wall_clock_ns)),
        ("rng", lambda: reseed_rng(identity.rng_seed)),
        ("hostname", lambda: set_hostname(identity.hostname)),
        ("machine-id", lambda: set_machine_id(identity.machine_id)),
    ]
    if identity.network is not None:
        network = identity.network
        steps.append(("network", lambda: configure_network(network)))
    errors = []
    for name, step in steps:
        try:
            step()
        except (OSError, ValueError) as e:
            errors.append(f"{name}: {e}")
    return errors

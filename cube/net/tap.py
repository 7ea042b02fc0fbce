"""Create and delete the host side of a sandbox's link: a persistent tap with the gateway address.

The tap is made with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR and TUNSETPERSIST, then closed: the VMM opens
it again by name with TUNSETIFF and the same flags (the last TUNSETIFF's feature flags win, so
the VMM must ask for IFF_VNET_HDR itself to use offloads). Until the VMM opens it the tap has no
carrier and passes nothing. Permanent neighbour entries for the guest's addresses mean the host
never has to trust an ARP or ND answer from the guest.
All calls run in the current thread's network namespace (see netns.py).
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute

from cube.net.addressing import V4_SLOT_PREFIX, V6_SLOT_PREFIX, SlotAddresses

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
NUD_PERMANENT = 0x80
BUILD_PREFIX = "cubeb"  # + the building process's pid; never matches `cube_taps`
BUILD_MAC = "02:63:62:ff:ff:ff"  # outside the slots' MACs; each clone sets its own


def open_tap(name: str, flags: int = TAP_FLAGS) -> int:
    """An fd on tap `name` (created if missing), as the VMM would open it."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _persist(name: str) -> None:
    fd = open_tap(name)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def create(ipr: IPRoute, addr: SlotAddresses) -> int:
    """Create the tap for `addr`'s slot, address and bring it up; returns its ifindex."""
    _persist(addr.tap)
    (index,) = ipr.link_lookup(ifname=addr.tap)
    ipr.addr("add", index=index, address=str(addr.gateway4), prefixlen=V4_SLOT_PREFIX)
    ipr.addr(
        "add", index=index, address=str(addr.gateway6), prefixlen=V6_SLOT_PREFIX, flags=0x02
    )  # IFA_F_NODAD: the link has exactly one other end, whose address we chose
    for guest in (addr.guest4, addr.guest6):
        ipr.neigh("add", dst=str(guest), lladdr=addr.mac, ifindex=index, state=NUD_PERMANENT)
    ipr.link("set", index=index, state="up")
    return index


def delete(ipr: IPRoute, name: str) -> None:
    """Delete tap `name`; its addresses, routes, neighbours and attached programs go with it."""
    found = ipr.link_lookup(ifname=name)
    if found:
        ipr.link("del", index=found[0])


def cube_taps(ipr: IPRoute, prefix: str) -> list[str]:
    """Names of the tun/tap links that look like Cube's (`<prefix><digits>`)."""
    names = []
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        if kind == "tun" and name.startswith(prefix) and name[len(prefix) :].isdigit():
            names.append(name)
    return names


@contextmanager
def unconnected(index: int = 0) -> Iterator[str]:
    """A tap for a template build's VM: the template needs its network device, but the build
    has no network. The tap has no address and stays down, so the guest's frames (none: eth0
    is configured only on a clone's identity refresh) go nowhere. Deleted on exit, and by
    `stale_build_taps` if the builder dies first. A process that needs several (a bench with
    restores in flight at once) numbers them."""
    name = f"{BUILD_PREFIX}{os.getpid()}" + (f"-{index}" if index else "")
    with IPRoute() as ipr:
        delete(ipr, name)  # a leftover of an earlier build by a process with our pid
        _persist(name)
        try:
            yield name
        finally:
            delete(ipr, name)


def stale_build_taps(ipr: IPRoute) -> list[str]:
    """Build taps whose building process is gone."""
    names = []
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        pid = name[len(BUILD_PREFIX) :].partition("-")[0]
        if name.startswith(BUILD_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            names.append(name)
    return names

"""Opening an existing tap for a virtio-net device (vmm-facts.md §7).

The host networking layer (cube/net) creates, addresses and owns every tap; the VMM only
attaches to one by name. TUNSETIFF would silently *create* a missing tap (a throwaway one, gone
when we close it, that no route or filter knows about), so an attach that did not land on a
persistent tap is undone and refused. The name is resolved in the network namespace of the
thread that calls `open_tap`.

The fd is non-blocking and speaks frames prefixed by the 12-byte virtio_net_hdr (IFF_VNET_HDR
with TUNSETVNETHDRSZ 12, the VERSION_1 layout), so guest buffers go to and from the tap as they
are, with no re-framing copy.
"""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_PERSIST = 0x0800
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
VNET_HDR_SIZE = 12
IFNAMSIZ = 16

_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")


class TapError(OSError):
    """The tap could not be attached."""


def open_tap(name: str) -> int:
    """Attach to the existing tap `name`; returns its non-blocking fd."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw:
        raise TapError(f"invalid tap name {name!r}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        except OSError as error:
            raise TapError(
                error.errno, f"cannot attach to tap {name!r}: {error.strerror}"
            ) from None
        _, flags = _IFREQ.unpack(fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size)))
        if not flags & IFF_PERSIST:
            raise TapError(f"there is no tap named {name!r} (the network layer creates taps)")
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        set_offload(fd, 0)  # until a driver negotiates offloads, hand us finished frames only
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_offload(fd: int, flags: int) -> None:
    """Tell the tap which offloads the reader (the guest) accepts: TUN_F_* bits."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)

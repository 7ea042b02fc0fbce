"""Per-sandbox addresses: each slot of the configured ranges is one sandbox's point-to-point link.

Slot i owns the i-th /30 of the IPv4 range (gateway .1 on the tap, guest .2) and the i-th /126 of
the IPv6 range (same layout), a tap named `<prefix><i>` and a locally administered MAC derived
from i. Live sandboxes never share a slot, so addresses, names and MACs are unique among them.
Freed slots go to the back of the queue so that an address is reused as late as possible (a
just-freed address may still have conntrack entries from the sandbox before).
"""

from __future__ import annotations

import ipaddress
from collections import deque

import msgspec

from cube.guest.wire import NetConfig

V4_SLOT_PREFIX = 30
V6_SLOT_PREFIX = 126
MAX_SLOTS = 65536  # the MAC has room for 3 bytes of slot number; names stay under IFNAMSIZ


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """One slot, as a VM uses it: the tap to attach to and what its guest configures on eth0.
    A slot's addresses are fixed, so this is known before any sandbox is assigned to it."""

    tap: str
    mac: str
    guest: NetConfig


class SlotAddresses(msgspec.Struct, frozen=True, kw_only=True):
    slot: int
    tap: str
    mac: str  # the guest's
    gateway4: ipaddress.IPv4Address
    guest4: ipaddress.IPv4Address
    gateway6: ipaddress.IPv6Address
    guest6: ipaddress.IPv6Address

    def lease(self) -> Lease:
        """The slot's guest side; the gateways are its resolvers too (dns.py)."""
        return Lease(
            tap=self.tap,
            mac=self.mac,
            guest=NetConfig(
                address=f"{self.guest4}/{V4_SLOT_PREFIX}",
                gateway=str(self.gateway4),
                dns=[str(self.gateway4)],
                mac=self.mac,
                address6=f"{self.guest6}/{V6_SLOT_PREFIX}",
                gateway6=str(self.gateway6),
            ),
        )


class AddressError(ValueError):
    """A range that cannot hold a slot, or no slot left."""


class AddressPlan:
    """Hands out slots of `range4`/`range6`; the IPv6 range must hold as many /126s as v4 /30s."""

    def __init__(self, range4: str, range6: str, prefix: str) -> None:
        self.range4 = ipaddress.IPv4Network(range4)
        self.range6 = ipaddress.IPv6Network(range6)
        if self.range4.prefixlen > V4_SLOT_PREFIX or self.range6.prefixlen > V6_SLOT_PREFIX:
            raise AddressError("address ranges are smaller than one slot")
        count = min(
            2 ** (V4_SLOT_PREFIX - self.range4.prefixlen),
            2 ** (V6_SLOT_PREFIX - self.range6.prefixlen),
            MAX_SLOTS,
        )
        if len(prefix) + len(str(count - 1)) > 15:
            raise AddressError(f"tap prefix {prefix!r} is too long for interface names")
        self.prefix = prefix
        self._free = deque(range(count))

    def take(self) -> SlotAddresses:
        if not self._free:
            raise AddressError("no free sandbox address left in the configured range")
        return self.addresses(self._free.popleft())

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def addresses(self, slot: int) -> SlotAddresses:
        base4 = int(self.range4.network_address) + 4 * slot
        base6 = int(self.range6.network_address) + 4 * slot
        return SlotAddresses(
            slot=slot,
            tap=f"{self.prefix}{slot}",
            mac="02:63:62:" + ":".join(f"{b:02x}" for b in slot.to_bytes(3, "big")),
            gateway4=ipaddress.IPv4Address(base4 + 1),
            guest4=ipaddress.IPv4Address(base4 + 2),
            gateway6=ipaddress.IPv6Address(base6 + 1),
            guest6=ipaddress.IPv6Address(base6 + 2),
        )

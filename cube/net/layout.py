"""What the eBPF egress classifier and its Python loader must agree on, in one place.

`header()` renders these numbers as `cube_layout.h`, which the C source includes; the build
(cube/net/build.py) hashes that text into the artifact key. Changing a reason here therefore
rebuilds the program, and the two sides can never drift apart.
"""

from __future__ import annotations

import enum
import struct


class Reason(enum.IntEnum):
    """Why the classifier passed or dropped a frame; also the counter slot it increments.

    Pass reasons come first: the program treats every reason >= DROP_DENY as a drop.
    """

    PASS_ALLOW = 0  # destination matched allow_out
    PASS_DEFAULT = 1  # matched neither list: E2B's default is to allow
    PASS_DNS = 2  # UDP/TCP port 53 to the sandbox's own gateway
    PASS_ARP = 3  # ARP in the sandbox's own name
    PASS_ND = 4  # IPv6 neighbour discovery on the link
    DROP_DENY = 5  # destination matched deny_out (and not allow_out)
    DROP_ALWAYS = 6  # host, other sandboxes, private, link-local, loopback, multicast, metadata
    DROP_NO_INTERNET = 7  # allow_internet_access is false
    DROP_SPOOF = 8  # source MAC or IP is not the sandbox's
    DROP_ETHERTYPE = 9  # not IPv4/IPv6/ARP, or VLAN-tagged
    DROP_MALFORMED = 10  # headers cannot be read or make no sense
    DROP_IPV6_EXT = 11  # IPv6 extension header (incl. fragments)
    DROP_DISABLED = 12  # the tap is not handed to a sandbox yet

    @property
    def passes(self) -> bool:
        return self < Reason.DROP_DENY


N_REASONS = len(Reason)
SLOT_BYTES_PASSED = N_REASONS
SLOT_BYTES_DROPPED = N_REASONS + 1
SLOT_LOG_LOST = N_REASONS + 2  # drops the ring buffer had no room to record
N_COUNTERS = N_REASONS + 3

FLAG_INTERNET = 1  # allow_internet_access
FLAG_DNS = 2  # DNS to the gateway is answered

ALLOW_ENTRIES = 4096  # allow_out rules plus addresses pinned by the DNS resolver
DENY_ENTRIES = 1024
BLOCK_ENTRIES = 256  # the always-deny list plus the host's own addresses
LOG_BYTES = 16384  # ring buffer per sandbox: about 400 drop events between two reads

# struct config: guest MAC, enabled, flags, guest4, gateway4, guest6, gateway6
CONFIG = struct.Struct("=6sBB4s4s16s16s")
# struct event: ts_ns, reason, family, proto, pad, dport, pad, daddr
EVENT = struct.Struct("=QBBBxHxx16s")
KEY4 = struct.Struct("=I4s")
KEY6 = struct.Struct("=I16s")


def header() -> str:
    """cube_layout.h: the constants above as C macros."""
    macros = {f"CUBE_{r.name}": int(r) for r in Reason}
    macros |= {
        "CUBE_N_REASONS": N_REASONS,
        "CUBE_FIRST_DROP": int(Reason.DROP_DENY),
        "CUBE_SLOT_BYTES_PASSED": SLOT_BYTES_PASSED,
        "CUBE_SLOT_BYTES_DROPPED": SLOT_BYTES_DROPPED,
        "CUBE_SLOT_LOG_LOST": SLOT_LOG_LOST,
        "CUBE_N_COUNTERS": N_COUNTERS,
        "CUBE_FLAG_INTERNET": FLAG_INTERNET,
        "CUBE_FLAG_DNS": FLAG_DNS,
        "CUBE_ALLOW_ENTRIES": ALLOW_ENTRIES,
        "CUBE_DENY_ENTRIES": DENY_ENTRIES,
        "CUBE_BLOCK_ENTRIES": BLOCK_ENTRIES,
        "CUBE_LOG_BYTES": LOG_BYTES,
    }
    lines = ["/* Generated from cube/net/layout.py; do not edit. */", "#pragma once"]
    lines += [f"#define {name} {value}" for name, value in macros.items()]
    return "\n".join(lines) + "\n"

"""A sandbox's egress policy: E2B's fields, validated, and compiled into what the filter holds.

Precedence (what the classifier does with a frame the guest sends, first match wins):

0. Before any rule: frames not in the sandbox's own name (source MAC, source IP), VLAN-tagged,
   neither IPv4/IPv6/ARP, unreadable, or carrying IPv6 extension headers are dropped; ARP in the
   sandbox's name and link-local IPv6 neighbour discovery pass (bpf/egress.bpf.c).
1. Always denied, whatever the user asked for: the host's own addresses, every sandbox's range
   (this one's included), RFC 1918, CGNAT 100.64/10, loopback, link-local (which holds the cloud
   metadata address 169.254.169.254), multicast and broadcast, other special-use ranges, and the
   IPv6 equivalents (ULA fc00::/7 with fd00:ec2::254, fe80::/10, ff00::/8, v4-mapped and NAT64
   prefixes that would reach IPv4 private space). See ALWAYS_DENY_V4 / _V6.
   The one exception: UDP/TCP port 53 to the sandbox's own gateway (Cube's resolver).
2. allow_internet_access = false: nothing else leaves (see below for DNS).
3. A destination in allow_out passes, even if deny_out also covers it, however specific the deny
   entry is. This is E2B's order (infra `tcpfirewall.isEgressAllowed`: allow, then deny, then
   default; its nft chain does the same): allowOut is the exception list to denyOut.
4. A destination in deny_out is dropped.
5. Anything else passes (E2B's default: no lists means open internet).

E2B details mirrored: entries are IPs or CIDRs (host bits are masked, as Go's ParseCIDR does);
unspecified addresses are refused except the all-traffic CIDR; domains are accepted only in
allow_out, and only together with "0.0.0.0/0" in deny_out (E2B answers 400 otherwise).

Cube's own choices:
- "0.0.0.0/0" (E2B's ALL_TRAFFIC) means all traffic in either list, IPv6 included, and so does
  "::/0"; otherwise "deny everything" would leave IPv6 open. E2B sandboxes have no IPv6.
- allow_internet_access = false closes DNS too. E2B documents the flag as deny_out=0.0.0.0/0
  (allow_out entries still pass there); the issue asks for "no egress at all", and a resolver
  that forwards upstream is an exfiltration channel (data in query names), so Cube drops every
  packet including DNS and ignores allow_out while the flag is off. ARP still works, so the
  guest's stack behaves normally; it just reaches nothing.
- Domains in allow_out (exact, `*.suffix`, or `*` for any name, as E2B matches them) only work
  through Cube's resolver (cube/net/dns.py): answers for them are pinned into the allow list for
  the record's TTL (plus a grace period). E2B instead matches names per TCP connection (SNI /
  Host) in a proxy; Cube's IP pins are coarser (see dns.py for the limits).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import msgspec

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALL_TRAFFIC = ("0.0.0.0/0", "::/0")
MAX_RULES = 1000  # per list; the maps hold more (allow also takes DNS pins), see layout.py
MAX_DOMAINS = 200

ALWAYS_DENY_V4 = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # RFC 1918
    "100.64.0.0/10",  # CGNAT; also where some clouds put metadata (100.100.100.200)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local
    "169.254.169.254/32",  # cloud metadata (covered above; listed so the intent is on record)
    "172.16.0.0/12",  # RFC 1918
    "192.0.0.0/24",  # IETF protocol assignments (OCI metadata 192.0.0.192)
    "192.168.0.0/16",  # RFC 1918
    "198.18.0.0/15",  # benchmarking, used inside some clouds
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, incl. 255.255.255.255
)
ALWAYS_DENY_V6 = (
    "::/96",  # unspecified, loopback, IPv4-compatible
    "::ffff:0:0/96",  # v4-mapped: would otherwise smuggle IPv4 destinations (ebpf-here.md P6)
    "64:ff9b::/96",  # NAT64 well-known prefix: reaches IPv4 private space through a NAT64
    "64:ff9b:1::/48",  # NAT64 local-use prefix
    "fc00::/7",  # ULA
    "fd00:ec2::254/128",  # AWS metadata over IPv6 (covered above; on record)
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
)

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class PolicyError(ValueError):
    """An egress policy that E2B would answer 400 to; the message says which entry."""


class EgressPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """E2B's egress fields (`allow_internet_access`, `network.allowOut`, `network.denyOut`)."""

    allow_internet_access: bool = True
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()


class CompiledPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """A validated policy as the filter holds it: networks per list and family, and domains."""

    internet: bool
    allow: frozenset[IPNetwork]
    deny: frozenset[IPNetwork]
    domains: tuple[str, ...]  # lower case; "*.example.com": strict subdomains; "*": any name


def _network(entry: str) -> IPNetwork | None:
    """The network an IP/CIDR entry names, or None if it is not an address at all."""
    if "%" in entry:
        raise PolicyError(f"{entry!r}: scoped addresses mean nothing outside the sandbox")
    try:
        net = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None
    if net.network_address.is_unspecified and net.prefixlen != 0:
        raise PolicyError(f"unspecified address {entry!r} is not allowed")
    return net


def _expand(net: IPNetwork) -> list[IPNetwork]:
    """ALL_TRAFFIC in either family stands for both (see the module doc)."""
    if net.prefixlen == 0:
        return [ipaddress.ip_network(a) for a in ALL_TRAFFIC]
    return [net]


def _domain(entry: str) -> str:
    name = entry.strip().lower().rstrip(".")
    if name == "*":  # E2B: every name (still only through Cube's resolver, and pinned)
        return name
    labels = name.removeprefix("*.").split(".")
    bad = len(name) > 253 or len(labels) < 2 or labels[-1].isdigit()
    if bad or not all(_LABEL.match(x) for x in labels):
        raise PolicyError(f"{entry!r} is neither an IP, a CIDR nor a domain name")
    return name


def _bounded(entries: tuple[str, ...], field: str) -> None:
    if len(entries) > MAX_RULES:
        raise PolicyError(f"{field} has {len(entries)} entries; at most {MAX_RULES}")


def compile_policy(policy: EgressPolicy) -> CompiledPolicy:
    """Validate `policy` as E2B does and turn it into networks and domains; raises PolicyError."""
    _bounded(policy.allow_out, "allow_out")
    _bounded(policy.deny_out, "deny_out")
    allow: set[IPNetwork] = set()
    domains: list[str] = []
    for entry in policy.allow_out:
        net = _network(entry)
        if net is None:
            domains.append(_domain(entry))
        else:
            allow.update(_expand(net))
    deny: set[IPNetwork] = set()
    for entry in policy.deny_out:
        net = _network(entry)
        if net is None:
            raise PolicyError(f"deny_out entry {entry!r} is not an IP or CIDR")
        deny.update(_expand(net))
    if len(domains) > MAX_DOMAINS:
        raise PolicyError(f"allow_out has {len(domains)} domains; at most {MAX_DOMAINS}")
    if domains and ipaddress.ip_network(ALL_TRAFFIC[0]) not in deny:
        raise PolicyError("allow_out contains domains but deny_out is missing 0.0.0.0/0")
    return CompiledPolicy(
        internet=policy.allow_internet_access,
        allow=frozenset(allow),
        deny=frozenset(deny),
        domains=tuple(dict.fromkeys(domains)),
    )


def always_deny(extra: Iterable[IPNetwork]) -> frozenset[IPNetwork]:
    """The fixed always-deny list plus `extra` (host addresses, sandbox ranges)."""
    fixed = [ipaddress.ip_network(c) for c in (*ALWAYS_DENY_V4, *ALWAYS_DENY_V6)]
    return frozenset([*fixed, *extra])


def domain_matches(name: str, patterns: Iterable[str]) -> bool:
    """E2B's matching: exact (case-insensitive), `*.suffix` for names strictly below suffix, or
    `*` for every name."""
    name = name.lower().rstrip(".")
    for pattern in patterns:
        if pattern in (name, "*"):
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False

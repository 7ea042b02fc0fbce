"""Cube's nftables table: NAT out of the uplink, forwarding rules, and the host's input guard.

One table, `inet cube`, holds everything, and its rules match taps by name prefix, so nothing
here changes per sandbox: allocate and release never touch nftables. Installing replaces the
whole table in one `nft -f` transaction; removing deletes it. Rules (prefix `cube`):

- forward: from a tap only to the uplink (no sandbox-to-sandbox, no other interfaces); to a tap
  only replies (ct established/related).
- input: from a tap only replies and DNS (udp/tcp 53) to an address of that same tap, i.e. its
  gateway; everything else is dropped. This repeats the eBPF filter's rule on purpose: if the host
  gains an address after a filter was configured, the host's services stay unreachable.
- postrouting: masquerade what leaves the uplink from the sandbox ranges.

Other tables' chains still see the packets (an nft accept is final only within its own chain),
so a host firewall that drops forwarding also drops sandbox traffic; `cube doctor` territory.
"""

from __future__ import annotations

import subprocess

from cube.net import netns

TABLE = "cube"


class NatError(RuntimeError):
    """nft refused the ruleset or is missing; the message carries its output."""


def ruleset(prefix: str, uplink: str, range4: str, range6: str) -> str:
    taps = f'"{prefix}*"'
    return f"""
table inet {TABLE} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {taps} ct state established,related accept
        iifname {taps} meta l4proto {{ udp, tcp }} th dport 53 fib daddr . iif type local accept
        iifname {taps} counter drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname {taps} oifname "{uplink}" accept
        iifname {taps} counter drop
        oifname {taps} ct state established,related accept
        oifname {taps} counter drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {range4} oifname "{uplink}" masquerade
        ip6 saddr {range6} oifname "{uplink}" masquerade
    }}
}}
"""


def _nft(ns: str | None, script: str) -> None:
    done = subprocess.run(
        netns.command(ns, ["nft", "-f", "-"]), input=script, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise NatError(f"nft failed: {done.stderr.strip()}")


def install(ns: str | None, prefix: str, uplink: str, range4: str, range6: str) -> None:
    """Create or replace the table atomically (the add-then-delete makes a missing table fine)."""
    body = ruleset(prefix, uplink, range4, range6)
    _nft(ns, f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n{body}")


def remove(ns: str | None) -> None:
    """Delete the table if it exists."""
    _nft(ns, f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")


def exists(ns: str | None) -> bool:
    done = subprocess.run(
        netns.command(ns, ["nft", "list", "table", "inet", TABLE]), capture_output=True
    )
    return done.returncode == 0


def enable_forwarding(ns: str | None, ipv6: bool) -> None:
    """Turn on routing in `ns`. IPv6 forwarding makes Linux ignore router advertisements on every
    interface (unless accept_ra=2), which can cut a SLAAC host off, hence opt-in.

    /proc/sys/net shows the namespace of the thread that opens it, so entering `ns` suffices.
    """
    keys = ["ipv4/ip_forward"] + (["ipv6/conf/all/forwarding"] if ipv6 else [])
    with netns.entered(ns):
        for key in keys:
            with open(f"/proc/sys/net/{key}", "w") as f:
                f.write("1")

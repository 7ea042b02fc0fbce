"""The two-namespace topology every network test runs in (see conftest.py for the picture)."""

from __future__ import annotations

import subprocess

import msgspec

UPLINK4, INET4 = "192.0.2.1", "192.0.2.2"
UPLINK6, INET6 = "2001:db8:ff::1", "2001:db8:ff::2"
DESTINATIONS = ("198.51.100.1", "198.51.100.2", "203.0.113.1", "2001:db8:1::1", "2001:db8:2::1")


class Topology(msgspec.Struct, frozen=True):
    host: str
    inet: str


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)

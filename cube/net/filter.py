"""One sandbox's egress classifier: its own copy of the program and maps, attached to its tap.

Each sandbox gets a separate load of the object, so every map (rules, counters, log) belongs to
one sandbox and nothing is pinned: the whole thing lives exactly as long as this object's fds
(ebpf-here.md P1/P2).

Two ways to attach, both on the tap's ingress (= the guest's egress):
- clsact (the default): a cls_bpf filter in direct-action mode. Measured here (6.18, 2 vCPU):
  attach 4-5 ms, detach 0.2 ms. It stays attached if the daemon dies, so a crashed daemon
  leaves its taps filtered (fail closed) until `reconcile` deletes them, taking filter,
  program and maps along.
- TCX (tcx=True; kernel >= 6.6, else clsact is used): a bpf_link whose fd owns the attachment.
  About 1 % cheaper per packet (ebpf-here.md §6), but attach and detach each wait for an RCU
  grace period: 18 ms and 12 ms here, which a daemon that recycles taps pays on every release.
Both allow a second program on the same tap, so a recycled tap gets its new filter before the
old one goes. Deleting the tap detaches either kind.

A fresh filter drops everything (its config says "disabled") until `configure` hands it to a
sandbox, so a pooled tap is never an open door.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from cube.net import layout, netns
from cube.net.addressing import SlotAddresses
from cube.net.libbpf import (
    BPF_ANY,
    BPF_TC_INGRESS,
    BPF_TCX_INGRESS,
    check,
    check_ptr,
    ffi,
    lib,
)
from cube.net.policy import IPNetwork

LOG_KEEP = 256  # decision log entries kept per sandbox (the newest)


class FilterConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Who the sandbox is on its tap (what the spoofing checks compare against) and its flags."""

    mac: str
    guest4: ipaddress.IPv4Address
    gateway4: ipaddress.IPv4Address
    guest6: ipaddress.IPv6Address
    gateway6: ipaddress.IPv6Address
    internet: bool
    dns: bool


def config_for(slot: SlotAddresses, internet: bool) -> FilterConfig:
    """The configuration for a sandbox on `slot`; DNS goes with internet access (policy.py)."""
    return FilterConfig(
        mac=slot.mac,
        guest4=slot.guest4,
        gateway4=slot.gateway4,
        guest6=slot.guest6,
        gateway6=slot.gateway6,
        internet=internet,
        dns=internet,
    )


class Drop(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """One entry of the decision log: a frame the filter dropped, when and why."""

    time: float  # Unix seconds
    reason: str  # a layout.Reason name
    family: int  # 4, 6 or 0 (not IP)
    proto: int  # IP protocol number
    port: int  # destination port (UDP/TCP, unfragmented), else 0
    destination: str | None


def _key(net: IPNetwork) -> bytes:
    fmt = layout.KEY4 if net.version == 4 else layout.KEY6
    return fmt.pack(net.prefixlen, net.network_address.packed)


@ffi.callback("int(void *, void *, size_t)")
def _on_event(ctx: Any, data: Any, size: int) -> int:
    ffi.from_handle(ctx)._record(bytes(ffi.buffer(data, size)))
    return 0


class EgressFilter:
    """The classifier loaded for tap `ifindex` of network namespace `ns` (None: the current one).

    clsact attach and detach go through rtnetlink, which resolves ifindex in the calling
    thread's namespace, so both enter `ns` themselves: a detach from the wrong namespace would
    silently miss (or hit another interface's filter with the same handle).
    """

    def __init__(self, obj: Path, ifindex: int, ns: str | None, tcx: bool = False) -> None:
        self._lib = lib()
        self._obj = check_ptr(self._lib.bpf_object__open_file(str(obj).encode(), ffi.NULL), "open")
        self._ns = ns
        self._link = -1
        self._tc: tuple[Any, Any] | None = None
        self._ring: Any = ffi.NULL
        self._handle = ffi.new_handle(self)
        self.log: deque[Drop] = deque(maxlen=LOG_KEEP)
        try:
            check(self._lib.bpf_object__load(self._obj), "load egress program")
            self._fds = {name: self._map_fd(name) for name in MAPS}
            prog = self._lib.bpf_object__find_program_by_name(self._obj, b"cube_egress")
            prog_fd = check(self._lib.bpf_program__fd(check_ptr(prog, "program")), "program fd")
            self._ring = check_ptr(
                self._lib.ring_buffer__new(
                    self._fds["cube_events"], _on_event, self._handle, ffi.NULL
                ),
                "ring buffer",
            )
            with netns.entered(ns):
                self._attach(prog_fd, ifindex, tcx)
        except BaseException:
            self.close()
            raise

    def _map_fd(self, name: str) -> int:
        found = check_ptr(self._lib.bpf_object__find_map_by_name(self._obj, name.encode()), name)
        return check(self._lib.bpf_map__fd(found), f"{name} fd")

    def _attach(self, prog_fd: int, ifindex: int, tcx: bool) -> None:
        if tcx:
            link = self._lib.bpf_link_create(prog_fd, ifindex, BPF_TCX_INGRESS, ffi.NULL)
            if link >= 0:
                self._link = link
                return
            if -link not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                check(link, "attach (tcx)")
        hook = ffi.new("struct bpf_tc_hook *", {"sz": 24, "ifindex": ifindex})
        hook.attach_point = BPF_TC_INGRESS
        ret = self._lib.bpf_tc_hook_create(hook)
        if ret != -errno.EEXIST:
            check(ret, "clsact")
        opts = ffi.new("struct bpf_tc_opts *", {"sz": 32, "prog_fd": prog_fd})
        check(self._lib.bpf_tc_attach(hook, opts), "attach (tc)")
        # Detaching needs only the handle and priority the kernel picked (libbpf rejects a
        # detach request that also names the program).
        self._tc = (
            hook,
            ffi.new(
                "struct bpf_tc_opts *", {"sz": 32, "handle": opts.handle, "priority": opts.priority}
            ),
        )

    @property
    def attach_mode(self) -> str:
        return "tcx" if self._link >= 0 else "tc"

    def configure(self, config: FilterConfig) -> None:
        """Hand the filter to a sandbox: from now on its frames are judged, not just dropped."""
        flags = (layout.FLAG_INTERNET if config.internet else 0) | (
            layout.FLAG_DNS if config.dns else 0
        )
        value = layout.CONFIG.pack(
            bytes.fromhex(config.mac.replace(":", "")),
            1,
            flags,
            config.guest4.packed,
            config.gateway4.packed,
            config.guest6.packed,
            config.gateway6.packed,
        )
        self._update("cube_cfg", (0).to_bytes(4, "little"), value)

    def add(self, trie: str, nets: Iterable[IPNetwork]) -> None:
        """Insert networks into trie `trie` ("allow", "deny" or "block"); effective at once."""
        for net in nets:
            self._update(f"cube_{trie}{net.version}", _key(net), b"\x01")

    def remove(self, trie: str, nets: Iterable[IPNetwork]) -> None:
        for net in nets:
            ret = self._lib.bpf_map_delete_elem(self._fds[f"cube_{trie}{net.version}"], _key(net))
            if ret != -errno.ENOENT:
                check(ret, f"delete from {trie}{net.version}")

    def _update(self, name: str, key: bytes, value: bytes) -> None:
        check(self._lib.bpf_map_update_elem(self._fds[name], key, value, BPF_ANY), f"update {name}")

    def counters(self) -> list[int]:
        """layout.N_COUNTERS totals, summed over CPUs."""
        ncpus = check(self._lib.libbpf_num_possible_cpus(), "cpus")
        buf = ffi.new("uint64_t[]", ncpus * layout.N_COUNTERS)
        key = ffi.new("uint32_t *", 0)
        check(self._lib.bpf_map_lookup_elem(self._fds["cube_stats"], key, buf), "read counters")
        return [
            sum(buf[cpu * layout.N_COUNTERS + slot] for cpu in range(ncpus))
            for slot in range(layout.N_COUNTERS)
        ]

    def drain_log(self) -> None:
        """Move whatever the ring buffer holds into `log` (bounded; oldest entries fall off)."""
        check(self._lib.ring_buffer__consume(self._ring), "read decision log")

    def _record(self, data: bytes) -> None:
        ts, reason, family, proto, port, daddr = layout.EVENT.unpack_from(data)
        dest = None
        if family == 4:
            dest = str(ipaddress.IPv4Address(daddr[:4]))
        elif family == 6:
            dest = str(ipaddress.IPv6Address(daddr))
        wall = time.time() - (time.monotonic_ns() - ts) / 1e9
        name = layout.Reason(reason).name
        self.log.append(
            Drop(time=wall, reason=name, family=family, proto=proto, port=port, destination=dest)
        )

    def close(self) -> None:
        """Detach and free the program, its maps and the ring buffer (idempotent)."""
        if self._link >= 0:
            os.close(self._link)
            self._link = -1
        if self._tc is not None:
            with netns.entered(self._ns):
                ret = self._lib.bpf_tc_detach(*self._tc)
            self._tc = None
            if ret not in (-errno.ENODEV, -errno.ENOENT):  # gone with its tap: fine
                check(ret, "detach (tc)")
        if self._ring != ffi.NULL:
            self._lib.ring_buffer__free(self._ring)
            self._ring = ffi.NULL
        if self._obj != ffi.NULL:
            self._lib.bpf_object__close(self._obj)
            self._obj = ffi.NULL


# Every map name starts with "cube_" so that bpftool listings (and the leak tests) can tell ours
# from anyone else's.
MAPS = tuple(
    f"cube_{name}"
    for name in ("cfg", "allow4", "deny4", "block4", "allow6", "deny6", "block6", "stats", "events")
)

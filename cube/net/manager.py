"""The daemon's entry point to sandbox networking: taps from a pool, per-sandbox filter and rules.

Life of a sandbox's network:
- `start()` cleans up what a crashed daemon left (`reconcile`), installs the nft table and turns
  on forwarding; `fill_pool()` (or `maintain()`) then builds the pool. A pooled slot is a tap
  with its gateway addresses, permanent neighbour entries and an attached filter that drops
  everything.
- `lease()` takes a pooled slot (or builds one if the pool is empty) for a VM to attach to; its
  filter still drops everything, so a VM restored ahead of demand (the warm pool) has no
  network until `assign()` validates the sandbox's policy and hands the filter to it: its
  identity (MAC, addresses) and rules go into the maps. `allocate()` does both at once.
- `update_policy()` edits the maps in place; the change applies to the next packet.
- `release()` (once the VM holding the lease has stopped) ends the sandbox's network: its rules,
  resolver and id go at once, and the slot waits, its old filter still attached, to be
  recycled by the next `fill_pool()` (which `maintain` runs at once). Recycling happens in a
  worker thread, since loading a program and talking netlink would stall every request of the
  daemon meanwhile: the slot's tap gets a brand-new filter (attached before the old one is
  closed, so the tap is never unfiltered), the old one is closed (detaching it, freeing program
  and maps) and the slot goes back at the end of the pool, marked as still having the old
  sandbox's conntrack entries; those are deleted (conntrack.py) before the slot is handed out
  again, for all such slots in one table walk, usually by `maintain` ahead of time. Program,
  maps, counters and log are never reused, so nothing a sandbox did to them reaches the next
  one; only the tap and its fixed per-slot addresses are. A tap that still has a carrier (some
  process still holds it open, e.g. a VMM that was not stopped) is deleted instead: that fd
  must not end up speaking for the next sandbox. Taps beyond the pool size are deleted too.
- `maintain()` runs in the daemon's nursery: recycles and refills the pool, expires DNS pins,
  moves drop events from the ring buffers into the bounded per-sandbox logs, and hosts each
  sandbox's DNS resolver (dns.py) on its gateway. Sandboxes assigned while it is not running
  get no resolver.

Nothing is pinned in bpffs and the nft rules match taps by name, so after a crash the only
leftovers are taps, with their clsact filters still attached and dropping (fail closed), and
the table; `reconcile` deletes both, and the filters' programs and maps go with the taps.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import deque
from pathlib import Path

import msgspec
import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cube.net import conntrack, layout, nat, netns, tap
from cube.net.addressing import AddressPlan, Lease, SlotAddresses
from cube.net.build import object_path
from cube.net.dns import DnsError, SandboxResolver, host_resolver
from cube.net.filter import Drop, EgressFilter, config_for
from cube.net.policy import EgressPolicy, IPNetwork, always_deny, compile_policy
from cube.net.rules import RuleSet

log = logging.getLogger(__name__)

MAINTAIN_INTERVAL = 0.5  # seconds between pool refills / log drains / pin expiry
# Seconds between reads of the host's addresses for the always-deny list. A read dumps every
# address (each tap's gateway among them) through pyroute2, which costs real CPU per address:
# done on every tick on the trio thread, it kept an idle daemon busy and stalled its API.
BLOCKLIST_INTERVAL = 5.0


class NetworkConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Host-side network settings. The ranges must not be used by anything else on the host."""

    prefix: str = "cube"
    range4: str = "10.20.0.0/16"
    range6: str = "fd63:7562:6500::/64"
    uplink: str | None = None  # None: the interface of the default IPv4 route
    pool_size: int = 8
    ipv6_forwarding: bool = False  # see nat.enable_forwarding
    tcx: bool = False  # attach with TCX instead of clsact (see filter.py for the trade-off)
    dns_upstream: str | None = None  # IP of the resolver to forward to; None: the host's own


class NetStats(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Counters since allocation (packets per Reason name, bytes) and the newest drops."""

    packets: dict[str, int]
    bytes_passed: int
    bytes_dropped: int
    log_lost: int
    log: list[Drop]


class NetworkError(RuntimeError):
    """Unknown sandbox, no uplink, or a kernel refusal; the message says which."""


class _Slot(msgspec.Struct, kw_only=True):
    addresses: SlotAddresses
    ifindex: int
    filter: EgressFilter
    stale_flows: bool = False  # conntrack may still hold the previous sandbox's flows


class _Leased(msgspec.Struct, kw_only=True):
    slot: _Slot
    sandbox_id: str | None = None  # with rules, once assigned
    rules: RuleSet | None = None
    resolver: SandboxResolver | None = None


class NetworkManager:
    """All sandbox networks of one daemon, in network namespace `ns` (None: the current one)."""

    def __init__(self, config: NetworkConfig | None = None, ns: str | None = None) -> None:
        self.config = config or NetworkConfig()
        self.ns = ns
        self._plan = AddressPlan(self.config.range4, self.config.range6, self.config.prefix)
        self._object: Path = object_path()
        self._pool: deque[_Slot] = deque()  # oldest first: addresses are reused late
        self._returned: deque[_Slot] = deque()  # released, to be recycled or deleted
        self._leases: dict[str, _Leased] = {}  # by tap name
        self._assigned: dict[str, _Leased] = {}  # by sandbox id
        self._refill = trio.Event()
        self._nursery: trio.Nursery | None = None  # maintain()'s, where resolvers run
        self._blocked = self._read_blocklist()
        self._blocklist_due = 0.0  # trio time of the next read

    # -- setup and teardown of the whole host side --------------------------------------------

    def start(self) -> None:
        """Reconcile, install NAT and forwarding (the pool fills in `maintain` or `fill_pool`)."""
        self.reconcile()
        uplink = self.config.uplink or self._default_uplink()
        if uplink.startswith(self.config.prefix):
            raise NetworkError(
                f"uplink {uplink!r} starts with the tap prefix {self.config.prefix!r}: the nft "
                "rules match taps by that prefix and would treat it as a sandbox's tap"
            )
        nat.enable_forwarding(self.ns, self.config.ipv6_forwarding)
        nat.install(self.ns, self.config.prefix, uplink, self.config.range4, self.config.range6)

    def reconcile(self) -> None:
        """Delete every Cube tap and the nft table in the namespace: leftovers of a crash.

        Only taps this manager does not hold are touched, so calling it on a running manager
        is safe. Programs and maps need nothing: they are never pinned, a TCX link dies with the
        fds of the process that made it, and a clsact filter dies with its tap.
        """
        held = {s.addresses.tap for s in (*self._pool, *self._returned)} | set(self._leases)
        with netns.entered(self.ns), IPRoute() as ipr:
            for name in tap.cube_taps(ipr, self.config.prefix):
                if name not in held:
                    tap.delete(ipr, name)
            for name in tap.stale_build_taps(ipr):
                tap.delete(ipr, name)
        if not held:
            nat.remove(self.ns)

    def close(self) -> None:
        """Release every lease, empty the pool and remove the nft table."""
        for name in list(self._leases):
            self._take_back(name)
        for slots in (self._returned, self._pool):
            while slots:
                self._destroy(slots.pop())
        nat.remove(self.ns)

    def _default_uplink(self) -> str:
        with netns.entered(self.ns), IPRoute() as ipr:
            for route in ipr.get_default_routes(family=socket.AF_INET):
                oif = route.get_attr("RTA_OIF")
                if oif:
                    return ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")
        raise NetworkError("no default IPv4 route: set NetworkConfig.uplink")

    # -- slots ------------------------------------------------------------------------------

    def _read_blocklist(self) -> frozenset[IPNetwork]:
        """The always-deny list for this host now: fixed ranges, sandbox ranges, host addresses.
        Runs in any thread (it enters the namespace on its own)."""
        with netns.entered(self.ns), IPRoute() as ipr:
            host = [
                ipaddress.ip_network(msg.get_attr("IFA_ADDRESS").split("%")[0])
                for msg in ipr.get_addr()
            ]
        return _collapse(always_deny([self._plan.range4, self._plan.range6, *host]))

    def _filter(self, ipr: IPRoute, ifindex: int, blocked: frozenset[IPNetwork]) -> EgressFilter:
        """A new filter on `ifindex`, closed (drops everything), with the always-deny list
        `blocked` (the list when the caller began: see `_catch_up`). Runs in any thread."""
        flt = EgressFilter(self._object, ifindex, self.ns, tcx=self.config.tcx)
        try:
            flt.add("block", blocked)
        except BaseException:
            flt.close()
            raise
        return flt

    def _catch_up(self, flt: EgressFilter, blocked: frozenset[IPNetwork]) -> None:
        """Bring a filter built in a worker thread with the always-deny list `blocked` to the
        current one: the list may have changed meanwhile, and the change skipped that filter,
        which was in neither the pool nor a lease."""
        flt.add("block", self._blocked - blocked)
        flt.remove("block", blocked - self._blocked)

    def refresh_blocklist(self) -> None:
        """Follow the host's addresses (DHCP, a new bridge...) into every filter's always-deny
        list; `maintain` does this every BLOCKLIST_INTERVAL, reading in a worker thread."""
        self._apply_blocklist(self._read_blocklist())

    def _apply_blocklist(self, blocked: frozenset[IPNetwork]) -> None:
        """New entries go in before old ones go out."""
        if blocked == self._blocked:
            return
        filters = [s.filter for s in self._pool] + [s.slot.filter for s in self._leases.values()]
        for flt in filters:
            flt.add("block", blocked - self._blocked)
        for flt in filters:
            flt.remove("block", self._blocked - blocked)
        self._blocked = blocked

    def _build(self, addresses: SlotAddresses, blocked: frozenset[IPNetwork]) -> _Slot:
        """Create a slot's tap and attached (closed) filter; runs in any thread."""
        with netns.entered(self.ns), IPRoute() as ipr:
            try:
                index = tap.create(ipr, addresses)
                flt = self._filter(ipr, index, blocked)
            except BaseException:
                tap.delete(ipr, addresses.tap)
                raise
        return _Slot(addresses=addresses, ifindex=index, filter=flt)

    async def _new_slot(self) -> _Slot:
        addresses, blocked = self._plan.take(), self._blocked
        try:
            slot = await trio.to_thread.run_sync(self._build, addresses, blocked)
        except BaseException:
            self._plan.give_back(addresses.slot)
            raise
        self._catch_up(slot.filter, blocked)
        return slot

    def _teardown(self, slot: _Slot) -> None:
        """Close the slot's filter, delete its tap and flows; runs in any thread."""
        a = slot.addresses
        slot.filter.close()
        with netns.entered(self.ns), IPRoute() as ipr:
            tap.delete(ipr, a.tap)
            conntrack.forget([a.guest4, a.guest6])

    def _destroy(self, slot: _Slot) -> None:
        self._teardown(slot)
        self._plan.give_back(slot.addresses.slot)

    def _renew(self, slot: _Slot, keep: bool, blocked: frozenset[IPNetwork]) -> EgressFilter | None:
        """A released slot's fresh filter, or None once the slot is torn down (not `keep`,
        still carrying, or no new filter could be made); runs in a worker thread, on a slot
        nothing else can reach."""
        fresh = None
        try:
            with netns.entered(self.ns), IPRoute() as ipr:
                try:
                    busy = ipr.get_links(slot.ifindex)[0].get_attr("IFLA_CARRIER")
                except NetlinkError:  # the tap is gone already: nothing to recycle
                    busy = True
                if keep and not busy:
                    fresh = self._filter(ipr, slot.ifindex, blocked)
        except Exception:
            log.exception("cannot recycle tap %s; deleting it", slot.addresses.tap)
        if fresh is None:
            self._teardown(slot)
        else:
            slot.filter.close()
        return fresh

    async def _recycle(self) -> None:
        """Put released slots back in the pool with fresh filters, or delete them. A slot
        leaves `_returned` only once its thread has run: one cancelled before it started (the
        daemon stopping) stays there, for `close` to delete."""
        while self._returned:
            slot, blocked = self._returned[0], self._blocked
            keep = len(self._pool) < self.config.pool_size
            fresh = await trio.to_thread.run_sync(self._renew, slot, keep, blocked)
            self._returned.popleft()
            if fresh is None:
                self._plan.give_back(slot.addresses.slot)
                continue
            self._catch_up(fresh, blocked)
            slot.filter = fresh
            slot.stale_flows = True
            self._pool.append(slot)

    async def fill_pool(self) -> None:
        """Make the pool ready: recycle released slots, build missing ones, forget recycled
        slots' old flows."""
        await self._recycle()
        self._forget_stale_flows()
        while len(self._pool) < self.config.pool_size:
            self._pool.append(await self._new_slot())

    # -- per sandbox ------------------------------------------------------------------------

    async def lease(self) -> Lease:
        """A slot for a VM to attach to; it passes nothing until `assign`."""
        if self._pool and self._pool[0].stale_flows:
            self._forget_stale_flows()
        slot = self._pool.popleft() if self._pool else await self._new_slot()
        self._refill.set()
        a = slot.addresses
        self._leases[a.tap] = _Leased(slot=slot)
        return a.lease()

    async def assign(self, lease: Lease, sandbox_id: str, policy: EgressPolicy) -> None:
        """Open `lease`'s filter to `sandbox_id` under `policy` (PolicyError if invalid) and
        start its DNS resolver; from here the sandbox's rules apply to every packet."""
        compiled = compile_policy(policy)
        leased = self._leases.get(lease.tap)
        if leased is None or leased.sandbox_id is not None:
            raise NetworkError(f"tap {lease.tap} is not leased or is assigned already")
        if sandbox_id in self._assigned:
            raise NetworkError(f"sandbox {sandbox_id} already has a network")
        slot = leased.slot
        leased.rules = RuleSet(slot.filter, config_for(slot.addresses, compiled.internet), compiled)
        leased.sandbox_id = sandbox_id
        self._assigned[sandbox_id] = leased
        if self._nursery is not None:
            await self._start_resolver(leased)

    async def allocate(self, sandbox_id: str, policy: EgressPolicy) -> Lease:
        """`lease` and `assign` in one step, for a tap that is not attached to a VM yet."""
        compile_policy(policy)  # refuse a bad policy before taking a slot
        lease = await self.lease()
        try:
            await self.assign(lease, sandbox_id, policy)
        except BaseException:
            self.release(lease)
            raise
        return lease

    def _get(self, sandbox_id: str) -> tuple[_Slot, RuleSet]:
        leased = self._assigned.get(sandbox_id)
        if leased is None or leased.rules is None:
            raise NetworkError(f"sandbox {sandbox_id} has no network")
        return leased.slot, leased.rules

    def has_network(self, sandbox_id: str) -> bool:
        return sandbox_id in self._assigned

    def update_policy(self, sandbox_id: str, policy: EgressPolicy) -> None:
        """Replace the sandbox's rules (PUT /sandboxes/{id}/network); effective at once."""
        compiled = compile_policy(policy)
        self._get(sandbox_id)[1].replace(compiled)

    def rules(self, sandbox_id: str) -> RuleSet:
        """The sandbox's rule set (the DNS resolver pins answers through it)."""
        return self._get(sandbox_id)[1]

    def stats(self, sandbox_id: str) -> NetStats:
        flt = self._get(sandbox_id)[0].filter
        flt.drain_log()
        counts = flt.counters()
        return NetStats(
            packets={r.name: counts[r] for r in layout.Reason},
            bytes_passed=counts[layout.SLOT_BYTES_PASSED],
            bytes_dropped=counts[layout.SLOT_BYTES_DROPPED],
            log_lost=counts[layout.SLOT_LOG_LOST],
            log=list(flt.log),
        )

    def release(self, lease: Lease) -> None:
        """Take the lease back for good (no-op if it was released already); the slot is
        recycled by the next `fill_pool` (see module doc)."""
        self._take_back(lease.tap)

    def _take_back(self, tap_name: str) -> None:
        leased = self._leases.pop(tap_name, None)
        if leased is None:
            return
        if leased.sandbox_id is not None:
            del self._assigned[leased.sandbox_id]
        if leased.resolver is not None:
            leased.resolver.close()
        self._returned.append(leased.slot)
        self._refill.set()

    def _forget_stale_flows(self) -> None:
        """Delete the conntrack entries of every pooled slot that may still have some."""
        stale = [slot for slot in self._pool if slot.stale_flows]
        if stale:
            with netns.entered(self.ns):
                conntrack.forget(
                    [ip for s in stale for ip in (s.addresses.guest4, s.addresses.guest6)]
                )
            for slot in stale:
                slot.stale_flows = False

    async def _start_resolver(self, leased: _Leased) -> None:
        assert self._nursery is not None and leased.rules is not None
        a = leased.slot.addresses
        configured = self.config.dns_upstream
        try:
            upstream = (configured, 53) if configured else host_resolver()
        except (OSError, DnsError) as exc:  # the sandbox works, only names do not resolve
            log.warning("no DNS upstream: set dns_upstream", extra={"error": str(exc)})
            return
        resolver = SandboxResolver(
            self.ns, [str(a.gateway4), str(a.gateway6)], upstream, leased.rules
        )
        await self._nursery.start(resolver.serve)
        leased.resolver = resolver

    async def _tick(self) -> None:
        """One round of upkeep. A failure (no address left, a netlink error) is logged and
        retried next round: it must not take the daemon, or other sandboxes' DNS, down."""
        try:
            for leased in self._assigned.values():
                leased.slot.filter.drain_log()
                if leased.rules is not None:
                    leased.rules.expire()
            if trio.current_time() >= self._blocklist_due:
                self._blocklist_due = trio.current_time() + BLOCKLIST_INTERVAL
                self._apply_blocklist(await trio.to_thread.run_sync(self._read_blocklist))
            await self.fill_pool()
        except Exception:
            log.exception("sandbox network upkeep failed; retrying")

    async def maintain(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Background upkeep for the daemon's nursery (see the module doc)."""
        await self.fill_pool()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for leased in self._assigned.values():
                    await self._start_resolver(leased)
                task_status.started()
                while True:
                    with trio.move_on_after(MAINTAIN_INTERVAL):
                        await self._refill.wait()
                    self._refill = trio.Event()
                    await self._tick()
            finally:
                self._nursery = None
                for leased in self._assigned.values():
                    if leased.resolver is not None:
                        leased.resolver.close()
                        leased.resolver = None


def _collapse(nets: frozenset[IPNetwork]) -> frozenset[IPNetwork]:
    """Merge overlapping networks so the block trie stays small; fail if it cannot hold them."""
    merged = frozenset(
        [
            *ipaddress.collapse_addresses(n for n in nets if n.version == 4),
            *ipaddress.collapse_addresses(n for n in nets if n.version == 6),
        ]
    )
    if len(merged) > layout.BLOCK_ENTRIES:
        raise NetworkError(
            f"{len(merged)} always-deny networks; the filter holds at most {layout.BLOCK_ENTRIES}"
        )
    return merged

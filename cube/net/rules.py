"""Keep one filter's allow/deny tries equal to a policy plus the DNS resolver's pins.

The kernel applies each map update on its own, so a policy change is a sequence of single
updates that the guest's traffic may observe half-done. `replace` orders them so that no
intermediate state lets through anything that neither the old nor the new policy allows: deny
entries are added before allow entries are removed, allow entries are added before deny entries
are removed, and internet access is switched off first or on last.
"""

from __future__ import annotations

import ipaddress
import time

import msgspec

from cube.net.filter import EgressFilter, FilterConfig
from cube.net.policy import CompiledPolicy, IPNetwork, domain_matches


class RuleSet:
    """The desired contents of one filter's tries, and the updates that get the maps there."""

    def __init__(self, flt: EgressFilter, config: FilterConfig, policy: CompiledPolicy) -> None:
        self._filter = flt
        self._config = config
        self.policy = policy
        self._pins: dict[IPNetwork, tuple[float, str]] = {}  # network -> (expiry, domain)
        self._allow: frozenset[IPNetwork] = frozenset()
        self._deny: frozenset[IPNetwork] = frozenset()
        self.replace(policy)

    @property
    def pinned(self) -> int:
        """How many addresses the resolver has pinned right now."""
        return len(self._pins)

    def _wanted_allow(self) -> frozenset[IPNetwork]:
        return self.policy.allow | self._pins.keys()

    def replace(self, policy: CompiledPolicy) -> None:
        """Switch to `policy` (see the module doc for the order); pins of dropped domains go."""
        self.policy = policy
        self._pins = {
            net: pin for net, pin in self._pins.items() if domain_matches(pin[1], policy.domains)
        }
        if not policy.internet:
            self._set_flags(internet=False)
        allow, deny = self._wanted_allow(), policy.deny
        self._filter.add("deny", deny - self._deny)
        self._filter.remove("allow", self._allow - allow)
        self._filter.add("allow", allow - self._allow)
        self._filter.remove("deny", self._deny - deny)
        self._allow, self._deny = allow, deny
        if policy.internet:
            self._set_flags(internet=True)

    def _set_flags(self, internet: bool) -> None:
        self._config = msgspec.structs.replace(self._config, internet=internet, dns=internet)
        self._filter.configure(self._config)

    def pin(
        self,
        domain: str,
        addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
        ttl: float,
    ) -> None:
        """Allow `addresses` (answers for an allowed `domain`) for `ttl` seconds."""
        expiry = time.monotonic() + ttl
        for address in addresses:
            net = ipaddress.ip_network(address)
            old = self._pins.get(net)
            self._pins[net] = (max(expiry, old[0]) if old else expiry, domain)
        self._sync_allow()

    def expire(self) -> None:
        """Drop pins whose TTL has run out (addresses also in allow_out stay allowed)."""
        now = time.monotonic()
        self._pins = {net: pin for net, pin in self._pins.items() if pin[0] > now}
        self._sync_allow()

    def _sync_allow(self) -> None:
        allow = self._wanted_allow()
        self._filter.add("allow", allow - self._allow)
        self._filter.remove("allow", self._allow - allow)
        self._allow = allow

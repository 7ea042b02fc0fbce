"""Policy validation as E2B does it, and Cube's documented choices."""

from __future__ import annotations

import ipaddress

import pytest

from cube.net.policy import MAX_RULES, EgressPolicy, PolicyError, compile_policy, domain_matches

pytestmark = pytest.mark.net

net = ipaddress.ip_network


def test_entries_become_networks_and_domains():
    c = compile_policy(
        EgressPolicy(
            allow_out=("1.2.3.4", "10.1.2.3/8", "2001:db8::1", "API.Example.com.", "*.x.org"),
            deny_out=("0.0.0.0/0",),
        )
    )
    assert c.allow == {net("1.2.3.4/32"), net("10.0.0.0/8"), net("2001:db8::1/128")}
    assert c.deny == {net("0.0.0.0/0"), net("::/0")}  # ALL_TRAFFIC covers IPv6 too
    assert c.domains == ("api.example.com", "*.x.org")
    assert c.internet


@pytest.mark.parametrize(
    "policy",
    [
        EgressPolicy(deny_out=("example.com",)),  # domains only in allow_out
        EgressPolicy(allow_out=("example.com",)),  # ... and only with deny 0.0.0.0/0
        EgressPolicy(allow_out=("example.com",), deny_out=("1.0.0.0/8",)),
        EgressPolicy(allow_out=("0.0.0.0",)),  # unspecified
        EgressPolicy(deny_out=("::/8",)),
        EgressPolicy(allow_out=("1.2.3.4/33",), deny_out=("0.0.0.0/0",)),
        EgressPolicy(allow_out=("1.2.3",), deny_out=("0.0.0.0/0",)),  # not a name either
        EgressPolicy(allow_out=("exa mple.com",), deny_out=("0.0.0.0/0",)),
        EgressPolicy(allow_out=("-bad.com",), deny_out=("0.0.0.0/0",)),
        EgressPolicy(allow_out=("localhost",), deny_out=("0.0.0.0/0",)),
        EgressPolicy(allow_out=("a" * 64 + ".com",), deny_out=("0.0.0.0/0",)),
        EgressPolicy(allow_out=("fe80::1%eth0",)),
        EgressPolicy(deny_out=("1.1.1.1",) * (MAX_RULES + 1)),
    ],
)
def test_invalid_policies_are_refused(policy):
    with pytest.raises(PolicyError):
        compile_policy(policy)


def test_domain_matching_follows_e2b():
    assert domain_matches("API.example.com.", ["api.example.com"])
    assert domain_matches("a.b.example.com", ["*.example.com"])
    assert not domain_matches("example.com", ["*.example.com"])  # the apex is not a subdomain
    assert not domain_matches("badexample.com", ["*.example.com"])
    assert domain_matches("anything.at.all", ["*"])
    star = compile_policy(EgressPolicy(allow_out=("*",), deny_out=("0.0.0.0/0",)))
    assert star.domains == ("*",)

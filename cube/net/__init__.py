"""Sandbox networking: taps, addressing, NAT, eBPF egress programs and the sandbox DNS resolver."""

"""Sandbox networking: taps, addressing, NAT, eBPF egress programs and the sandbox DNS resolver.

The daemon uses `manager.NetworkManager`; the rest, one job per module:

- policy: E2B's egress fields (`EgressPolicy`), validation and the precedence Cube enforces
- bpf/egress.bpf.c, layout, build: the classifier, its shared constants, its clang build
- libbpf, filter: the cffi binding and one sandbox's loaded, attached classifier
- rules: a policy (plus DNS pins) turned into safely ordered map updates
- addressing, tap, conntrack: per-slot addresses, the tap itself, forgetting old flows
- nat: the `inet cube` nft table (masquerade, forwarding, host input guard)
- dns: the per-sandbox resolver on the gateway that implements domain rules
- netns: run any of it inside a network namespace (tests, bench)
- frames: raw guest frames (tests and `cube bench net`)
"""

"""Lab tier: tests run inside the nested lab's L1 guest, and the host-built artifacts they use."""

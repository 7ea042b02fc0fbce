"""The nested KVM lab: a Debian L1 guest under QEMU TCG with emulated AMD-V.

The development and CI machines only offer PVM, on which a standard Linux guest cannot run
(see shared/docs/kvm-here.md). Inside the lab, `/dev/kvm` is hardware-style and the VMM can boot
the real guest kernel, so the lab test tier and `cube serve` on PVM hosts run there.
"""

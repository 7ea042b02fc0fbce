"""The boot GDT and the segment registers decoded from it.

KVM takes segment registers already decoded (`struct kvm_segment`), but the guest also reads the
GDT from memory when it reloads a selector, so both must agree: the VMM writes the table and
derives every register from the same descriptors. Values are the PVH entry state
(vmm-facts.md §1.2): flat 32-bit code and data, and a 32-bit TSS.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CODE32 = 0x00CF_9B00_0000_FFFF
DATA32 = 0x00CF_9300_0000_FFFF
TSS32 = 0x0000_8B00_0000_0067  # present, busy 32-bit TSS, limit 0x67

BOOT_GDT = (0, CODE32, DATA32, TSS32)
CODE_SELECTOR = 1 << 3
DATA_SELECTOR = 2 << 3
TSS_SELECTOR = 3 << 3


@dataclass(frozen=True)
class Segment:
    """The fields of `struct kvm_segment`, decoded from an 8-byte descriptor."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 (the architectural name of the long-mode bit)
    g: int
    avl: int
    unusable: int


def decode(selector: int, descriptor: int) -> Segment:
    base = ((descriptor >> 16) & 0xFF_FFFF) | (((descriptor >> 56) & 0xFF) << 24)
    limit = (descriptor & 0xFFFF) | (((descriptor >> 48) & 0xF) << 16)
    g = (descriptor >> 55) & 1
    if g:
        limit = (limit << 12) | 0xFFF
    present = (descriptor >> 47) & 1
    return Segment(
        base=base,
        limit=limit,
        selector=selector,
        type=(descriptor >> 40) & 0xF,
        present=present,
        dpl=(descriptor >> 45) & 3,
        db=(descriptor >> 54) & 1,
        s=(descriptor >> 44) & 1,
        l=(descriptor >> 53) & 1,
        g=g,
        avl=(descriptor >> 52) & 1,
        unusable=0 if present else 1,
    )


def table_bytes() -> bytes:
    return struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT)


def boot_segments() -> dict[str, Segment]:
    """Every segment register of the PVH entry state, keyed by its `kvm_sregs` field name."""
    code = decode(CODE_SELECTOR, CODE32)
    data = decode(DATA_SELECTOR, DATA32)
    return {
        "cs": code,
        "ds": data,
        "es": data,
        "fs": data,
        "gs": data,
        "ss": data,
        "tr": decode(TSS_SELECTOR, TSS32),
    }

"""The Intel MultiProcessor table: how a guest without ACPI finds its CPUs and the IOAPIC.

With CONFIG_X86_MPPARSE and no ACPI, Linux scans [0x9FC00, 0xA0000) for the "_MP_" floating
pointer (vmm-facts.md §2.5). Without the table it would boot one CPU and route device interrupts
only through the legacy PIC. Every ISA IRQ maps 1:1 to an IOAPIC pin, so GSI = pin = Linux IRQ.
"""

from __future__ import annotations

import struct

from cube.vmm.layout import EBDA_START, IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR, MAX_VCPUS

APIC_VERSION = 0x14
CPU_ENABLED = 1
CPU_BOOT_PROCESSOR = 2
CPU_SIGNATURE = 0x600  # family 6: any plausible value; Linux only prints it
CPU_FEATURES = 0x201  # FPU | APIC
INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3

_FLOATING = struct.Struct("<4sIBBBB5s")
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")
_CPU = struct.Struct("<BBBBII8s")
_BUS = struct.Struct("<BB6s")
_IOAPIC = struct.Struct("<BBBBI")
_INTSRC = struct.Struct("<BBHBBBB")


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_mptable(num_cpus: int) -> bytes:
    """The floating pointer followed by the configuration table, to be placed at EBDA_START."""
    if not 1 <= num_cpus <= MAX_VCPUS:
        raise ValueError(f"{num_cpus} vCPUs: Cube supports 1 to {MAX_VCPUS}")
    ioapic_id = num_cpus + 1
    entries = [
        _CPU.pack(
            0,
            i,
            APIC_VERSION,
            CPU_ENABLED | (CPU_BOOT_PROCESSOR if i == 0 else 0),
            CPU_SIGNATURE,
            CPU_FEATURES,
            bytes(8),
        )
        for i in range(num_cpus)
    ]
    entries.append(_BUS.pack(1, 0, b"ISA   "))
    entries.append(_IOAPIC.pack(2, ioapic_id, APIC_VERSION, 1, IOAPIC_ADDR))
    entries += [
        _INTSRC.pack(3, INT_TYPE_INT, 0, 0, pin, ioapic_id, pin) for pin in range(IOAPIC_PINS)
    ]
    entries.append(_INTSRC.pack(4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0))
    entries.append(_INTSRC.pack(4, INT_TYPE_NMI, 0, 0, 0, 0xFF, 1))
    body = b"".join(entries)
    length = _HEADER.size + len(body)

    def header(checksum: int) -> bytes:
        return _HEADER.pack(
            b"PCMP",
            length,
            4,
            checksum,
            b"CUBE    ",
            b"CUBEVM      ",
            0,
            0,
            len(entries),
            LAPIC_ADDR,
            0,
            0,
            0,
        )

    table = header(_checksum(header(0) + body)) + body
    table_addr = EBDA_START + _FLOATING.size

    def floating(checksum: int) -> bytes:
        return _FLOATING.pack(b"_MP_", table_addr, 1, 4, checksum, 0, bytes(5))

    return floating(_checksum(floating(0))) + table

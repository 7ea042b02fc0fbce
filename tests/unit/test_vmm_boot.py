"""Boot-time structures the VMM writes into guest memory, checked byte by byte."""

import struct

import pytest

from cube.bench.guest import make_vmlinux
from cube.vmm import elf, layout, mptable, pvh


class FakeRam:
    """Guest RAM as a bytearray: enough for boot writers, which only ever call write()."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        assert gpa + len(data) <= len(self.buf), "write past the end of RAM"
        self.buf[gpa : gpa + len(data)] = data


def test_vmlinux_segments_and_pvh_entry_are_loaded() -> None:
    ram = FakeRam(32 * layout.MiB)
    image = elf.load_vmlinux(make_vmlinux(b"\x90" * 64, entry=0x100_0040), ram, len(ram.buf))
    assert image.pvh_entry == 0x100_0040
    assert image.end == 0x100_0000 + 64 + 4096
    assert ram.buf[0x100_0000:0x100_0040] == b"\x90" * 64


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"MZ" + bytes(100), "not an ELF"),
        (make_vmlinux(entry=None), "CONFIG_PVH"),
        (make_vmlinux(paddr=0x8000), "below 1 MiB"),
        (make_vmlinux()[:200], "truncated"),
    ],
)
def test_bad_kernels_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(elf.KernelImageError, match=message):
        elf.parse_vmlinux(data)


def test_kernel_larger_than_ram_is_refused() -> None:
    with pytest.raises(elf.KernelImageError, match="RAM"):
        elf.load_vmlinux(make_vmlinux(), FakeRam(16 * layout.MiB), 16 * layout.MiB)


def test_ram_splits_around_the_mmio_hole() -> None:
    assert layout.ram_regions(256 * layout.MiB) == [layout.RamRegion(0, 256 * layout.MiB)]
    low, high = layout.ram_regions(4 * layout.GiB)
    assert low.end == layout.MMIO_GAP_START
    assert high.guest_addr == 1 << 32 and high.size == layout.GiB
    with pytest.raises(ValueError):
        layout.ram_regions(3 * layout.MiB)


def test_virtio_slots_stop_at_the_last_gsi() -> None:
    assert layout.virtio_slot(0) == (0xC000_1000, 5)
    assert layout.virtio_slot(18)[1] == 23
    with pytest.raises(ValueError):
        layout.virtio_slot(19)


def test_pvh_start_info_points_at_map_and_cmdline() -> None:
    ram = FakeRam(layout.MiB)
    regions = layout.ram_regions(128 * layout.MiB)
    pvh.write_boot_info(ram, regions, "console=ttyS0", pvh.Initrd(0x7000000, 0x1234))
    magic, version, _flags, nr_modules, modlist, cmdline, _rsdp, memmap, entries, _ = (
        struct.unpack_from("<IIIIQQQQII", ram.buf, layout.PVH_INFO_ADDR)
    )
    assert (magic, version, nr_modules) == (pvh.START_INFO_MAGIC, 1, 1)
    assert ram.buf[cmdline : cmdline + 14] == b"console=ttyS0\0"
    assert struct.unpack_from("<QQ", ram.buf, modlist) == (0x7000000, 0x1234)
    table = [struct.unpack_from("<QQI", ram.buf, memmap + 24 * i) for i in range(entries)]
    assert table[-1] == (layout.HIMEM_START, 127 * layout.MiB, pvh.E820_RAM)
    assert (layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START, pvh.E820_RESERVED) in table


def test_overlong_cmdline_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        pvh.encode_cmdline("x" * layout.CMDLINE_MAX)


def test_mptable_checksums_and_counts() -> None:
    table = mptable.build_mptable(4)
    assert table[:4] == b"_MP_" and sum(table[:16]) % 256 == 0
    (physptr,) = struct.unpack_from("<I", table, 4)
    config = table[physptr - layout.EBDA_START :]
    assert config[:4] == b"PCMP" and sum(config) % 256 == 0
    length, _rev, _ck = struct.unpack_from("<HBB", config, 4)
    assert length == len(config)
    (count,) = struct.unpack_from("<H", config, 34)
    assert count == 4 + 1 + 1 + layout.IOAPIC_PINS + 2
    assert len(table) <= 0xA0000 - layout.EBDA_START
    with pytest.raises(ValueError):
        mptable.build_mptable(layout.MAX_VCPUS + 1)

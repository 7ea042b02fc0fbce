"""The KVM bindings against the real /dev/kvm: exits, state round trips, threads and lifetimes.

Guests are a few hand-assembled real-mode instructions (16-bit encodings, commented inline).
"""

from __future__ import annotations

import errno
import faulthandler
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cube.vmm.kvm import PAGE_SIZE, GuestMemory, Kvm, KvmError, ffi, lib

pytestmark = pytest.mark.kvm

HLT = b"\xf4"
OUT_0X10 = b"\xb0\x42" + b"\xe6\x10"  # mov al, 0x42; out 0x10, al
STORE_0X3000 = b"\xc6\x06\x00\x30\x42"  # mov byte [0x3000], 0x42 (outside the 8 KiB of RAM)
STORE_0X0 = b"\xc6\x06\x00\x00\x01"  # mov byte [0x0], 1 (page 0 of RAM)
SPIN = b"\xeb\xfe"  # l: jmp l


def test_system_queries(kvm: Kvm) -> None:
    assert kvm.api_version() == lib.KVM_API_VERSION == 12
    assert kvm.vcpu_mmap_size() >= ffi.sizeof("struct kvm_run")
    cpuid = kvm.supported_cpuid()
    assert 0 < cpuid.nent <= 256
    assert {cpuid.entries[i].function for i in range(cpuid.nent)} >= {0, 1, 0x80000000}
    msrs = kvm.msr_index_list()
    assert msrs and len(set(msrs)) == len(msrs)
    assert kvm.check_extension(lib.KVM_CAP_USER_MEMORY) > 0


def test_guest_exits_for_io_mmio_and_hlt(real_mode_vm) -> None:
    _, vcpu = real_mode_vm(OUT_0X10 + STORE_0X3000 + HLT)

    assert vcpu.run() == lib.KVM_EXIT_IO
    io = vcpu.kvm_run.io
    assert (io.direction, io.port, io.size, io.count) == (lib.KVM_EXIT_IO_OUT, 0x10, 1, 1)
    assert bytes(vcpu.io_data()) == b"\x42"

    assert vcpu.run() == lib.KVM_EXIT_MMIO
    mmio = vcpu.kvm_run.mmio
    assert (mmio.phys_addr, mmio.len, mmio.is_write, mmio.data[0]) == (0x3000, 1, 1, 0x42)

    assert vcpu.run() == lib.KVM_EXIT_HLT


def test_regs_round_trip(real_mode_vm) -> None:
    _, vcpu = real_mode_vm(HLT)
    regs = vcpu.get_regs()
    names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r15"]
    for i, name in enumerate(names):
        setattr(regs, name, 0x1111_0000_0000_0000 * (i + 1) + i)
    regs.rip = 0x1234
    vcpu.set_regs(regs)

    back = vcpu.get_regs()
    assert bytes(ffi.buffer(back)) == bytes(ffi.buffer(regs))
    assert back.rip == 0x1234


def test_vcpu_state_round_trips(kvm: Kvm, real_mode_vm) -> None:
    """Every getter's output is accepted by its setter and reads back unchanged: what
    snapshot and restore rely on."""
    vm, vcpu = real_mode_vm(HLT, irqchip=True)
    pairs = [
        (vcpu.get_sregs, vcpu.set_sregs),
        (vcpu.get_fpu, vcpu.set_fpu),
        (vcpu.get_xsave, vcpu.set_xsave),
        (vcpu.get_xcrs, vcpu.set_xcrs),
        (vcpu.get_lapic, vcpu.set_lapic),
        (vcpu.get_vcpu_events, vcpu.set_vcpu_events),
        (vcpu.get_debugregs, vcpu.set_debugregs),
    ]
    pairs += [(lambda c=chip: vm.get_irqchip(c), vm.set_irqchip) for chip in (0, 1, 2)]
    for get, put in pairs:
        state = get()
        put(state)
        assert bytes(ffi.buffer(get())) == bytes(ffi.buffer(state)), get

    pit = vm.get_pit2()  # holds each channel's load time, which moves on: compare the rest
    vm.set_pit2(pit)
    assert [(c.count, c.mode) for c in vm.get_pit2().channels] == [
        (c.count, c.mode) for c in pit.channels
    ]

    cpuid = kvm.supported_cpuid()
    vcpu.set_cpuid2(cpuid)
    assert vcpu.get_cpuid2().nent == cpuid.nent

    vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
    assert vcpu.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE

    khz = vcpu.get_tsc_khz()
    assert khz > 0
    vcpu.set_tsc_khz(khz)

    msrs = vcpu.get_msrs([0x174, 0x175])  # SYSENTER_CS, SYSENTER_ESP
    vcpu.set_msrs({0x174: 0x10, 0x175: 0x2000})
    assert vcpu.get_msrs(msrs) == {0x174: 0x10, 0x175: 0x2000}

    clock = vm.get_clock()
    vm.set_clock(clock)
    assert vm.get_clock().clock >= clock.clock

    with pytest.raises(KvmError) as e:  # the guest never enabled kvm-clock
        vcpu.kvmclock_ctrl()
    assert e.value.errno == errno.EINVAL


def test_errors_name_the_ioctl(real_mode_vm) -> None:
    vm, _ = real_mode_vm(HLT)
    with pytest.raises(KvmError) as e:
        vm.create_vcpu(0)
    assert e.value.errno == errno.EEXIST
    assert e.value.ioctl == "KVM_CREATE_VCPU"
    assert "KVM_CREATE_VCPU" in str(e.value)


def test_dirty_log_marks_guest_writes(real_mode_vm) -> None:
    vm, vcpu = real_mode_vm(STORE_0X0 + HLT, slot_flags=lib.KVM_MEM_LOG_DIRTY_PAGES)
    assert vcpu.run() == lib.KVM_EXIT_HLT
    bitmap = vm.get_dirty_log(0)
    assert bitmap[0] & 0b11 == 0b01  # page 0 written; page 1 (the code) only read
    assert vm.memory[0].view()[0] == 1
    assert vm.get_dirty_log(0)[0] == 0  # reading the log resets it


def test_ioeventfd_absorbs_the_exit(real_mode_vm) -> None:
    vm, vcpu = real_mode_vm(OUT_0X10 + HLT)
    event = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(event, 0x10, 1, pio=True)
        assert vcpu.run() == lib.KVM_EXIT_HLT  # no KVM_EXIT_IO in between
        assert os.eventfd_read(event) == 1
        vm.ioeventfd(event, 0x10, 1, pio=True, deassign=True)
    finally:
        os.close(event)


def test_irqfd_and_irq_line(real_mode_vm) -> None:
    vm, _ = real_mode_vm(HLT, irqchip=True)
    event = os.eventfd(0)
    try:
        vm.irqfd(event, 5)
        os.eventfd_write(event, 1)
        vm.irqfd(event, 5, deassign=True)
    finally:
        os.close(event)
    vm.irq_line(4, True)
    vm.irq_line(4, False)


def test_kvm_run_releases_the_gil(real_mode_vm) -> None:
    """A vCPU spinning in the guest must not stop Python threads, and a signal kicks it out."""
    _, vcpu = real_mode_vm(SPIN)
    exits: list[int] = []
    thread = threading.Thread(target=lambda: exits.append(vcpu.run()), daemon=True)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    # Were the GIL held in KVM_RUN this test would hang, not fail: end it from a C thread.
    faulthandler.dump_traceback_later(30, exit=True)
    try:
        thread.start()
        time.sleep(0.05)
        count, deadline = 0, time.monotonic() + 0.1
        while time.monotonic() < deadline:
            count += 1
        assert thread.is_alive(), "the guest should still be spinning"
        assert count > 10_000

        vcpu.kvm_run.immediate_exit = 1  # in case the signal lands before KVM_RUN is entered
        signal.pthread_kill(thread.ident, signal.SIGUSR1)
        thread.join(5)
        assert exits == [lib.KVM_EXIT_INTR]
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGUSR1, previous)


def test_file_backed_memory_is_copy_on_write(tmp_path: Path) -> None:
    snapshot = tmp_path / "memory"
    snapshot.write_bytes(b"\xaa" * PAGE_SIZE * 2)
    with GuestMemory.from_file(snapshot, PAGE_SIZE * 2) as memory:
        assert bytes(memory.view()[:2]) == b"\xaa\xaa"
        memory.view()[0] = 0x55
        assert memory.view()[0] == 0x55
    assert snapshot.read_bytes()[0] == 0xAA


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> list[str]:
    return Path("/proc/self/maps").read_text().splitlines()


def _mapped_bytes(maps: list[str]) -> int:
    """Total size mapped: adjacent anonymous mappings merge into one line, so a leaked guest
    RAM region can hide from a line count but not from this."""
    spans = (line.split()[0].split("-") for line in maps)
    return sum(int(end, 16) - int(start, 16) for start, end in spans)


def test_create_destroy_cycles_do_not_leak() -> None:
    """Everything here that owns an fd or a mapping, 1000 times over. (No irqchip: it owns
    neither, and costs ~20 ms to create under PVM.)"""
    ram = 1 << 20  # leaking it 1000 times would map a GiB more

    def cycle() -> None:
        with Kvm() as kvm, kvm.create_vm() as vm:
            vm.set_user_memory_region(0, 0, GuestMemory.anonymous(ram))
            vm.create_vcpu(0)
            vm.create_vcpu(1)

    cycle()  # warm up lazily allocated Python and cffi state
    fds, maps = _open_fds(), _maps()
    for _ in range(1000):
        cycle()
    after = _maps()
    assert _open_fds() == fds
    assert sum("kvm" in line for line in after) == sum("kvm" in line for line in maps)
    # Allocator arenas may come and go; a leak would add a line or a MiB per cycle.
    assert len(after) - len(maps) < 10
    assert _mapped_bytes(after) - _mapped_bytes(maps) < 32 * ram

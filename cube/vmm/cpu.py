"""Per-vCPU state for a PVH boot: CPUID, boot MSRs, FPU, LAPIC and the entry registers.

CPUID starts from what KVM supports and is fixed up only where a guest kernel would otherwise
see something false about its topology (APIC IDs, logical CPU counts) or its platform (the
hypervisor bit, TSC-deadline timer); vmm-facts.md §2.2 lists what Firecracker does and why.
"""

from __future__ import annotations

import msgspec

from cube.vmm import gdt
from cube.vmm.kvm import MAX_CPUID_ENTRIES, CData, Vcpu, ffi
from cube.vmm.layout import GDT_ADDR, IDT_ADDR, PVH_INFO_ADDR

LEAF1_ECX_PDCM = 1 << 15
LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28

MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE_WRITEBACK = 0x806

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 4
APIC_MODE_EXTINT = 7

CR0_PE, CR0_ET = 0x1, 0x10


def guest_cpuid(supported: CData, index: int, num_vcpus: int) -> CData:
    """The CPUID table for vCPU `index` of `num_vcpus`."""
    count = supported.nent
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": count, "entries": MAX_CPUID_ENTRIES})
    threads = 1 << (num_vcpus - 1).bit_length()
    for i in range(count):
        src, e = supported.entries[i], cpuid.entries[i]
        e.function, e.index, e.flags = src.function, src.index, src.flags
        e.eax, e.ebx, e.ecx, e.edx = src.eax, src.ebx, src.ecx, src.edx
        if e.function == 1:
            e.ebx = (index << 24) | (threads << 16) | (8 << 8) | (e.ebx & 0xFF)
            e.ecx = (e.ecx & ~LEAF1_ECX_PDCM) | LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_HYPERVISOR
            e.edx = (e.edx | LEAF1_EDX_HTT) if num_vcpus > 1 else (e.edx & ~LEAF1_EDX_HTT)
        elif e.function in (0xB, 0x1F):
            e.edx = index  # x2APIC ID
            if e.index == 0:
                e.eax, e.ebx, e.ecx = 0, 1, 0x100 | e.index  # one thread per core
            elif e.index == 1:
                e.eax, e.ebx, e.ecx = (num_vcpus - 1).bit_length(), num_vcpus, 0x200 | e.index
        elif e.function == 0x8000_0008:
            e.ecx = (e.ecx & ~0xFF) | (num_vcpus - 1)  # AMD: cores in the package
    return cpuid


def boot_msrs() -> dict[int, int]:
    zeroed = (
        MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP, MSR_STAR, MSR_LSTAR,
        MSR_CSTAR, MSR_SYSCALL_MASK, MSR_KERNEL_GS_BASE, MSR_IA32_TSC,
    )  # fmt: skip
    return dict.fromkeys(zeroed, 0) | {
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WRITEBACK,
    }


def _set_lvt_mode(regs: CData, offset: int, mode: int) -> None:
    raw = bytes(ffi.buffer(regs))
    value = int.from_bytes(raw[offset : offset + 4], "little")
    value = (value & ~0x700) | (mode << 8)
    ffi.buffer(regs)[offset : offset + 4] = value.to_bytes(4, "little")


def configure(vcpu: Vcpu, supported_cpuid: CData, num_vcpus: int) -> None:
    """State every vCPU needs before its first run, in the order KVM requires (§2.1)."""
    vcpu.set_cpuid2(guest_cpuid(supported_cpuid, vcpu.index, num_vcpus))
    vcpu.set_msrs(boot_msrs())
    fpu = vcpu.get_fpu()
    fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
    vcpu.set_fpu(fpu)
    lapic = vcpu.get_lapic()
    _set_lvt_mode(lapic.regs, APIC_LVT0, APIC_MODE_EXTINT)
    _set_lvt_mode(lapic.regs, APIC_LVT1, APIC_MODE_NMI)
    vcpu.set_lapic(lapic)


def enter_pvh(vcpu: Vcpu, entry: int) -> None:
    """Point the boot vCPU at the kernel's PVH entry, in 32-bit protected mode without paging."""
    regs = vcpu.get_regs()
    ffi.buffer(regs)[:] = bytes(ffi.sizeof(regs[0]))
    regs.rip, regs.rflags, regs.rbx = entry, 0x2, PVH_INFO_ADDR
    vcpu.set_regs(regs)
    sregs = vcpu.get_sregs()
    for name, seg in gdt.boot_segments().items():
        target = getattr(sregs, name)
        for field in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
                      "avl", "unusable"):  # fmt: skip
            setattr(target, field, getattr(seg, field))
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, len(gdt.table_bytes()) - 1
    sregs.idt.base, sregs.idt.limit = IDT_ADDR, 7
    sregs.cr0, sregs.cr4, sregs.efer = CR0_PE | CR0_ET, 0, 0
    vcpu.set_sregs(sregs)


# Snapshots (vmm-facts.md §8).

# MSRs a snapshot carries: what KVM lists, narrowed to the architectural state a guest kernel
# depends on; MCG_CTL is left out as Firecracker does (KVM refuses to restore it on some hosts).
_MSR_SINGLES = {0x10, 0x1B, 0x3A, 0x3B, 0x48, 0x49, 0x174, 0x175, 0x176, 0x1A0, 0x1D9, 0x6E0,
                0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000100,
                0xC0000101, 0xC0000102, 0xC0000103, 0x122, 0xDA0, 0x277}  # fmt: skip
_MSR_RANGES = ((0x200, 0x300), (0x400, 0x480), (0x800, 0xC00), (0x4B564D00, 0x4B564E00))
MSR_TSC_DEADLINE = 0x6E0
MSR_MCG_CTL = 0x17B


def snapshot_msrs(available: list[int]) -> list[int]:
    """The MSRs to save, with TSC_DEADLINE last so it is restored after the TSC."""
    wanted = [
        m for m in available
        if m != MSR_MCG_CTL and (m in _MSR_SINGLES or any(lo <= m < hi for lo, hi in _MSR_RANGES))
    ]  # fmt: skip
    return sorted(wanted, key=lambda m: m == MSR_TSC_DEADLINE)


class VcpuState(msgspec.Struct, frozen=True):
    index: int
    cpuid: bytes
    mp_state: int
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes
    msrs: list[tuple[int, int]]
    events: bytes
    tsc_khz: int


def _blob(cdata: CData) -> bytes:
    return bytes(ffi.buffer(cdata))


def _cdata(ctype: str, blob: bytes) -> CData:
    value = ffi.new(ctype)
    if len(blob) != ffi.sizeof(value[0]):
        raise ValueError(
            f"snapshot field for {ctype} has {len(blob)} bytes, not {ffi.sizeof(value[0])}"
        )
    ffi.buffer(value)[:] = blob
    return value


def save_vcpu(vcpu: Vcpu, msrs: list[int]) -> VcpuState:
    """Capture a paused vCPU, MP state first and events last, as KVM asks."""
    mp_state = vcpu.get_mp_state()
    regs, sregs = _blob(vcpu.get_regs()), _blob(vcpu.get_sregs())
    xsave = vcpu.get_xsave()
    cpuid = vcpu.get_cpuid2()
    cpuid_bytes = bytes(ffi.buffer(cpuid, 8 + cpuid.nent * ffi.sizeof("struct kvm_cpuid_entry2")))
    values = vcpu.get_msrs(msrs)
    if values.get(MSR_TSC_DEADLINE, 1) == 0 and 0x10 in values:
        values[MSR_TSC_DEADLINE] = values[0x10]  # an unarmed deadline must not fire late
    return VcpuState(
        index=vcpu.index,
        cpuid=cpuid_bytes,
        mp_state=mp_state,
        regs=regs,
        sregs=sregs,
        xsave=bytes(ffi.buffer(xsave, ffi.sizeof(xsave[0]))),  # the full, variable size
        xcrs=_blob(vcpu.get_xcrs()),
        debugregs=_blob(vcpu.get_debugregs()),
        lapic=_blob(vcpu.get_lapic()),
        msrs=sorted(values.items(), key=lambda kv: kv[0] == MSR_TSC_DEADLINE),
        events=_blob(vcpu.get_vcpu_events()),
        tsc_khz=vcpu.get_tsc_khz(),
    )


def restore_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    """Load a fresh vCPU with saved state, ordered so no step undoes an earlier one."""
    entry_size = ffi.sizeof("struct kvm_cpuid_entry2")
    nent = (len(state.cpuid) - 8) // entry_size
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
    ffi.buffer(cpuid, len(state.cpuid))[:] = state.cpuid
    vcpu.set_cpuid2(cpuid)
    if abs(vcpu.get_tsc_khz() - state.tsc_khz) * 1_000_000 > 250 * state.tsc_khz:
        vcpu.set_tsc_khz(state.tsc_khz)
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_regs(_cdata("struct kvm_regs *", state.regs))
    vcpu.set_sregs(_cdata("struct kvm_sregs *", state.sregs))
    extra = (len(state.xsave) - ffi.sizeof("struct kvm_xsave")) // 4
    xsave = ffi.new("struct kvm_xsave *", {"extra": extra})
    ffi.buffer(xsave, len(state.xsave))[:] = state.xsave
    vcpu.set_xsave(xsave)
    vcpu.set_xcrs(_cdata("struct kvm_xcrs *", state.xcrs))
    vcpu.set_debugregs(_cdata("struct kvm_debugregs *", state.debugregs))
    vcpu.set_lapic(_cdata("struct kvm_lapic_state *", state.lapic))
    vcpu.set_msrs(dict(state.msrs))
    vcpu.set_vcpu_events(_cdata("struct kvm_vcpu_events *", state.events))

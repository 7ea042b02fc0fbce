"""What a VM's vCPUs held when its guest died: the report a dead sandbox's log keeps.

A guest that triple-faults, halts with interrupts off or stops on a KVM error has no chance to
print a panic, so its console alone rarely says why. KVM still holds each stopped vCPU's state
until the VM is closed, so the VMM reads it then: the general registers, control registers and
EFER, the segment and descriptor tables (a triple fault is most often a bad IDT, GDT, TSS or
stack), the pending and injected events (the exception that could not be delivered), and the
last exits each vCPU made to the VMM (what the guest was doing with our devices just before).
The console tail ends the report. Nothing in it comes from the host or a client, so it holds
no secret of ours; it holds what the guest's registers held, which is the guest's own.
"""

from __future__ import annotations

from collections.abc import Iterable

from cube.vmm.kvm import KvmError, Vcpu, lib
from cube.vmm.vcpu import EXIT_NAMES, RecentExit

_MP_STATES = {
    lib.KVM_MP_STATE_RUNNABLE: "runnable",
    lib.KVM_MP_STATE_UNINITIALIZED: "uninitialized",
    lib.KVM_MP_STATE_INIT_RECEIVED: "init-received",
    lib.KVM_MP_STATE_HALTED: "halted",
    lib.KVM_MP_STATE_SIPI_RECEIVED: "sipi-received",
}
_GENERAL = (
    ("rax", "rbx", "rcx", "rdx"),
    ("rsi", "rdi", "rsp", "rbp"),
    ("r8", "r9", "r10", "r11"),
    ("r12", "r13", "r14", "r15"),
)
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs", "tr", "ldt")


def describe_exit(recent: RecentExit) -> str:
    reason, where, direction = recent
    name = EXIT_NAMES.get(reason, f"reason {reason}")
    if reason == lib.KVM_EXIT_IO:
        return f"io {'out' if direction else 'in'} {where:#x}"
    if reason == lib.KVM_EXIT_MMIO:
        return f"mmio {'write' if direction else 'read'} {where:#x}"
    return name


def vcpu_lines(vcpu: Vcpu, recent: Iterable[RecentExit]) -> list[str]:
    """One stopped vCPU's state, a few lines; never raises (a report must not fail)."""
    exits = ", ".join(describe_exit(e) for e in recent) or "none"
    try:
        lines = _state_lines(vcpu)
    except KvmError as exc:
        lines = [f"vCPU {vcpu.index}: state unreadable: {exc}"]
    return [*lines, f"  last exits, oldest first: {exits}"]


def _state_lines(vcpu: Vcpu) -> list[str]:
    regs, sregs, events = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_vcpu_events()
    mp_state = vcpu.get_mp_state()
    lines = [
        f"vCPU {vcpu.index} ({_MP_STATES.get(mp_state, f'mp_state {mp_state}')}): "
        f"rip={regs.rip:#018x} rflags={regs.rflags:#x}"
    ]
    for row in _GENERAL:
        lines.append("  " + " ".join(f"{name}={getattr(regs, name):#018x}" for name in row))
    lines.append("  " + " ".join(f"{name}={getattr(sregs, name):#x}" for name in _CONTROL))
    for name in _SEGMENTS:
        s = getattr(sregs, name)
        lines.append(
            f"  {name}: sel={s.selector:#06x} base={s.base:#x} limit={s.limit:#x} "
            f"type={s.type:#x} s={s.s} dpl={s.dpl} p={s.present} l={s.l} db={s.db} g={s.g}"
            + (" unusable" if s.unusable else "")
        )
    lines.append(
        f"  gdt: base={sregs.gdt.base:#x} limit={sregs.gdt.limit:#x}  "
        f"idt: base={sregs.idt.base:#x} limit={sregs.idt.limit:#x}"
    )
    ex, irq, nmi = events.exception, events.interrupt, events.nmi
    lines.append(
        f"  exception: nr={ex.nr} injected={ex.injected} pending={ex.pending} "
        + (f"error_code={ex.error_code:#x}" if ex.has_error_code else "no error code")
        + f"; interrupt: nr={irq.nr} injected={irq.injected} shadow={irq.shadow}"
        + f"; nmi: injected={nmi.injected} pending={nmi.pending} masked={nmi.masked}"
    )
    return lines

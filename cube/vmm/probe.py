"""Does this host's KVM run guest kernel code in hardware, or emulate it?

The KVM API looks the same either way, but a standard Linux guest only boots where code at CPL0
runs natively (VT-x/AMD-V, or the nested lab's emulated AMD-V). PVM, the /dev/kvm of our
development machines, emulates CPL0 one instruction at a time (~1.8 M instr/s against ~400 M in
the lab; shared/docs/kvm-here.md). Timing a tiny real-mode loop tells the two apart in a fifth
of a second, whatever the module is called.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cube.vmm.kvm import PAGE_SIZE, GuestMemory, Kvm, Vcpu, lib

# Well above the ~1.8 M instr/s of PVM's emulator, well below the ~400 M of the nested lab.
HARDWARE_MIN_RATE = 50e6
MIN_RUN_SECONDS = 0.02  # shorter runs measure VM entry and exit more than the loop
FIRST_ITERATIONS = 1000  # ~1 ms under emulation
MAX_ITERATIONS = 0xFFFF_FFFF  # ecx

Flavour = Literal["hardware", "pvm", "emulated"]


@dataclass(frozen=True)
class ProbeResult:
    iterations: int
    seconds: float

    @property
    def instructions(self) -> int:
        return 2 * self.iterations + 2  # dec+jnz per iteration, plus mov and hlt

    @property
    def rate(self) -> float:
        """Guest instructions per second."""
        return self.instructions / self.seconds


def loop_code(iterations: int) -> bytes:
    """`mov ecx, N; l: dec ecx; jnz l; hlt` for 16-bit real mode (hence the 0x66 prefixes)."""
    return b"".join(
        (
            b"\x66\xb9" + iterations.to_bytes(4, "little"),  # mov ecx, imm32
            b"\x66\x49",  # l: dec ecx
            b"\x75\xfc",  # jnz l (rel8 -4: back over itself and the dec)
            b"\xf4",  # hlt: without an in-kernel irqchip this exits to us
        )
    )


def measure_cpl0_rate(iterations: int | None = None, repeats: int = 3) -> ProbeResult:
    """Time the loop in a throwaway real-mode VM; the fastest of `repeats` runs.

    An untimed first run absorbs one-time costs (~20 ms in the lab, more than the loop itself).
    With `iterations` unset the loop is sized so that one run lasts about MIN_RUN_SECONDS, which
    keeps the whole probe near 0.2 s under emulation and on hardware alike. Interference from
    other load only ever slows a run down, so the fastest one is the best estimate.
    """
    with Kvm() as kvm, kvm.create_vm() as vm:
        memory = GuestMemory.anonymous(PAGE_SIZE)
        vm.set_user_memory_region(0, 0, memory)
        vcpu = vm.create_vcpu(0)
        _timed_run(vcpu, memory, 1)
        n = iterations or _calibrate(vcpu, memory)
        return min((_timed_run(vcpu, memory, n) for _ in range(repeats)), key=lambda r: r.seconds)


def _calibrate(vcpu: Vcpu, memory: GuestMemory) -> int:
    """Iterations for a run of at least MIN_RUN_SECONDS, found by growing from a small count."""
    n = FIRST_ITERATIONS
    while True:
        seconds = _timed_run(vcpu, memory, n).seconds
        if seconds >= MIN_RUN_SECONDS or n == MAX_ITERATIONS:
            return n
        # Aim a little past the minimum so that one more run usually suffices.
        growth = 1.5 * MIN_RUN_SECONDS / max(seconds, 1e-6)
        n = min(MAX_ITERATIONS, int(n * max(2.0, growth)))


def _timed_run(vcpu: Vcpu, memory: GuestMemory, iterations: int) -> ProbeResult:
    code = loop_code(iterations)
    memory.view()[: len(code)] = code
    start_real_mode(vcpu, 0)
    start = time.perf_counter()
    exit_reason = vcpu.run()
    seconds = time.perf_counter() - start
    if exit_reason != lib.KVM_EXIT_HLT:
        raise RuntimeError(f"probe guest stopped with exit reason {exit_reason}, not HLT")
    return ProbeResult(iterations, seconds)


def start_real_mode(vcpu: Vcpu, rip: int) -> None:
    """Point the vCPU at guest-physical `rip` in real mode."""
    sregs = vcpu.get_sregs()
    sregs.cs.base = sregs.cs.selector = 0  # the reset CS points at a BIOS; there is none
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = rip
    regs.rflags = 0x2  # bit 1 is reserved and must be set
    vcpu.set_regs(regs)


def classify(rate: float) -> Literal["hardware", "emulated"]:
    return "hardware" if rate >= HARDWARE_MIN_RATE else "emulated"


def flavour(rate: float) -> Flavour:
    """The measured rate decides; the loaded module only names the reason for slowness."""
    if classify(rate) == "hardware":
        return "hardware"
    return "pvm" if pvm_loaded() else "emulated"


def pvm_loaded() -> bool:
    return Path("/sys/module/kvm_pvm").is_dir()


def cpu_virt_extension() -> str | None:
    """The CPU's hardware virtualization flag (vmx or svm), if this kernel is shown one."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return next((ext for ext in ("vmx", "svm") if ext in flags), None)
    return None

"""`cube bench vmm`: restore latency and memory per clone, on the host's own KVM.

Both use the tiny bench guest (cube.bench.guest), so they run on any KVM, PVM included:

- restore latency: from `MicroVm.restore()` of a snapshot to the guest's first exit after it
  resumes (its first instructions write the serial port), over many restores; beside it, in the
  same run, the floor: the same KVM objects made with bare ioctls and nothing else (VM, TSS,
  irqchip, PIT, the snapshot's memory mapped privately and registered, one vCPU);
- memory per idle clone: start N clones of a snapshot of a halted guest (its vCPU thread
  sleeps in KVM, as an idle sandbox's does), and divide the host's MemAvailable drop and our
  PSS growth by N.

With a real guest kernel (hardware-style KVM, so the lab on PVM hosts), `--boot` and `--template`
measure boot to init beside QEMU microvm and restore to the agent's reply: cube.bench.vmm_lab.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from cube.bench.guest import FLAG_ADDR, IDLE, READY, WAIT_FOR_FLAG, make_vmlinux
from cube.vmm import layout
from cube.vmm.kvm import Kvm
from cube.vmm.memory import GuestRam
from cube.vmm.snapshot import MEMORY_FILE
from cube.vmm.vm import MicroVm, VmConfig


@dataclass(frozen=True)
class Latency:
    samples_ms: list[float]

    def pct(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def row(self, name: str) -> str:
        p50, p95, p99 = self.pct(50), self.pct(95), self.pct(99)
        mean = statistics.fmean(self.samples_ms)
        return f"{name:<34} {p50:8.2f} {p95:8.2f} {p99:8.2f} {mean:8.2f}   n={len(self.samples_ms)}"


async def _wait_console(vm: MicroVm, text: bytes) -> None:
    while text not in vm.serial.log_tail():
        await trio.sleep(0.001)


def make_snapshot(folder: Path, memory_mib: int, code: bytes = WAIT_FOR_FLAG) -> Path:
    """Boot the bench guest, let it print its "r", and snapshot it (into a new subfolder)."""
    kernel = folder / "vmlinux"
    kernel.write_bytes(make_vmlinux(code))
    vm = MicroVm.boot(VmConfig(kernel=kernel, memory_mib=memory_mib, vsock=False, rng=False))
    target = folder / ("snapshot-idle" if code == IDLE else "snapshot")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm.run)
            with trio.fail_after(60):
                await _wait_console(vm, READY)
            vm.pause()
            vm.save_snapshot(target, folder)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        vm.close()
    return target


def restore_latency(snapshot: Path, workdir: Path, count: int) -> tuple[Latency, Latency]:
    """(restore call alone, restore to first guest exit), in milliseconds."""
    restore_ms: list[float] = []
    first_exit_ms: list[float] = []

    async def main() -> None:
        for _ in range(count):
            start = time.perf_counter()
            vm = MicroVm.restore(snapshot, workdir)
            restored = time.perf_counter()
            vm.ram.write(FLAG_ADDR, b"x")
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(vm.run)
                    with trio.fail_after(30):
                        await _wait_console(vm, b"x")
                    first_exit = time.perf_counter()
                    nursery.cancel_scope.cancel()
            finally:
                vm.close()
            restore_ms.append((restored - start) * 1e3)
            first_exit_ms.append((first_exit - start) * 1e3)

    trio.run(main)
    return Latency(restore_ms), Latency(first_exit_ms)


def ioctl_floor(folder: Path, memory_mib: int, count: int) -> Latency:
    """What a restore cannot go below on this host's KVM, in milliseconds (see the module doc)."""
    memory_file = folder / MEMORY_FILE
    samples: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        with Kvm() as kvm, kvm.create_vm() as vm:
            vm.set_tss_addr(layout.TSS_ADDR)
            vm.create_irqchip()
            vm.create_pit2()
            ram = GuestRam.from_file(memory_file, memory_mib * layout.MiB)
            for slot, (region, memory) in enumerate(ram.regions):
                vm.set_user_memory_region(slot, region.guest_addr, memory)
            vm.create_vcpu(0)
            samples.append((time.perf_counter() - start) * 1e3)
        ram.close()
    return Latency(samples)


def _proc_kib(path: str, field: str) -> int:
    """A `Name:  N kB` field of a /proc file, in KiB."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in {path}")


def _mem_available_kib() -> int:
    return _proc_kib("/proc/meminfo", "MemAvailable")


def _pss_kib() -> int:
    return _proc_kib("/proc/self/smaps_rollup", "Pss")


@dataclass(frozen=True)
class Density:
    clones: int
    host_kib_per_clone: float
    pss_kib_per_clone: float


def clone_density(snapshot: Path, workdir: Path, count: int) -> Density:
    """Host memory per running, idle clone of a snapshot of the IDLE guest."""
    available, pss = _mem_available_kib(), _pss_kib()
    clones: list[MicroVm] = []
    result: list[Density] = []

    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    vm = MicroVm.restore(snapshot, workdir)
                    clones.append(vm)
                    nursery.start_soon(vm.run)
                await trio.sleep(1.0)  # let every vCPU reach its halt
                stopped = [vm.stop for vm in clones if vm.stop is not None]
                if stopped:
                    raise RuntimeError(f"{len(stopped)} idle clones stopped: {stopped[0]}")
                used = available - _mem_available_kib()
                grown = _pss_kib() - pss
                result.append(Density(count, used / count, grown / count))
                nursery.cancel_scope.cancel()
        finally:
            for vm in clones:
                vm.close()

    trio.run(main)
    return result[0]


def run(restores: int, clones: int, memory_mib: int) -> str:
    """Every host-tier VMM measurement, as a printable table."""
    with tempfile.TemporaryDirectory(prefix="cube-bench-") as scratch:
        folder = Path(scratch)
        snapshot_folder = make_snapshot(folder, memory_mib)
        floor = ioctl_floor(snapshot_folder, memory_mib, restores)
        restore, first_exit = restore_latency(snapshot_folder, folder, restores)
        density = clone_density(make_snapshot(folder, memory_mib, IDLE), folder, clones)
    header = f"{'measurement (ms)':<34} {'p50':>8} {'p95':>8} {'p99':>8} {'mean':>8}"
    return "\n".join(
        [
            f"cube bench vmm: {memory_mib} MiB snapshot of the bench guest",
            header,
            floor.row("floor: bare ioctls of a restore"),
            restore.row("restore (host side)"),
            first_exit.row("restore to first guest exit"),
            f"restore / floor (p50): {restore.pct(50) / floor.pct(50):.2f}",
            f"idle clones: {density.clones}, host memory per clone "
            f"{density.host_kib_per_clone / 1024:.2f} MiB (MemAvailable drop), "
            f"PSS per clone {density.pss_kib_per_clone / 1024:.2f} MiB",
        ]
    )

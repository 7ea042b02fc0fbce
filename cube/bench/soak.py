"""`cube bench soak`: count guest deaths under Cube's VMM beside QEMU microvm in the same L1.

Issue 12 asks whose the triple faults seen in the lab are, and which lab set-up has the fewest
of them. Both questions are counts, not timings, so this command does the same work many times
and tallies what dies, in three kinds of work, inside one L1 (`cube lab run`), against a
deadline so that a slow or stuck lab still reports what it counted:

- boots: the guest kernel to the marker initramfs's restart (cube.bench.initramfs), in Cube's
  VMM and in QEMU microvm with KVM, alternating (the kernel's early boot: CPU set-up, APIC,
  timers, the first interrupts);
- reboots: the guest kernel on the template's root filesystem up to init's ready line, in both
  VMMs, alternating: a whole Linux boot through init to the agent's start, as a filesystem-only
  resume does (the disk is the template's base image, writes thrown away on both sides; the
  same devices on both sides: the disk, virtio-rng and the console, no vsock, which QEMU would
  need a host module for);
- restores: the template's snapshot through the product's VmmBackend until the agent answers
  over vsock, then a second control call and a kill, a few at a time (Cube only: QEMU cannot
  restore our snapshots). This is what `Sandbox.create` does.

A death is any run that did not reach its goal: a stop before the marker (triple fault, KVM
error, panic), or no marker within the timeout (a hang). For Cube, the VMM's crash report says
why (cube.vmm.crash_report); for QEMU, its console tail. At the end, L1's own kernel log is
scanned for what would make its figures worthless (soft lockups, RCU stalls, oopses), since a
soak in a broken L1 measures the lab, not the VMM.
"""

from __future__ import annotations

import os
import select
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from cube.bench import vmm_lab
from cube.bench.initramfs import write_marker_initramfs
from cube.bench.vmm_lab import BenchTaps
from cube.guest.init import READY_MARKER
from cube.guest.wire import Ping
from cube.pool.backend import BackendError, Image
from cube.pool.template_build import GUEST_CMDLINE
from cube.pool.vmm_backend import VmmBackend
from cube.vmm import snapshot
from cube.vmm.vm import DiskConfig, MicroVm, VmConfig, VmError

REBOOT_TIMEOUT_S = 300.0
BOOT_MEMORY_MIB = 256  # the marker initramfs needs little; `cube bench vmm --boot`'s default
REPORT_LINES = 40  # of each death's report, in the output
# What in L1's kernel log means the lab itself misbehaved during the soak.
L1_TROUBLE = ("soft lockup", "rcu_sched self-detected stall", "rcu: INFO", "Oops", "BUG:",
              "general protection fault", "Kernel panic")  # fmt: skip


@dataclass
class Tally:
    """One kind of work on one VMM: how many ran, how many died, and why."""

    runs: int = 0
    deaths: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, work: Callable[[], object]) -> None:
        start = time.monotonic()
        self.runs += 1
        try:
            work()
        except (vmm_lab.BenchFailed, BackendError, VmError, OSError) as exc:
            self.deaths.append(str(exc))
            _say(f"DEATH {self.runs}: " + "\n  ".join(str(exc).splitlines()[:REPORT_LINES]))
        finally:
            self.seconds += time.monotonic() - start

    def row(self, name: str) -> str:
        per_1000 = 1000 * len(self.deaths) / self.runs if self.runs else 0.0
        per_hour = 3600 * len(self.deaths) / self.seconds if self.seconds else 0.0
        return (
            f"{name:<28} {self.runs:>6} {len(self.deaths):>6} {per_1000:>10.1f} "
            f"{per_hour:>9.2f} {self.seconds:>8.0f}"
        )


def _say(line: str) -> None:
    print(f"soak: {line}", flush=True)


# Reboots: a whole Linux boot of the template's root filesystem, to init's ready line.


def reboot_cube(kernel: Path, rootfs: Path, cpus: int, memory_mib: int) -> None:
    """Boot the root filesystem in Cube's VMM until init says it is ready (BootFailed if not)."""
    wanted = READY_MARKER.encode()
    with tempfile.TemporaryDirectory(prefix="cube-soak-") as scratch:
        disk = DiskConfig(base=rootfs, overlay=Path(scratch) / "overlay", read_only=False)
        config = VmConfig(
            kernel=kernel, cmdline=GUEST_CMDLINE, vcpus=cpus, memory_mib=memory_mib,
            disks=(disk,), vsock=False,
        )  # fmt: skip
        vm = MicroVm.boot(config)

        async def until_ready() -> bool:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(vm.run)
                with trio.move_on_after(REBOOT_TIMEOUT_S):
                    while wanted not in vm.serial.log_tail() and vm.stop is None:
                        await trio.sleep(0.05)
                ready = wanted in vm.serial.log_tail()
                nursery.cancel_scope.cancel()
            return ready

        try:
            ready = trio.run(until_ready)
            report = [] if ready else vm.crash_report(vmm_lab.TAIL_BYTES)
        except VmError as exc:
            ready, report = False, [str(exc).splitlines()[0], *vm.crash_report()]
        finally:
            vm.close()
    if not ready:
        raise vmm_lab.BootFailed("cube: no ready line\n" + "\n".join(report))


def reboot_qemu_argv(kernel: Path, rootfs: Path, cpus: int, memory_mib: int) -> list[str]:
    """QEMU microvm on the same kernel, command line, vCPUs, memory and disk as reboot_cube."""
    return [
        vmm_lab.QEMU, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host",
        "-smp", str(cpus), "-m", f"{memory_mib}M", "-nodefaults", "-no-user-config",
        "-display", "none", "-serial", "stdio", "-no-reboot",
        "-drive", f"id=root,file={rootfs},format=raw,if=none,snapshot=on",
        "-device", "virtio-blk-device,drive=root", "-device", "virtio-rng-device",
        "-kernel", str(kernel), "-append", f"console=ttyS0 reboot=t panic=-1 {GUEST_CMDLINE}",
    ]  # fmt: skip


def reboot_qemu(kernel: Path, rootfs: Path, cpus: int, memory_mib: int) -> None:
    """Boot in QEMU until init's ready line, then stop it (BootFailed if it never comes)."""
    wanted = READY_MARKER.encode()
    output = bytearray()
    process = subprocess.Popen(
        reboot_qemu_argv(kernel, rootfs, cpus, memory_mib),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    deadline = time.monotonic() + REBOOT_TIMEOUT_S
    try:
        while wanted not in output and (remaining := deadline - time.monotonic()) > 0:
            if select.select([process.stdout], [], [], remaining)[0]:
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    if wanted not in output:
        tail = output[-vmm_lab.TAIL_BYTES :].decode(errors="replace")
        raise vmm_lab.BootFailed(f"qemu: no ready line (exit {process.returncode})\n{tail}")


# Restores: what Sandbox.create does, a few at a time.


async def _restore_once(backend: VmmBackend, image: Image) -> None:
    """One create's worth: restore until the agent answers, one more call, kill. A guest that
    died on the way is a BackendError carrying the VMM's crash report."""
    instance = await backend.start(image)  # returns once the agent has answered
    try:
        reply = await backend.control(instance, Ping())
        failure = "" if reply.ok else f"the agent answered a ping with {reply.error}"
    except BackendError as exc:
        failure = str(exc)
    await backend.kill(instance)
    if failure or instance.report:  # a report: it died by itself before the kill
        raise BackendError("\n".join([failure or instance.death, *instance.report]))


async def restore_soak(
    image: Image, work: Path, count: int, width: int, deadline: float, taps: BenchTaps | None
) -> Tally:
    """`count` restores, `width` at a time, until the deadline; every death with its report."""
    tally = Tally()
    backend = VmmBackend(work, taps)
    started = time.monotonic()

    async def worker() -> None:
        while tally.runs < count and time.monotonic() < deadline:
            tally.runs += 1
            try:
                await _restore_once(backend, image)
            except (BackendError, OSError, snapshot.SnapshotError, VmError) as exc:
                tally.deaths.append(str(exc))
                _say(f"DEATH restore {tally.runs}: " + "\n  ".join(
                    str(exc).splitlines()[:REPORT_LINES]))  # fmt: skip
            if tally.runs % 100 == 0:
                _say(f"{tally.runs} restores, {len(tally.deaths)} deaths")

    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        async with trio.open_nursery() as workers:
            for _ in range(width):
                workers.start_soon(worker)
        nursery.cancel_scope.cancel()
    tally.seconds = time.monotonic() - started
    return tally


def l1_trouble() -> Counter[str]:
    """What L1's kernel log says went wrong with L1 itself during the run (dmesg)."""
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    return Counter(t for line in log.splitlines() for t in L1_TROUBLE if t in line)


def _alternate(
    sides: list[tuple[Tally, Callable[[], object]]], count: int, deadline: float
) -> None:
    """`count` rounds of one run on each side, the order swapped every round, so drift in a
    noisy lab lands on both alike."""
    for index in range(count):
        if time.monotonic() >= deadline:
            return
        for tally, work in sides if index % 2 == 0 else sides[::-1]:
            tally.record(work)
    _say(f"{count} rounds done: " + ", ".join(f"{t.runs} runs, {len(t.deaths)} deaths"
                                              for t, _ in sides))  # fmt: skip


@dataclass(frozen=True)
class SoakPlan:
    boots: int
    reboots: int
    restores: int
    width: int
    minutes: float


def run(plan: SoakPlan, kernel: Path, name: str, image: Image, taps: BenchTaps | None) -> str:
    """Do the plan, the restores first (where L1 has livelocked before), then the boots, then
    the reboots; each kind has an equal share of the time left when it starts. The table."""
    end = time.monotonic() + plan.minutes * 60
    tallies: dict[str, Tally] = {}
    state = snapshot.read_state(image.folder)
    blk = next(dev.disk for dev in state.virtio if dev.kind == "blk" and dev.disk is not None)
    rootfs, cpus = Path(blk.base), len(state.vcpus)
    memory_mib = image.resources.memory_mb

    def share(kinds_left: int) -> float:
        return time.monotonic() + (end - time.monotonic()) / kinds_left

    with tempfile.TemporaryDirectory(prefix="cube-soak-") as scratch:
        if plan.restores:
            tallies["restore to agent, cube"] = trio.run(
                restore_soak, image, Path(scratch) / "vms", plan.restores, plan.width,
                share(3), taps,
            )  # fmt: skip
        initramfs = write_marker_initramfs(Path(scratch) / "marker.cpio")
        boots = [
            (tallies.setdefault("boot, cube", Tally()),
             partial(vmm_lab.boot_cube, kernel, initramfs, BOOT_MEMORY_MIB)),
            (tallies.setdefault("boot, qemu microvm", Tally()),
             partial(vmm_lab.boot_qemu, kernel, initramfs, BOOT_MEMORY_MIB)),
        ]  # fmt: skip
        _alternate(boots, plan.boots, share(2))
        reboots = [
            (tallies.setdefault("reboot, cube", Tally()),
             partial(reboot_cube, kernel, rootfs, cpus, memory_mib)),
            (tallies.setdefault("reboot, qemu microvm", Tally()),
             partial(reboot_qemu, kernel, rootfs, cpus, memory_mib)),
        ]  # fmt: skip
        _alternate(reboots, plan.reboots, end)
    trouble = l1_trouble()
    return "\n".join(
        [
            f"cube bench soak: kernel {kernel}; template {name} "
            f"({cpus} vCPU, {memory_mib} MiB); restores {plan.width} at a time; "
            f"deadline {plan.minutes:g} min",
            f"{'work':<28} {'runs':>6} {'deaths':>6} {'per 1000':>10} {'per hour':>9} "
            f"{'seconds':>8}",
            *(tally.row(name) for name, tally in tallies.items()),
            "L1's kernel log: "
            + (", ".join(f"{what} x{n}" for what, n in trouble.items()) or "clean"),
        ]
    )

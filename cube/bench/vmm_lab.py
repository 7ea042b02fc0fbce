"""`cube bench vmm --boot N` and `--template NAME`: the VMM's figures with a real guest kernel.

Issue 3 asks for two measurements that need hardware-style KVM (a standard Linux guest does not
run on PVM, shared/docs/kvm-here.md), so on our machines they run inside `cube lab run`. The lab
is QEMU TCG with emulated AMD-V: its absolute times are not product numbers, so each figure is
given beside a peer measured in the same run.

Boot to init. The guest kernel (cube.guestkernel.find_kernel) boots the compiler-free marker
initramfs (cube.bench.initramfs: its init prints MARKER and restarts the machine) N times in
Cube's VMM and N times in `qemu-system-x86_64 -M microvm` with KVM: same kernel, same
initramfs, same memory, one vCPU, no devices but the serial console on either side (QEMU with
-nodefaults, our VMM without vsock and rng, which the marker init would not use and only one
side would probe). Each boot is timed from asking the VMM for a VM (MicroVm.boot, or starting
the QEMU process) to the marker arriving on the console (boot to init) and to the VM being gone
(the restart ends it: Cube's VMM stops on the i8042 reset, QEMU exits on the triple fault of
`reboot=t` with -no-reboot; we close our VM, QEMU's process exits). Boots alternate, and the
order within a pair swaps every round, so drift in a noisy lab lands on both VMMs alike; one
warm-up boot of each (page cache for the kernel, QEMU's binary and libraries) is discarded.

Restore to agent reply. N restores of a template's snapshot through the product's
VmmBackend.start, which returns once the guest agent has answered a control call over vsock:
what a sandbox create waits for before the API can answer. Beside it, in the same rounds, the
host side alone: MicroVm.restore of the same snapshot, closed without running (the KVM objects,
memory mapping and device state the backend's restore also pays). Each instance is killed
before the next round, so the rounds measure one restore on an otherwise idle machine; one
warm-up round is discarded (the first touch of the snapshot's memory file).

The template store is `cube serve`'s (its --data-dir, default cube.paths.data_dir()). A template
built as root has a virtio-net device, and every restore of it must attach to a tap; the bench
has no sandbox network, so it lends the backend one unconnected tap (no address, down, deleted
afterwards: cube.net.tap.unconnected, as the template build uses) that each restore in turn
opens and closes. Templates built without the device need none.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from pyroute2.netlink.exceptions import NetlinkError

from cube import paths
from cube.bench.initramfs import MARKER, write_marker_initramfs
from cube.bench.vmm import Latency
from cube.guest.wire import NetConfig
from cube.guestkernel import find_kernel
from cube.net import tap
from cube.net.addressing import Lease
from cube.pool.backend import BackendError, Image
from cube.pool.template import TemplateError, TemplateStore
from cube.pool.vmm_backend import VmmBackend
from cube.vmm import probe, snapshot
from cube.vmm.vcpu import StopReason
from cube.vmm.vm import MicroVm, VmConfig, VmError

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 300.0  # nested TCG: a boot takes seconds; allow minutes before calling it hung
# Ours; Cube's VMM puts its own console=ttyS0 reboot=k panic=1 (and the i8042 options) first.
BOOT_CMDLINE = "quiet rdinit=/init"
# QEMU's: microvm has no i8042, so the restart is a triple fault, which -no-reboot turns into an
# exit; panic=-1 makes a panic end the VM at once too instead of hanging the bench.
QEMU_CMDLINE = f"console=ttyS0 reboot=t panic=-1 {BOOT_CMDLINE}"
WARMUP = 1
TAIL_BYTES = 2000
HEADER = f"{'measurement (ms)':<34} {'p50':>8} {'p95':>8} {'p99':>8} {'mean':>8}"


class BenchRefused(Exception):
    """This host cannot run the measurement asked for; the message says why in one line."""


class BenchFailed(RuntimeError):
    """A measurement went wrong midway (a VM that would not start or answer); the message
    quotes what the guest printed where there is a guest."""


class BootFailed(BenchFailed):
    """A boot did not reach the marker or did not end with the restart; quotes the console."""


def require_hardware_kvm(what: str) -> None:
    """Refuse unless guest kernel code runs in hardware here (the probe `cube doctor` uses)."""
    try:
        rate = probe.measure_cpl0_rate().rate
    except (OSError, RuntimeError) as exc:  # KvmError is an OSError
        raise BenchRefused(f"{what} needs KVM: {exc}") from None
    flavour = probe.flavour(rate)
    if flavour != "hardware":
        raise BenchRefused(
            f"{what} needs hardware-style KVM, and this host's is {flavour} (guest kernel code "
            f"runs at {rate / 1e6:.1f} M instr/s): run it in the lab, "
            f"`cube lab run -- python3 -m cube bench vmm ...`"
        )


# Boot to init.


@dataclass(frozen=True)
class Boot:
    """One boot, in milliseconds from asking the VMM for the VM."""

    marker_ms: float  # the init's marker on the console
    end_ms: float  # the VM gone after the init's restart


def boot_kernel() -> Path:
    """The guest kernel, or BenchRefused; and QEMU must be there to compare with."""
    if shutil.which(QEMU) is None:
        raise BenchRefused(f"--boot compares with QEMU, and {QEMU} is not installed here")
    kernel = find_kernel()
    if kernel is None:
        raise BenchRefused("no guest kernel in the cache: run `cube kernel build` on the host")
    return kernel


def _tail(console: bytes | str) -> str:
    text = console.decode(errors="replace") if isinstance(console, bytes) else console
    return f"\n--- console tail ---\n{text[-TAIL_BYTES:]}"


def boot_cube(kernel: Path, initramfs: Path, memory_mib: int) -> Boot:
    """Boot in Cube's VMM until the init's restart stops the VM (BootFailed otherwise)."""
    wanted = MARKER.encode()
    seen = bytearray()
    marker_at: list[float] = []

    def console(data: bytes) -> None:  # on the vCPU thread, as the guest writes
        if not marker_at:
            seen.extend(data)
            if wanted in seen[-len(wanted) - len(data) :]:
                marker_at.append(time.perf_counter())

    config = VmConfig(
        kernel=kernel, initrd=initramfs, cmdline=BOOT_CMDLINE, memory_mib=memory_mib,
        vsock=False, rng=False,
    )  # fmt: skip
    start = time.perf_counter()
    try:
        vm = MicroVm.boot(config, console=console)
    except (OSError, VmError) as exc:
        raise BootFailed(f"cube: cannot boot: {exc}") from None

    async def run() -> StopReason:
        with trio.fail_after(BOOT_TIMEOUT_S):
            return (await vm.run()).reason

    failure = ""
    try:
        reason = trio.run(run)
        if reason is not StopReason.RESET or not marker_at:
            failure = f"stopped ({reason.value}) without the marker"
    except trio.TooSlowError:
        failure = f"no restart within {BOOT_TIMEOUT_S:.0f} s"
    except VmError as exc:
        failure = str(exc).splitlines()[0]
    finally:
        report = vm.crash_report(TAIL_BYTES)  # before close drops KVM's state; used on failure
        vm.close()
    end = time.perf_counter()
    if failure:
        raise BootFailed("cube: " + "\n".join([failure, *report]))
    return Boot((marker_at[0] - start) * 1e3, (end - start) * 1e3)


def qemu_argv(kernel: Path, initramfs: Path, memory_mib: int) -> list[str]:
    """QEMU microvm with KVM, no ACPI and no default devices (as Cube's VMM: the devices are
    on the command line), the serial console on stdout; -no-reboot makes the restart its exit."""
    return [
        QEMU, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host", "-smp", "1",
        "-m", f"{memory_mib}M", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initramfs), "-append", QEMU_CMDLINE,
    ]  # fmt: skip


def boot_qemu(kernel: Path, initramfs: Path, memory_mib: int) -> Boot:
    """Boot in QEMU microvm until the process exits (BootFailed unless the marker came first)."""
    wanted = MARKER.encode()
    output = bytearray()
    marker_at: float | None = None
    start = time.perf_counter()
    deadline = start + BOOT_TIMEOUT_S
    process = subprocess.Popen(
        qemu_argv(kernel, initramfs, memory_mib),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    fd = process.stdout.fileno()
    try:
        while (remaining := deadline - time.perf_counter()) > 0:
            if not select.select([fd], [], [], remaining)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:  # QEMU closed its stdout: it is exiting
                break
            output += chunk
            if marker_at is None and wanted in output:
                marker_at = time.perf_counter()
        else:
            raise BootFailed(f"qemu: no exit within {BOOT_TIMEOUT_S:.0f} s{_tail(output)}")
        process.wait(timeout=max(1.0, deadline - time.perf_counter()))
        end = time.perf_counter()
    except subprocess.TimeoutExpired:
        raise BootFailed(f"qemu: closed its output but did not exit{_tail(output)}") from None
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    if marker_at is None:  # its exit status is not checked: the marker is what counts
        raise BootFailed(f"qemu: exited {process.returncode} without the marker{_tail(output)}")
    return Boot((marker_at - start) * 1e3, (end - start) * 1e3)


def boot_rounds(kernel: Path, initramfs: Path, memory_mib: int, count: int) -> list[list[Boot]]:
    """[cube boots, qemu boots], taken in alternation after WARMUP discarded pairs."""
    cube: list[Boot] = []
    qemu: list[Boot] = []
    sides = [(boot_cube, cube), (boot_qemu, qemu)]
    for index in range(WARMUP + count):
        for boot, samples in sides if index % 2 == 0 else sides[::-1]:
            result = boot(kernel, initramfs, memory_mib)
            if index >= WARMUP:
                samples.append(result)
    return [cube, qemu]


def run_boot(kernel: Path, count: int, memory_mib: int) -> str:
    """The boot comparison, as a printable table."""
    with tempfile.TemporaryDirectory(prefix="cube-bench-boot-") as scratch:
        initramfs = write_marker_initramfs(Path(scratch) / "marker.cpio")
        cube, qemu = boot_rounds(kernel, initramfs, memory_mib, count)
    to_marker = [Latency([b.marker_ms for b in side]) for side in (cube, qemu)]
    to_end = [Latency([b.end_ms for b in side]) for side in (cube, qemu)]
    return "\n".join(
        [
            f"cube bench vmm --boot: {kernel}, 1 vCPU, {memory_mib} MiB, marker initramfs",
            f"timed from asking for the VM; cube and qemu microvm alternate, {WARMUP} warm-up "
            "boot of each excluded",
            HEADER,
            to_marker[0].row("cube: to init's marker"),
            to_marker[1].row("qemu microvm: to init's marker"),
            to_end[0].row("cube: to the VM's end (restart)"),
            to_end[1].row("qemu microvm: to the VM's end"),
            f"cube/qemu at p50: {to_marker[0].pct(50) / to_marker[1].pct(50):.2f} to the marker, "
            f"{to_end[0].pct(50) / to_end[1].pct(50):.2f} to the VM end",
        ]
    )


# Restore to agent reply.


def template_image(name: str, data_dir: Path | None) -> Image:
    """The ready template's image in `cube serve`'s store, or BenchRefused."""
    store = TemplateStore((data_dir or paths.data_dir()) / "templates")
    try:
        template = store.get(name)
    except TemplateError as exc:
        raise BenchRefused(f"{exc} in {store.root}") from None
    info = store.lookup(template.name)
    if info is None or info.image is None:
        raise BenchRefused(f"template {template.name!r} is {template.status}, not ready")
    return info.image


class BenchTaps:
    """What VmmBackend asks of a network (a lease with a tap, given back after the VM closed
    it), reduced to a few taps with nothing behind them: one per restore in flight."""

    def __init__(self, names: list[str]) -> None:
        # The guest side is never pushed to a guest (that is the daemon's assign); TEST-NET-1.
        guest = NetConfig(address="192.0.2.2/30", gateway="192.0.2.1")
        self._free = [Lease(tap=name, mac=tap.BUILD_MAC, guest=guest) for name in names]
        self.name = names[0]  # for a restore outside the backend, while none is lent
        self._count = len(names)

    async def lease(self) -> Lease:
        if not self._free:
            raise BackendError(f"all {self._count} of the bench's taps are lent")
        return self._free.pop()

    def release(self, lease: Lease) -> None:
        self._free.append(lease)


@contextlib.contextmanager
def tap_for(image: Image, count: int = 1) -> Iterator[BenchTaps | None]:
    """`count` taps if the snapshot has a network device, else None; BenchRefused if the
    snapshot cannot be read or no tap can be made (not root)."""
    try:
        devices = snapshot.read_state(image.folder).virtio
    except snapshot.SnapshotError as exc:
        raise BenchRefused(f"cannot read the template's snapshot: {exc}") from None
    if not any(dev.kind == "net" for dev in devices):
        yield None
        return
    with contextlib.ExitStack() as stack:
        try:
            names = [stack.enter_context(tap.unconnected(i)) for i in range(count)]
        except (OSError, NetlinkError) as exc:
            raise BenchRefused(
                f"the template has a network device, and restoring it needs a tap: {exc} "
                "(run as root)"
            ) from None
        yield BenchTaps(names)


@dataclass
class RestoreRounds:
    restore_ms: list[float]  # MicroVm.restore alone
    agent_ms: list[float]  # VmmBackend.start: restore, run, agent's reply


async def _restore_alone(folder: Path, workdir: Path, net_tap: str | None) -> float:
    workdir.mkdir()
    try:
        start = time.perf_counter()
        vm = await trio.to_thread.run_sync(
            partial(MicroVm.restore, folder, workdir, net_tap=net_tap)
        )
        elapsed = (time.perf_counter() - start) * 1e3
        await trio.to_thread.run_sync(vm.close)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return elapsed


async def restore_rounds(
    image: Image, work: Path, count: int, taps: BenchTaps | None
) -> RestoreRounds:
    """Rounds of (MicroVm.restore alone, VmmBackend.start), each instance killed at once.
    BenchFailed if a restore fails or an agent does not answer (raised outside the nursery, so
    it is not wrapped in an exception group)."""
    rounds = RestoreRounds([], [])
    backend = VmmBackend(work / "vms", taps)
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        try:
            for index in range(WARMUP + count):
                net_tap = taps.name if taps else None
                alone = await _restore_alone(image.folder, work / "alone", net_tap)
                start = time.perf_counter()
                instance = await backend.start(image)
                agent = (time.perf_counter() - start) * 1e3
                await backend.kill(instance)
                if index >= WARMUP:
                    rounds.restore_ms.append(alone)
                    rounds.agent_ms.append(agent)
        except (BackendError, OSError, snapshot.SnapshotError, VmError) as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise BenchFailed(f"{failure} ({len(rounds.agent_ms)} timed rounds done)")
    return rounds


def run_template(name: str, image: Image, count: int, taps: BenchTaps | None) -> str:
    """Restore to agent reply for a template, as a printable table."""
    with tempfile.TemporaryDirectory(prefix="cube-bench-restore-") as scratch:
        rounds = trio.run(restore_rounds, image, Path(scratch), count, taps)
    restore, agent = Latency(rounds.restore_ms), Latency(rounds.agent_ms)
    shape = image.resources
    network = "one unconnected tap" if taps else "no network device"
    return "\n".join(
        [
            f"cube bench vmm --template {name}: {shape.cpu_count} vCPU, {shape.memory_mb} MiB, "
            f"{network}; snapshot {image.folder}",
            f"each round: MicroVm.restore alone, then VmmBackend.start, then kill; "
            f"{WARMUP} warm-up round excluded",
            HEADER,
            restore.row("restore (host side, MicroVm)"),
            agent.row("restore to agent reply (vsock)"),
            f"agent reply / restore (p50): {agent.pct(50) / restore.pct(50):.2f}",
        ]
    )

"""A microVM: guest RAM, vCPUs, the legacy devices and virtio devices, wired and booted.

`MicroVm.boot()` builds a VM in the order KVM requires (vmm-facts.md §2.1): irqchip and PIT
before any vCPU, memory, devices with their irqfds and ioeventfds, the kernel and its boot data,
then per-vCPU state. `MicroVm.restore()` builds the same machine around a snapshot's memory and
state instead (§8). `run()` is a trio task that owns the vCPU threads and the device tasks and
returns when the guest stops (reboot, power-off, crash) or the task is cancelled; in every case
the threads are stopped and joined before it returns, and `close()` releases every fd and
mapping.

Interrupts go through irqfd: a device (on any thread) writes an eventfd and KVM injects the
edge, with no ioctl and no vCPU thread involved. Queue kicks of devices served on the trio thread
(vsock) arrive through ioeventfd, so those MMIO writes complete inside KVM without an exit.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from cube.vmm import cpu, crash_report, gdt, layout, mptable, pvh, snapshot
from cube.vmm.bus import Bus
from cube.vmm.devices.i8042 import I8042
from cube.vmm.devices.serial import Serial
from cube.vmm.devices.virtio_blk import VirtioBlk
from cube.vmm.devices.virtio_mmio import QUEUE_NOTIFY, VirtioBackend, VirtioMmio
from cube.vmm.devices.virtio_net import VirtioNet
from cube.vmm.devices.virtio_rng import VirtioRng
from cube.vmm.devices.virtio_vsock import VirtioVsock
from cube.vmm.disk import LayeredDisk
from cube.vmm.elf import load_vmlinux
from cube.vmm.kvm import PAGE_SIZE, Kvm, KvmError, Vcpu, Vm, ffi
from cube.vmm.memory import GuestRam
from cube.vmm.vcpu import TRIPLE_FAULT, Stop, StopReason, VcpuRunner, install_kick_handler

SERIAL_PORT = 0x3F8
I8042_PORT = 0x60
BASE_CMDLINE = "console=ttyS0 reboot=k panic=1 nomodule i8042.noaux i8042.nomux i8042.dumbkbd"
GUEST_CID = 3  # every VM has its own vsock device, so all guests can share one CID
IRQCHIP_IDS = (0, 1, 2)  # PIC master, PIC slave, IOAPIC
# KVM on AMD reinitialises a vCPU's VMCB at a shutdown intercept, so after a triple fault its
# registers read as the reset state (rip 0xfff0, cs base 0xffff0000) and only the events keep
# the exception that could not be delivered; on Intel they are the state at the fault.
TRIPLE_FAULT_NOTE = (
    "(on AMD hosts KVM resets a vCPU that triple-faults: reset-state registers below mean "
    "that, and the exception line keeps the fault that could not be delivered)"
)


class VmError(RuntimeError):
    """The VM could not be built, or stopped on an error; the message ends with the console tail."""


@dataclass(frozen=True)
class DiskConfig:
    base: Path
    overlay: Path  # created by the VM; must not exist
    frozen: tuple[Path, ...] = ()
    read_only: bool = False

    @classmethod
    def of_snapshot(
        cls, disk: snapshot.DiskState, index: int, folder: Path, workdir: Path
    ) -> DiskConfig:
        """Disk `index` of the snapshot in `folder`: its layers frozen, the snapshot's own
        overlay on top, and a new overlay in `workdir` for whatever runs on it next."""
        frozen = (*(Path(p) for p in disk.frozen), folder / disk.overlay)
        return cls(Path(disk.base), workdir / f"disk{index}.overlay", frozen, disk.read_only)

    def open(self) -> LayeredDisk:
        return LayeredDisk.open(self.base, list(self.frozen), self.overlay)


@dataclass(frozen=True)
class NetConfig:
    tap: str | None  # an existing tap, created and owned by cube/net (None: nothing behind)
    mac: str  # the guest's eth0 address, e.g. "02:00:0a:00:00:02"


@dataclass(frozen=True)
class VmConfig:
    kernel: Path
    cmdline: str = ""
    vcpus: int = 1
    memory_mib: int = 256
    disks: tuple[DiskConfig, ...] = ()
    vsock: bool = True
    rng: bool = True
    initrd: Path | None = None
    net: NetConfig | None = None


def reboot_config(folder: Path, workdir: Path, kernel: Path, net_tap: str | None) -> VmConfig:
    """A fresh boot of `kernel` on a snapshot's disks, as they were when it was taken (writes go
    to new overlays in `workdir`), with its vCPUs, memory size, command line and MAC; its memory
    and device state are not used. E2B's filesystem-only resume reboots a paused sandbox so."""
    state = snapshot.read_state(folder)
    disks, net = [], None
    for index, dev in enumerate(state.virtio):
        if dev.kind == "blk" and dev.disk is not None:
            disks.append(DiskConfig.of_snapshot(dev.disk, index, folder, workdir))
        elif dev.kind == "net" and dev.net is not None:
            net = NetConfig(net_tap, dev.net.mac)
    return VmConfig(
        kernel=kernel, cmdline=state.cmdline, vcpus=len(state.vcpus),
        memory_mib=state.memory_size // layout.MiB, disks=tuple(disks), net=net,
    )  # fmt: skip


class IrqLines:
    """One eventfd per GSI, bound to the VM with irqfd; owns and closes them."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        self._fds: dict[int, int] = {}

    def trigger(self, gsi: int) -> Callable[[], None]:
        if gsi not in self._fds:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._fds[gsi] = fd
            self._vm.irqfd(fd, gsi)
        return functools.partial(self._fire, gsi)

    def _fire(self, gsi: int) -> None:
        """Raise the line; once closed, a no-op, so a late interrupt never writes to whatever
        file has since taken the eventfd's number."""
        fd = self._fds.get(gsi)
        if fd is not None:
            os.eventfd_write(fd, 1)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass
class _Device:
    kind: str
    transport: VirtioMmio
    base: int
    gsi: int
    disk: LayeredDisk | None = None
    read_only: bool = False


@dataclass
class MicroVm:
    vm: Vm
    ram: GuestRam
    irqs: IrqLines
    serial: Serial
    i8042: I8042 | None = None
    cmdline_extra: str = ""
    memory_parent: Path | None = None  # the full snapshot whose memory backs our RAM
    pio: Bus = field(default_factory=lambda: Bus("pio"))
    mmio: Bus = field(default_factory=lambda: Bus("mmio"))
    devices: list[_Device] = field(default_factory=list)
    vsock: VirtioVsock | None = None
    net: VirtioNet | None = None
    runners: list[VcpuRunner] = field(default_factory=list)
    stop: Stop | None = None
    _msrs: list[int] = field(default_factory=list)

    # Building.

    @classmethod
    def _create(
        cls, kvm: Kvm, vm: Vm, ram: GuestRam, console: Callable[[bytes], None] | None
    ) -> MicroVm:
        """The machine without vCPUs or virtio devices: memory slots, irqchip, legacy devices."""
        vm.set_tss_addr(layout.TSS_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
        for slot, (region, memory) in enumerate(ram.regions):
            vm.set_user_memory_region(slot, region.guest_addr, memory)
        irqs = IrqLines(vm)
        serial = Serial(irq=irqs.trigger(layout.GSI_SERIAL), sink=console)
        self = cls(vm, ram, irqs, serial)
        self._msrs = cpu.snapshot_msrs(kvm.msr_index_list())
        self.i8042 = I8042(on_reset=self._on_reset)
        self.pio.register(SERIAL_PORT, 8, self.serial)
        self.pio.register(I8042_PORT, 5, self.i8042)
        return self

    @classmethod
    def _build(
        cls,
        ram_factory: Callable[[], GuestRam],
        console: Callable[[bytes], None] | None,
        setup: Callable[[Kvm, MicroVm], None],
    ) -> MicroVm:
        install_kick_handler()
        with Kvm() as kvm:
            vm = kvm.create_vm()
            self: MicroVm | None = None
            try:
                ram = ram_factory()
                try:
                    self = cls._create(kvm, vm, ram, console)
                except BaseException:
                    ram.close()
                    raise
                setup(kvm, self)
                return self
            except BaseException:
                if self is not None:
                    self.close()
                else:
                    vm.close()
                raise

    @classmethod
    def boot(cls, config: VmConfig, console: Callable[[bytes], None] | None = None) -> MicroVm:
        """Build a VM ready to run from the kernel's PVH entry point.

        `console` receives the guest's serial output as it is written (on vCPU threads); the
        tail is kept in any case for error reports.
        """
        if not 1 <= config.vcpus <= layout.MAX_VCPUS:
            raise VmError(f"{config.vcpus} vCPUs: Cube supports 1 to {layout.MAX_VCPUS}")
        kernel = config.kernel.read_bytes()
        initrd_data = config.initrd.read_bytes() if config.initrd else None

        def setup(kvm: Kvm, self: MicroVm) -> None:
            self.cmdline_extra = config.cmdline
            for disk in config.disks:
                layered = disk.open()
                self._add_device("blk", VirtioBlk(layered, read_only=disk.read_only), layered)
            if config.vsock:
                self._add_device("vsock", VirtioVsock(GUEST_CID))
            if config.rng:
                self._add_device("rng", VirtioRng())
            if config.net is not None:
                self._add_device("net", VirtioNet(config.net.tap, config.net.mac))
            ram = self.ram
            image = load_vmlinux(kernel, ram, ram.low_end)
            initrd = None
            if initrd_data is not None:
                addr = pvh.initrd_address(len(initrd_data), image.end, ram.low_end)
                ram.write(addr, initrd_data)
                initrd = pvh.Initrd(addr, len(initrd_data))
            regions = [region for region, _ in ram.regions]
            pvh.write_boot_info(ram, regions, self.cmdline(), initrd)
            ram.write(layout.EBDA_START, mptable.build_mptable(config.vcpus))
            ram.write(layout.GDT_ADDR, gdt.table_bytes())
            ram.write(layout.IDT_ADDR, bytes(8))
            supported = kvm.supported_cpuid()
            for index in range(config.vcpus):
                vcpu = self._add_vcpu(index)
                cpu.configure(vcpu, supported, config.vcpus)
            cpu.enter_pvh(self.vm.vcpus[0], image.pvh_entry)

        return cls._build(
            lambda: GuestRam.anonymous(config.memory_mib * layout.MiB), console, setup
        )

    @classmethod
    def restore(
        cls,
        folder: Path,
        workdir: Path,
        console: Callable[[bytes], None] | None = None,
        net_tap: str | None = None,
    ) -> MicroVm:
        """Rebuild a VM from a snapshot folder; disk writes go to new overlays in `workdir`.

        A snapshot's network device attaches to `net_tap` (every clone to its own tap, with the
        MAC the snapshot's guest already uses); without one it is restored with nothing behind
        it, so a daemon that runs without sandbox networking can still serve templates built
        with the device.
        """
        state = snapshot.read_state(folder)
        parent = Path(state.parent) if state.parent else None
        if parent is not None and snapshot.read_state(parent).memory_size != state.memory_size:
            raise snapshot.SnapshotError(f"{folder}: parent {parent} has a different memory size")
        memory_file = snapshot.check_memory_file(parent or folder, state.memory_size)
        if not 1 <= len(state.vcpus) <= layout.MAX_VCPUS:
            raise snapshot.SnapshotError(f"{folder}: {len(state.vcpus)} vCPUs")

        def load_ram() -> GuestRam:
            ram = GuestRam.from_file(memory_file, state.memory_size)
            if parent is not None:
                _apply_diff(ram, folder, state.memory_size)
            return ram

        def setup(kvm: Kvm, self: MicroVm) -> None:
            self.memory_parent = parent or folder
            self.cmdline_extra = state.cmdline
            self.serial.restore(state.serial)
            self.i8042.restore(state.i8042)  # type: ignore[union-attr]
            for index, dev in enumerate(state.virtio):
                self._restore_device(index, dev, folder, workdir, net_tap)
            for vcpu_state in state.vcpus:
                cpu.restore_vcpu(self._add_vcpu(vcpu_state.index), vcpu_state)
            self._restore_vm_state(state.vm)
            for device in self.devices:
                if device.transport.activated:
                    device.transport.backend.activate(device.transport)
            if self.vsock is not None:
                self.vsock.transport_reset()  # the guest's connections died with the snapshot

        return cls._build(load_ram, console, setup)

    def _add_vcpu(self, index: int) -> Vcpu:
        vcpu = self.vm.create_vcpu(index)
        self.runners.append(VcpuRunner(vcpu, self.pio, self.mmio, self._on_vcpu_stop))
        return vcpu

    def _add_device(
        self, kind: str, backend: VirtioBackend, disk: LayeredDisk | None = None
    ) -> VirtioMmio:
        base, gsi = layout.virtio_slot(len(self.devices))
        transport = VirtioMmio(backend, self.ram, self.irqs.trigger(gsi))
        self.mmio.register(base, layout.VIRTIO_MMIO_SIZE, transport)
        read_only = isinstance(backend, VirtioBlk) and backend.read_only
        self.devices.append(_Device(kind, transport, base, gsi, disk, read_only))
        if isinstance(backend, VirtioVsock):
            self.vsock = backend
            for queue in range(len(backend.queue_sizes)):
                self.vm.ioeventfd(backend.kick_fd, base + QUEUE_NOTIFY, 4, datamatch=queue)
        if isinstance(backend, VirtioNet):
            self.net = backend
            for queue, fd in enumerate(backend.kick_fds):
                self.vm.ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=queue)
        return transport

    def _restore_device(
        self,
        index: int,
        dev: snapshot.VirtioState,
        folder: Path,
        workdir: Path,
        net_tap: str | None,
    ) -> None:
        backend: VirtioBackend
        disk = None
        if dev.kind == "blk" and dev.disk is not None:
            disk = DiskConfig.of_snapshot(dev.disk, index, folder, workdir).open()
            backend = VirtioBlk(disk, read_only=dev.disk.read_only)
        elif dev.kind == "vsock":
            backend = VirtioVsock(GUEST_CID)
        elif dev.kind == "rng":
            backend = VirtioRng()
        elif dev.kind == "net" and dev.net is not None:
            backend = VirtioNet.from_state(dev.net, net_tap)
        else:
            raise snapshot.SnapshotError(f"unknown device kind {dev.kind!r} in snapshot")
        self._add_device(dev.kind, backend, disk).restore(dev.mmio)

    def _restore_vm_state(self, state: snapshot.VmState) -> None:
        pit = ffi.new("struct kvm_pit_state2 *")
        ffi.buffer(pit)[:] = state.pit
        self.vm.set_pit2(pit)
        clock = ffi.new("struct kvm_clock_data *")
        ffi.buffer(clock)[:] = state.clock
        clock.flags = 0  # resume the guest clock from the snapshot instant
        self.vm.set_clock(clock)
        for blob in state.irqchips:
            chip = ffi.new("struct kvm_irqchip *")
            ffi.buffer(chip)[:] = blob
            self.vm.set_irqchip(chip)
        for vcpu in self.vm.vcpus:
            _kvmclock_stopped(vcpu)

    def cmdline(self) -> str:
        devices = " ".join(f"virtio_mmio.device=4K@{d.base:#x}:{d.gsi}" for d in self.devices)
        return " ".join(part for part in (BASE_CMDLINE, devices, self.cmdline_extra) if part)

    # Pausing and snapshots.

    def pause(self) -> None:
        """Park every vCPU outside KVM_RUN; the guest's clock will not count the pause.

        The network device's threads stop too: the tap would otherwise go on writing guest
        memory while a snapshot is taken.
        """
        for runner in self.runners:
            runner.pause()
        if self.net is not None:
            self.net.pause()
        for vcpu in self.vm.vcpus:
            _kvmclock_stopped(vcpu)

    def resume(self) -> None:
        if self.net is not None:
            self.net.resume()
        for runner in self.runners:
            runner.resume()

    def save_snapshot(self, target: Path, workdir: Path) -> None:
        """Write a snapshot of this paused VM into the new folder `target`.

        A VM booted from scratch writes a full snapshot; a VM restored from a snapshot writes a
        diff against the full snapshot its memory came from. Disk overlays move into the
        snapshot and the VM carries on writing to new overlays in `workdir`, so the VM may be
        resumed afterwards.
        """
        with snapshot.writing(target) as tmp:
            virtio = [
                self._save_device(i, d, tmp, target, workdir) for i, d in enumerate(self.devices)
            ]
            state = snapshot.SnapshotState(
                memory_size=self.ram.size,
                cmdline=self.cmdline_extra,
                vcpus=[cpu.save_vcpu(r.vcpu, self._msrs) for r in self.runners],
                vm=snapshot.VmState(
                    clock=bytes(ffi.buffer(self.vm.get_clock())),
                    pit=bytes(ffi.buffer(self.vm.get_pit2())),
                    irqchips=[bytes(ffi.buffer(self.vm.get_irqchip(i))) for i in IRQCHIP_IDS],
                ),
                serial=self.serial.state(),
                i8042=self.i8042.state(),  # type: ignore[union-attr]
                virtio=virtio,
                parent=str(self.memory_parent) if self.memory_parent else None,
            )
            self._save_memory(tmp)
            snapshot.write_state(tmp, state)

    def _save_device(
        self, index: int, device: _Device, tmp: Path, target: Path, workdir: Path
    ) -> snapshot.VirtioState:
        disk_state = None
        if device.disk is not None:
            disk = device.disk
            name = f"disk{index}.overlay"
            disk.flush()
            os.link(disk.top.path, tmp / name)
            disk.save_chunk_map(tmp / f"{name}.map")
            frozen = [str(layer.path) for layer in disk.layers[1:-1]]
            disk_state = snapshot.DiskState(
                str(disk.layers[0].path), frozen, name, device.read_only
            )
            disk.freeze_top(target / name, workdir / f"disk{index}.{os.urandom(4).hex()}.overlay")
        backend = device.transport.backend
        net = backend.state() if isinstance(backend, VirtioNet) else None
        return snapshot.VirtioState(device.kind, device.transport.state(), disk_state, net)

    def _save_memory(self, folder: Path) -> None:
        path = folder / snapshot.MEMORY_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.ram.size)
            offset, bits = 0, []
            for region, memory in self.ram.regions:
                flags = snapshot.page_flags(memory.address, region.size)
                if self.memory_parent is None:
                    wanted = snapshot.touched_pages(flags)
                else:
                    wanted = snapshot.private_pages(flags)
                    bits += wanted
                snapshot.write_pages(fd, offset, memory.view(), wanted)
                offset += region.size
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.memory_parent is not None:
            (folder / snapshot.PAGES_FILE).write_bytes(snapshot.pack_bits(bits))

    # Stopping.

    def _on_reset(self) -> None:
        self._on_vcpu_stop(Stop(StopReason.RESET, "i8042 reset"))

    def _on_vcpu_stop(self, stop: Stop) -> None:
        if self.stop is None:
            self.stop = stop
        for runner in self.runners:
            runner.request_stop()

    def request_stop(self) -> None:
        self._on_vcpu_stop(Stop(StopReason.REQUESTED))

    def exit_counts(self) -> Counter[str]:
        """KVM exits that reached this VM's vCPU threads, by reason, summed over its vCPUs;
        still readable after `run()` returned and after `close()`."""
        return sum((runner.exit_counts() for runner in self.runners), Counter())

    def console_tail(self, max_bytes: int = 4096) -> str:
        return self.serial.log_tail(max_bytes).decode(errors="replace")

    def died(self) -> bool:
        """Whether the guest stopped by itself (reboot, power-off, fault), not at our request."""
        return self.stop is not None and self.stop.reason is not StopReason.REQUESTED

    def crash_report(self, console_bytes: int = 4096) -> list[str]:
        """Why and how the guest stopped: every vCPU's state and last exits, then the console
        tail. Only while no vCPU is in KVM_RUN (after `run()` returned, or paused: a guest
        that hangs) and before `close()`, while KVM still holds the state."""
        if self.stop is None:
            lines = ["guest still running; its vCPUs were paused for this report"]
        else:
            detail = f" ({self.stop.detail})" if self.stop.detail else ""
            lines = [f"guest stopped: {self.stop.reason.value}{detail}"]
            if self.stop.detail == TRIPLE_FAULT:
                lines.append(TRIPLE_FAULT_NOTE)
        for runner in self.runners:
            lines += crash_report.vcpu_lines(runner.vcpu, runner.recent_exits())
        lines.append("--- console tail ---")
        return lines + self.console_tail(console_bytes).splitlines()

    async def run(self) -> Stop:
        """Run the guest until it stops; raise VmError if it crashed."""
        try:
            await self._run_until_stopped()
        finally:
            if self.vsock is not None:
                self.vsock.stop()
        stop = self.stop or Stop(StopReason.REQUESTED)
        if stop.reason is StopReason.CRASH:
            raise VmError(
                f"guest stopped: {stop.detail}\n--- console tail ---\n{self.console_tail()}"
            )
        return stop

    async def _run_until_stopped(self) -> None:
        async with trio.open_nursery() as nursery:
            remaining = len(self.runners)

            async def run_vcpu(index: int, runner: VcpuRunner) -> None:
                nonlocal remaining
                try:
                    await runner.run_in_own_thread(f"vcpu {index}")
                finally:
                    remaining -= 1
                    if remaining == 0:
                        nursery.cancel_scope.cancel()

            async def stop_on_cancel() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    self.request_stop()

            nursery.start_soon(stop_on_cancel)
            if self.vsock is not None:
                nursery.start_soon(self.vsock.run)
            if self.net is not None:
                nursery.start_soon(self.net.run)
            for index, runner in enumerate(self.runners):
                nursery.start_soon(run_vcpu, index, runner)

    def close(self) -> None:
        """Release everything; the guest must not be running (after `run()` returned)."""
        for device in self.devices:
            if device.disk is not None:
                device.disk.close()
        self.ram.close()
        self.vm.close()  # unmaps RAM and drops the irqfd/ioeventfd bindings with the VM
        self.irqs.close()
        if self.vsock is not None:
            self.vsock.close_fd()
            self.vsock = None
        if self.net is not None:
            self.net.close()
            self.net = None
        self.devices.clear()


def _kvmclock_stopped(vcpu: Vcpu) -> None:
    """Tell the guest it was stopped, so its soft-lockup watchdog ignores the gap.

    EINVAL only means the guest has not enabled kvm-clock (early boot, or not Linux).
    """
    with contextlib.suppress(KvmError):
        vcpu.kvmclock_ctrl()


def _apply_diff(ram: GuestRam, folder: Path, size: int) -> None:
    """Copy a diff snapshot's pages over the parent's privately mapped memory."""
    pages = size // PAGE_SIZE
    bits = snapshot.unpack_bits((folder / snapshot.PAGES_FILE).read_bytes(), pages)
    fd = os.open(folder / snapshot.MEMORY_FILE, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            raise snapshot.SnapshotError(f"{folder}: diff memory file has the wrong size")
        offset = 0
        for region, memory in ram.regions:
            view = memory.view()
            first = offset // PAGE_SIZE
            for page in range(region.size // PAGE_SIZE):
                if bits[first + page]:
                    at = page * PAGE_SIZE
                    os.preadv(fd, [view[at : at + PAGE_SIZE]], offset + at)
            offset += region.size
    finally:
        os.close(fd)

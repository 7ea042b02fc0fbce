"""The real backend: every sandbox is a KVM microVM restored from a snapshot by cube/vmm.

A template image is a full snapshot folder (memory, vCPU and device state, the rootfs as the
disk's base). Starting a sandbox restores it with guest RAM mapped copy-on-write from the
snapshot's memory file, so a clone costs only the pages it writes; its disk writes go to a
sparse overlay in the sandbox's work folder. The agent inside is already running (it was when
the template was snapshotted), so a start is a restore plus one control round trip over vsock.

Pause writes a diff snapshot against the template (the clone's private pages, device state and
disk overlay), so its cost follows dirty memory rather than RAM size, then frees the VM. Fork
and snapshot write the same kind of diff and let the source carry on. A resume without memory
(E2B's filesystem-only pause, or `on_resume="reboot"`) boots the guest kernel afresh on the
paused disk instead of restoring: files survive, processes do not. The pause itself is the same
either way, so the choice can still be made when resuming.

Networking: when the daemon has a NetworkManager, every restore leases a slot first and the VM
attaches to its tap; the slot's filter drops everything until the daemon assigns the lease to
a sandbox (`Sandboxes`, with the sandbox's egress policy). The lease is the VM's for its whole
life and goes back only once the VM has stopped and closed the tap, so a recycled tap never
speaks for a VM that is still running. A snapshot made without a network device (a template
built before networking, or with it off) restores without one; its lease is returned at once.

Threads: restores, pauses and snapshot writes are ioctls and file I/O that take milliseconds,
so they run in worker threads (`trio.to_thread`), never on the trio loop; concurrent creates
therefore restore in parallel. Each VM's `run()` is a task in this backend's nursery.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import trio

from cube.guest.wire import CONTROL_PORT, RELAY_PORT, ControlRequest, Reply
from cube.guestkernel import find_kernel
from cube.net.addressing import Lease
from cube.pool.agent_link import control_call, relay_handshake, wait_answering
from cube.pool.backend import BackendError, Death, Image, Resources, start_all
from cube.pool.identity import new_id
from cube.vmm.snapshot import SnapshotError
from cube.vmm.vcpu import install_kick_handler
from cube.vmm.vm import MicroVm, VmError, reboot_config

log = logging.getLogger(__name__)

AGENT_TIMEOUT_S = 30.0  # a restored agent answers at once; nested labs are slow
BOOT_AGENT_TIMEOUT_S = 180.0  # a rebooted guest's init starts the agent (a minute in the lab)
# Restores in flight, each until its agent answers. A just-restored guest needs CPU to handle
# the vsock reset and answer; a burst of 50 unbounded restores on a small host starves every
# one of them past AGENT_TIMEOUT_S (seen in the lab), so bursts queue here, a few per CPU wide.
STARTS_PER_CPU = 2
CONNECT_TIMEOUT_S = 10.0
FORK_PREFIX = "fork-"  # in the work folder: a fork's snapshot, which its copies' disks read


class Taps(Protocol):
    """What the backend needs of the network: a lease (a tap) per VM, given back once the VM has
    closed it. cube.net.manager.NetworkManager in `cube serve`; `cube bench vmm --template`
    lends a single unconnected tap."""

    async def lease(self) -> Lease: ...

    def release(self, lease: Lease) -> None: ...


@dataclass(eq=False)
class VmInstance:
    vm: MicroVm
    workdir: Path
    resources: Resources
    network: Lease | None
    dead: trio.Event = field(default_factory=trio.Event)
    death: str = ""
    report: tuple[str, ...] = ()  # a guest that stopped by itself: cube.vmm.crash_report
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def name(self) -> str:
        return f"vm-{self.workdir.name}"


class VmmBackend:
    def __init__(self, work_dir: Path, network: Taps | None = None) -> None:
        self._work_dir = work_dir
        self._network = network
        self._starting = trio.CapacityLimiter(STARTS_PER_CPU * (os.cpu_count() or 1))
        self._nursery: trio.Nursery | None = None
        self._instances: set[VmInstance] = set()
        self._stopped_exits: Counter[str] = Counter()  # VM exits of VMs that have stopped

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every VM's run task; on cancellation every VM still running is stopped."""
        install_kick_handler()  # restores run in worker threads, and Python sets handlers here
        self._work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await trio.to_thread.run_sync(self._remove_stale_work)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _remove_stale_work(self) -> None:
        """VM work folders (disk overlays of VMs that ran) left by a daemon that died: no VM
        of ours runs yet, and the data dir's lock (cube.data_lock) keeps any other daemon out.
        Fork snapshots stay: a paused fork's disk still reads its fork's frozen overlay."""
        for folder in self._work_dir.iterdir():
            if not folder.name.startswith(FORK_PREFIX):
                log.info("removed a VM work folder left by a crash", extra={"vm": folder.name})
                shutil.rmtree(folder, ignore_errors=True)

    # Starting.

    async def start(self, image: Image) -> VmInstance:
        return await self._restore(image.folder, image.resources)

    async def resume(self, folder: Path, memory: bool = True) -> VmInstance:
        if memory:
            return await self._restore(folder, None)
        kernel = find_kernel()
        if kernel is None:
            raise BackendError("no guest kernel is built (`cube kernel build`) to reboot with")

        def reboot(workdir: Path, tap: str | None) -> MicroVm:
            return MicroVm.boot(reboot_config(folder, workdir, kernel, tap))

        async with self._starting:
            return await self._start(reboot, f"reboot {folder.name}", None, BOOT_AGENT_TIMEOUT_S)

    async def _restore(self, folder: Path, resources: Resources | None) -> VmInstance:
        def restore(workdir: Path, tap: str | None) -> MicroVm:
            return MicroVm.restore(folder, workdir, net_tap=tap)

        async with self._starting:
            return await self._start(restore, f"restore {folder.name}", resources)

    async def _start(
        self,
        make: Callable[[Path, str | None], MicroVm],
        what: str,
        resources: Resources | None,
        agent_timeout: float = AGENT_TIMEOUT_S,
    ) -> VmInstance:
        """A VM from `make(workdir, tap)` (in a worker thread), running, its agent answering."""
        assert self._nursery is not None, "VmmBackend.run is not running"
        workdir = self._work_dir / new_id(12)
        workdir.mkdir(mode=0o700)
        lease = await self._network.lease() if self._network is not None else None
        tap = lease.tap if lease is not None else None
        try:
            vm = await trio.to_thread.run_sync(make, workdir, tap)
        except (OSError, SnapshotError, VmError) as exc:
            self._give_back(lease)
            shutil.rmtree(workdir, ignore_errors=True)
            raise BackendError(f"cannot {what}: {exc}") from exc
        if vm.net is None:
            self._give_back(lease)
            lease = None
        instance = VmInstance(vm, workdir, resources or _resources_of(vm), lease)
        self._instances.add(instance)
        self._nursery.start_soon(self._run_vm, instance)
        try:
            await self._wait_for_agent(instance, agent_timeout)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.kill(instance)
            raise
        return instance

    async def _run_vm(self, instance: VmInstance) -> None:
        vm = instance.vm
        try:
            try:
                stop = await vm.run()
                instance.death = f"guest stopped ({stop.reason.value}: {stop.detail})"
            except VmError as exc:
                instance.death = str(exc).splitlines()[0]
            if vm.died():
                instance.report = tuple(vm.crash_report())
                log.warning(
                    "sandbox VM died",
                    extra={"vm": instance.name, "reason": instance.death,
                           "report": "\n".join(instance.report)},
                )  # fmt: skip
        except Exception as exc:  # a fault in one VM's devices must not take the daemon down
            instance.death = f"VMM error: {exc!r}"
            log.exception("sandbox VM failed in the VMM", extra={"vm": instance.name})
        finally:
            instance.dead.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(instance.vm.close)
                self._give_back(instance.network)
                shutil.rmtree(instance.workdir, ignore_errors=True)
                self._instances.discard(instance)
                self._stopped_exits += instance.vm.exit_counts()  # no await since the discard
                instance.stopped.set()

    def _give_back(self, lease: Lease | None) -> None:
        """Return a lease whose VM never started or has closed its tap."""
        if lease is not None and self._network is not None:
            self._network.release(lease)

    async def _wait_for_agent(self, instance: VmInstance, timeout: float) -> None:
        """Return once the agent answers; else a BackendError with the crash report, taken
        from a paused VM if the guest still runs (where it hangs is the news)."""
        control = partial(self.control, instance)
        if await wait_answering(control, instance.dead, timeout):
            return
        if not instance.dead.is_set():
            await trio.to_thread.run_sync(instance.vm.pause)
            if instance.vm.stop is None:  # it did not die while being paused
                instance.report = tuple(instance.vm.crash_report())
        raise BackendError(
            f"the guest agent did not answer: {instance.death or 'timeout'}\n"
            + "\n".join(instance.report or instance.vm.console_tail(2048).splitlines())
        )

    # Talking to the guest.

    async def _open(self, instance: VmInstance, port: int) -> trio.abc.Stream:
        vsock = instance.vm.vsock
        if vsock is None or instance.dead.is_set():
            raise BackendError(f"sandbox VM is not running ({instance.death or 'no vsock'})")
        try:
            return await vsock.connect(port, timeout=CONNECT_TIMEOUT_S)
        except (ConnectionRefusedError, TimeoutError) as exc:
            raise BackendError(f"guest agent unreachable: {exc}") from exc

    async def connect(self, instance: VmInstance, port: int) -> trio.abc.Stream:
        stream = await self._open(instance, RELAY_PORT)
        try:
            await relay_handshake(stream, port)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def control(self, instance: VmInstance, request: ControlRequest) -> Reply:
        async with await self._open(instance, CONTROL_PORT) as stream:
            return await control_call(stream, request)

    async def console(self, instance: VmInstance, limit: int) -> list[str]:
        return instance.vm.console_tail(64 * 1024).splitlines()[-limit:]

    # Pause, fork, snapshot.

    async def _save(self, instance: VmInstance, folder: Path) -> None:
        """Pause the VM and write a snapshot of it into `folder`; the VM stays paused."""
        vm = instance.vm
        try:
            if folder.exists():
                folder.rmdir()  # the caller's empty folder: snapshots appear atomically by name
            await trio.to_thread.run_sync(vm.pause)
            await trio.to_thread.run_sync(vm.save_snapshot, folder, instance.workdir)
        except (OSError, SnapshotError) as exc:
            vm.resume()
            raise BackendError(f"cannot snapshot {instance.name}: {exc}") from exc

    async def pause(self, instance: VmInstance, folder: Path) -> None:
        await self._save(instance, folder)
        await self.kill(instance)

    async def snapshot(self, instance: VmInstance, folder: Path) -> None:
        await self._save(instance, folder)
        instance.vm.resume()

    async def fork(self, instance: VmInstance, count: int) -> list[VmInstance]:
        """Copies restored from a diff snapshot kept under the work folder: the copies' disks
        read the snapshot's frozen overlay, so it lives as long as the backend's work folder.
        """
        folder = self._work_dir / f"{FORK_PREFIX}{new_id(12)}"
        await self.snapshot(instance, folder)
        return await start_all(count, partial(self._restore, folder, instance.resources), self.kill)

    async def discard(self, folder: Path) -> None:
        """A paused sandbox's folder holds all of it (diff memory, device state, disk
        overlays); the daemon deletes the folder, so there is nothing else to free."""

    # Stopping.

    async def kill(self, instance: VmInstance) -> None:
        instance.vm.request_stop()
        await instance.stopped.wait()

    async def wait_dead(self, instance: VmInstance) -> Death:
        await instance.dead.wait()
        return Death(instance.death, instance.report)

    # Metrics.

    def vm_exits(self) -> Counter[str]:
        """KVM exits by reason of every VM this backend has run, stopped ones included; on the
        trio thread, where no VM moves between running and stopped midway."""
        return sum((i.vm.exit_counts() for i in self._instances), self._stopped_exits.copy())


def _resources_of(vm: MicroVm) -> Resources:
    """What a resumed VM has; the disk size is its first disk's, as the guest sees it."""
    disk_mb = 0
    if vm.devices and vm.devices[0].disk is not None:
        disk_mb = vm.devices[0].disk.size >> 20
    return Resources(cpu_count=len(vm.runners), memory_mb=vm.ram.size >> 20, disk_mb=disk_mb)

"""Building a template: root filesystem, first boot in the VMM, snapshot.

1. The rootfs (tree from Debian or an OCI image, Cube's guest layer, ext4) is a build-once
   artifact (cube.pool.rootfs_cache). A host that cannot boot guests (PVM) builds it with
   `--rootfs-only`; the same build inside `cube lab run` then finds it by its key.
2. The template folder gets a hard link to that image (a symlink across filesystems) as its
   read-only base disk, and the guest boots from it in the VMM with KERNEL_ARGS.
3. The agent is pinged over vsock (wire.CONTROL_PORT) until it answers; if the template has a
   readiness probe, init runs it in the guest and prints READY_MARKER on the console when it
   first passes. Every wait has a deadline, and a failure quotes the guest console's tail.
4. Prepare (the agent syncs its filesystems), pause, save the snapshot into the template
   folder, stop the VM: status ready, with the envd version the agent reported.

The VM has a virtio-net device on an unconnected tap (cube.net.tap.unconnected): devices
cannot be added to a snapshot later, and every clone attaches the device to a tap of its own.
The build itself has no network. Where taps cannot be made (not root), the template is built
without the device, and its sandboxes have no network at all.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import trio
from pyroute2.netlink.exceptions import NetlinkError

from cube import artifacts
from cube.guest import wire
from cube.guest.init import READY_MARKER
from cube.guestkernel import build_kernel, find_kernel, kernel_key
from cube.net import tap
from cube.pool import rootfs
from cube.pool.agent_link import control_call
from cube.pool.backend import BackendError
from cube.pool.buildlog import BuildError, BuildLog
from cube.pool.rootfs_cache import (
    ROOTFS_KIND,
    BuildSpec,
    build_rootfs,
    read_image_info,
    rootfs_key,
)
from cube.pool.template import ROOTFS_FILE, Template, TemplateError, TemplateStore
from cube.vmm import probe
from cube.vmm.vm import DiskConfig, MicroVm, NetConfig, VmConfig

BOOT_TIMEOUT = 600.0  # first boot of Python services under nested TCG takes minutes
PING_INTERVAL = 0.5
GUEST_CMDLINE = f"{rootfs.KERNEL_ARGS} quiet"


def template_key(spec: BuildSpec) -> str:
    """Hash of a template's inputs: its rootfs, the VM's shape and the guest kernel."""
    return artifacts.digest([rootfs_key(spec), str(spec.cpus), str(spec.memory_mb), kernel_key()])


def _link_rootfs(source: Path, target: Path) -> None:
    """Give the template its base disk: a hard link to the cached image, or, when the data dir
    is on another filesystem than the cache (two 9p shares in the lab), a symlink to it rather
    than gigabytes copied; such a template needs its cache entry (rebuilding makes it again)."""
    try:
        os.link(source, target)
    except OSError:
        target.symlink_to(source)


def build_template(
    spec: BuildSpec, store: TemplateStore, rootfs_only: bool = False
) -> Template | None:
    """Build (or rebuild) the template; None when only the rootfs was asked for."""
    if rootfs_only:
        with BuildLog(None) as log:
            build_rootfs(spec, log)
        return None
    with store.building(spec.name):
        template = store.begin(
            spec.name, source=spec.source, cpus=spec.cpus, memory_mb=spec.memory_mb,
            start_cmd=spec.start_cmd, ready_cmd=spec.ready_cmd, apt=list(spec.apt),
            pip=list(spec.pip), interpreter=spec.interpreter, inputs=template_key(spec),
        )  # fmt: skip
        with BuildLog(Path(template.build_log)) as log:
            try:
                cached = build_rootfs(spec, log)
                _link_rootfs(cached / ROOTFS_FILE, Path(template.rootfs))
                info = read_image_info(cached)
                envd_version = snapshot_template(template, log)
            except BaseException as error:  # whatever stopped it, the status must say so
                message = str(error) or type(error).__name__
                log.step(f"build failed: {message}")
                store.update(template, "error", error=message)
                if isinstance(error, Exception):
                    raise BuildError(message) from error
                raise
            log.step(f"template {spec.name} ready (envd {envd_version})")
            return store.update(
                template, "ready", envd_version=envd_version, built_at=time.time(),
                disk_mb=info.disk_mb, env=dict(info.config.env),
                workdir=info.config.workdir, user=info.config.user,
            )  # fmt: skip


class GuestConsole:
    """Guest console bytes to the build log, line by line; notices init's ready marker."""

    def __init__(self, log: BuildLog) -> None:
        self._log = log
        self._pending = b""
        self.ready = False

    def __call__(self, data: bytes) -> None:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            self.ready = self.ready or line == READY_MARKER
            self._log.line(f"guest| {line}")


def snapshot_template(template: Template, log: BuildLog) -> str:
    """Boot the template's rootfs, wait for the agent (and readiness), snapshot; envd version."""
    rate = probe.measure_cpl0_rate().rate
    if probe.classify(rate) != "hardware":
        raise BuildError(
            f"this host's KVM emulates guest kernel code ({probe.flavour(rate)}), so the guest "
            "cannot boot here; the rootfs is cached now: run the same build inside the lab "
            "(`cube lab run -- cube template build ...`)"
        )
    kernel = find_kernel() or build_kernel()
    work = Path(template.snapshot).with_name("work")
    work.mkdir()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        try:
            net = NetConfig(tap=stack.enter_context(tap.unconnected()), mac=tap.BUILD_MAC)
        except (OSError, NetlinkError) as exc:
            log.step(f"no network device: cannot make a tap ({exc}); sandboxes get no network")
            net = None
        config = VmConfig(
            kernel=kernel, cmdline=GUEST_CMDLINE, vcpus=template.cpus,
            memory_mib=template.memory_mb,
            disks=(DiskConfig(base=Path(template.rootfs), overlay=work / "boot.overlay"),),
            net=net,
        )  # fmt: skip
        console = GuestConsole(log)
        log.step(f"booting {kernel} with {template.cpus} vCPUs, {template.memory_mb} MiB")
        vm = MicroVm.boot(config, console=console)
        stack.callback(vm.close)
        try:
            return trio.run(_drive, vm, template, console, work, log)
        except BaseExceptionGroup as group:  # the nursery's: the error inside says what happened
            raise _first_error(group) from None


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first exception in a (nested) group that is not itself a group."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


async def agent_control(vm: MicroVm, request: wire.ControlRequest) -> wire.Reply:
    """One control round trip with the agent of a running VM, over a fresh vsock stream."""
    assert vm.vsock is not None
    stream = await vm.vsock.connect(wire.CONTROL_PORT, timeout=5)
    async with stream:
        return await control_call(stream, request)


async def _wait_for_agent(vm: MicroVm) -> wire.Reply:
    while True:
        try:
            reply = await agent_control(vm, wire.Ping())
        except (ConnectionError, TimeoutError, BackendError, trio.BrokenResourceError):
            await trio.sleep(PING_INTERVAL)
            continue
        if reply.ok:
            return reply
        await trio.sleep(PING_INTERVAL)


async def _drive(
    vm: MicroVm, template: Template, console: GuestConsole, work: Path, log: BuildLog
) -> str:
    finished = False
    envd_version = ""

    async def run_guest() -> None:
        await vm.run()
        if not finished:
            report = "\n".join(vm.crash_report())
            raise BuildError(f"the guest stopped during the build\n{report}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_guest)
        waiting_for = "the agent's answer"
        try:
            with trio.fail_after(BOOT_TIMEOUT):
                reply = await _wait_for_agent(vm)
                envd_version = reply.envd_version or ""
                log.step(f"agent answered (envd {envd_version or 'unknown'})")
                # init announces readiness at once without a probe; the code interpreter's
                # health check is a probe too, so wait whatever the template's own settings
                waiting_for = "init's readiness probe to pass (see /etc/cube/init.json)"
                while not console.ready:
                    await trio.sleep(PING_INTERVAL)
                log.step("guest ready")
                waiting_for = "the agent to prepare"
                prepared = await agent_control(vm, wire.Prepare())
                if not prepared.ok:
                    raise BuildError(f"the agent could not prepare: {prepared.error}")
        except trio.TooSlowError:
            vm.pause()  # a hung guest: its vCPUs' state says where
            report = "\n".join(vm.crash_report())
            raise BuildError(f"waited {BOOT_TIMEOUT:.0f} s for {waiting_for}\n{report}") from None
        vm.pause()
        vm.save_snapshot(Path(template.snapshot), work)
        finished = True
        log.step(f"snapshot saved to {template.snapshot}")
        vm.request_stop()
    return envd_version


def missing_in_lab(spec: BuildSpec) -> str | None:
    """What the host must build before a lab run can build `spec` (L1 has no compiler, no
    debootstrap and no network), as a message; None when the guest kernel and rootfs are
    cached."""
    if find_kernel() is None:
        return "no guest kernel in the cache: run `make kernel` on the host"
    if not artifacts.is_built(ROOTFS_KIND, rootfs_key(spec)):
        return f"template rootfs for {spec.name!r} not cached: build it with --rootfs-only"
    return None


def default_specs() -> list[BuildSpec]:
    """The templates the E2B SDKs ask for by name."""
    return [
        BuildSpec(name="base"),
        BuildSpec(name="code-interpreter-v1", interpreter=True),
    ]


def build_defaults(store: TemplateStore, rootfs_only: bool = False) -> None:
    """Build the default templates, skipping any that is ready and built from the same inputs."""
    for spec in default_specs():
        if not rootfs_only and is_up_to_date(store, spec):
            print(f"template {spec.name} is up to date", file=sys.stderr)
            continue
        build_template(spec, store, rootfs_only=rootfs_only)


def is_up_to_date(store: TemplateStore, spec: BuildSpec) -> bool:
    try:
        template = store.get(spec.name)
    except TemplateError:
        return False
    return template.status == "ready" and template.inputs == template_key(spec)

"""`cube doctor`: can `cube serve` run on this machine, and if not, what to do about it.

Each check is a small function returning one `Check` with a fix hint, so a failure reads as an
instruction rather than a stack trace. The KVM checks share one open /dev/kvm; when it cannot be
opened they stop there, giving one clear failure instead of a cascade. KVM's flavour is measured
(`cube.vmm.probe`), not inferred from module names: a PVM host passes every API check but still
cannot boot a standard Linux guest.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import typer

from cube.guestkernel import find_kernel
from cube.paths import data_dir
from cube.vmm import probe
from cube.vmm.kvm import Kvm, KvmError, lib

Status = Literal["ok", "warn", "fail"]
KvmFlavour = Literal["hardware", "pvm", "emulated", "absent"]

# The capabilities the VMM relies on for boot, devices and snapshots (Firecracker requires the
# same set; shared/docs/vmm-facts.md §2.1). The irqchip is checked by creating one.
REQUIRED_CAPS = (
    "USER_MEMORY",
    "SET_TSS_ADDR",
    "EXT_CPUID",
    "IRQFD",
    "IOEVENTFD",
    "PIT2",
    "PIT_STATE2",
    "ADJUST_CLOCK",
    "MP_STATE",
    "VCPU_EVENTS",
    "DEBUGREGS",
    "XSAVE",
    "XCRS",
)
TCX_KERNEL = (6, 6)  # first kernel with TCX links for tc BPF programs
DISK_WARN = 10 << 30
DISK_FAIL = 1 << 30
LAB_HINT = (
    "standard Linux guests cannot run here: use `make serve`, which runs cube serve in the "
    "nested lab (`cube lab serve`), or a host with VT-x/AMD-V"
)


class Check(msgspec.Struct):
    name: str
    status: Status
    detail: str
    fix: str = ""


class Report(msgspec.Struct):
    ok: bool  # every check passed
    serving_possible: bool  # no check failed (warnings allowed)
    kvm: KvmFlavour
    checks: list[Check]


def make_report(kvm: KvmFlavour, checks: list[Check]) -> Report:
    return Report(
        ok=all(c.status == "ok" for c in checks),
        serving_possible=all(c.status != "fail" for c in checks),
        kvm=kvm,
        checks=checks,
    )


def kvm_checks(device: str = "/dev/kvm") -> tuple[KvmFlavour, list[Check]]:
    try:
        kvm = Kvm(device)
    except OSError as e:
        return "absent", [device_check(device, e)]
    with kvm:
        flavour, speed = flavour_check()
        return flavour, [
            Check(device, "ok", "present, open for read and write"),
            api_version_check(kvm),
            speed,
            irqchip_check(kvm),
            capabilities_check(kvm),
        ]


def device_check(device: str, error: OSError) -> Check:
    if error.errno in (errno.EACCES, errno.EPERM):
        fix = "run as root, or join the kvm group: `sudo usermod -aG kvm $USER` and log in again"
    else:
        fix = (
            "load kvm_intel or kvm_amd, enable VT-x/AMD-V in the firmware, "
            "or use `make serve` (the nested lab)"
        )
    return Check(device, "fail", f"cannot open: {error.strerror}", fix)


def api_version_check(kvm: Kvm) -> Check:
    version = kvm.api_version()
    if version == lib.KVM_API_VERSION:
        return Check("KVM API", "ok", f"version {version}")
    return Check(
        "KVM API",
        "fail",
        f"version {version}, expected {lib.KVM_API_VERSION}",
        "use a stock Linux host kernel",
    )


def flavour_check() -> tuple[KvmFlavour, Check]:
    fallback: KvmFlavour = "pvm" if probe.pvm_loaded() else "emulated"
    try:
        result = probe.measure_cpl0_rate()
    except (KvmError, RuntimeError) as e:
        return fallback, Check("KVM flavour", "fail", f"the probe VM failed: {e}", LAB_HINT)
    rate = f"{result.rate / 1e6:.1f} M instr/s"
    flavour = probe.flavour(result.rate)
    if flavour == "hardware":
        return flavour, Check("KVM flavour", "ok", f"hardware-style: CPL0 code runs at {rate}")
    ext = probe.cpu_virt_extension()
    cpu = f"CPU flag {ext} present" if ext else "no vmx/svm in /proc/cpuinfo"
    what = "PVM (kvm_pvm)" if flavour == "pvm" else "emulated"
    return flavour, Check(
        "KVM flavour", "fail", f"{what}: guest CPL0 code is emulated at {rate}; {cpu}", LAB_HINT
    )


def irqchip_check(kvm: Kvm) -> Check:
    try:
        with kvm.create_vm() as vm:
            vm.create_irqchip()
    except KvmError as e:
        return Check("irqchip", "fail", str(e), "use a host kernel with in-kernel irqchip support")
    return Check("irqchip", "ok", "in-kernel PIC, IOAPIC and LAPIC")


def capabilities_check(kvm: Kvm) -> Check:
    missing = [c for c in REQUIRED_CAPS if not kvm.check_extension(getattr(lib, f"KVM_CAP_{c}"))]
    if missing:
        return Check(
            "KVM capabilities",
            "fail",
            "missing: " + ", ".join(missing),
            "use a stock x86-64 host kernel (any Linux >= 5.10 has all of them)",
        )
    return Check("KVM capabilities", "ok", f"all {len(REQUIRED_CAPS)} the VMM needs")


def tun_check(device: str = "/dev/net/tun") -> Check:
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        return Check(device, "fail", "missing", "`modprobe tun`")
    except OSError as e:
        return Check(device, "fail", f"cannot open: {e.strerror}", "run cube serve as root")
    return Check(device, "ok", "taps can be created")


SYS_BPF = 321  # x86-64
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2
BPF_ATTR_SIZE = 128  # more than the map-create fields; the kernel accepts a zeroed tail


def bpf_check() -> Check:
    """Create and drop a one-entry array map: the cheapest call that needs the same rights
    (root or CAP_BPF) and kernel support as loading the egress programs."""
    # union bpf_attr, map-create member: map_type, key_size, value_size, max_entries, map_flags
    attr = ctypes.create_string_buffer(
        struct.pack("=5I", BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0), BPF_ATTR_SIZE
    )
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(
        ctypes.c_long(SYS_BPF), ctypes.c_long(BPF_MAP_CREATE), attr, ctypes.c_long(BPF_ATTR_SIZE)
    )
    if fd < 0:
        code = ctypes.get_errno()
        return Check(
            "bpf()",
            "fail",
            f"map create failed: {os.strerror(code)}",
            "run cube serve as root (or with CAP_BPF and CAP_NET_ADMIN)",
        )
    os.close(fd)
    return Check("bpf()", "ok", "BPF maps can be created")


def tc_check(release: str, tc: str | None) -> Check:
    """TCX on kernels that have it; older ones need a clsact qdisc, set up with `tc`."""
    version = kernel_version(release)
    if version >= TCX_KERNEL:
        detail = f"kernel {release}: TCX attach"
        return Check(
            "tc/TCX",
            "ok" if tc else "warn",
            detail if tc else f"{detail}; no `tc`",
            "" if tc else "`apt-get install iproute2` (for inspecting filters)",
        )
    if tc:
        return Check("tc/TCX", "ok", f"kernel {release}: clsact qdisc via {tc}")
    return Check(
        "tc/TCX",
        "fail",
        f"kernel {release} has no TCX and `tc` is missing",
        "`apt-get install iproute2`",
    )


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a `uname -r` string such as 6.18.44-fc-v657 or 6.6-rc1."""
    found = re.match(r"(\d+)\.(\d+)", release)
    if not found:
        raise ValueError(f"unexpected kernel release {release!r}")
    return int(found[1]), int(found[2])


def cgroup_check(root: Path = Path("/sys/fs/cgroup")) -> Check:
    """A warning, not a failure: every sandbox lives inside the daemon's own process, so serving
    works without cgroups; only per-sandbox host resource limits need cgroup v2."""
    controllers = root / "cgroup.controllers"
    if not controllers.is_file():
        hybrid = (root / "unified" / "cgroup.controllers").is_file()
        return Check(
            "cgroup v2",
            "warn",
            f"{controllers} missing "
            + ("(hybrid hierarchy: controllers are on v1)" if hybrid else "(v1 or not mounted)"),
            f"boot with systemd.unified_cgroup_hierarchy=1 or mount cgroup2 on {root}",
        )
    return Check("cgroup v2", "ok", "controllers: " + (controllers.read_text().strip() or "none"))


def disk_check(path: Path) -> Check:
    """Free space where templates and snapshots go; measured on the nearest existing parent
    because the data dir is only created on first use."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    detail = f"{free / (1 << 30):.1f} GiB free for {path}"
    fix = f"free space on {existing} or point CUBE_DATA_DIR elsewhere"
    if free < DISK_FAIL:
        return Check("disk space", "fail", detail, fix)
    if free < DISK_WARN:
        return Check("disk space", "warn", detail, fix)
    return Check("disk space", "ok", detail)


def guest_kernel_check() -> Check:
    kernel = find_kernel()
    if kernel is None:
        return Check("guest kernel", "fail", "not built", "`make kernel`")
    return Check("guest kernel", "ok", str(kernel))


def templates_check(data: Path) -> Check:
    folder = data / "templates"
    names = sorted(p.name for p in folder.glob("*/")) if folder.is_dir() else []
    if not names:
        return Check("templates", "warn", "no templates built yet", f"they go in {folder}")
    return Check("templates", "ok", ", ".join(names))


def run_checks() -> Report:
    flavour, checks = kvm_checks()
    checks += [
        tun_check(),
        bpf_check(),
        tc_check(os.uname().release, shutil.which("tc")),
        cgroup_check(),
        disk_check(data_dir()),
        guest_kernel_check(),
        templates_check(data_dir()),
    ]
    return make_report(flavour, checks)


MARKS = {"ok": "✓", "warn": "!", "fail": "✗"}


def render(report: Report) -> str:
    width = max(len(c.name) for c in report.checks)
    lines = []
    for c in report.checks:
        lines.append(f"{MARKS[c.status]} {c.name:<{width}}  {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"  {'':<{width}}  fix: {c.fix}")
    fails = sum(c.status == "fail" for c in report.checks)
    warns = sum(c.status == "warn" for c in report.checks)
    verdict = "cube serve can run here" if report.serving_possible else "cube serve cannot run here"
    plural = "" if warns == 1 else "s"
    lines += ["", f"{verdict} (KVM: {report.kvm}; {fails} failed, {warns} warning{plural})"]
    return "\n".join(lines)


def doctor_command(
    json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check that this machine can run `cube serve`, and say how to fix what is missing."""
    report = run_checks()
    if json:
        typer.echo(msgspec.json.format(msgspec.json.encode(report)).decode())
    else:
        typer.echo(render(report))
    if not report.serving_possible:
        raise typer.Exit(1)

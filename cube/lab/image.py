"""The lab's L1 disk image: a minimal Debian bookworm with KVM, QEMU and Cube's Python dependencies.

The image is built once per set of inputs and cached (see `cube.artifacts`): debootstrap is the
slow part (minutes), and every lab run boots the same pristine image with writes thrown away, so
nothing is lost by sharing it. Cube itself is not in the image; the checkout is shared into L1
at run time, so code changes never force a rebuild. Only its dependencies are, installed from
the host with pip for L1's Python (Debian's 3.11, ABI-compatible with cp311 wheels), because L1
has no network of its own to fetch them.

The artifact folder holds the ext4 image plus the kernel and initrd as separate files, which QEMU
loads directly (-kernel/-initrd) so no boot loader is needed. The kernel is kept uncompressed:
QEMU boots an ELF vmlinux through its PVH entry (Debian's kernel has CONFIG_PVH), which skips the
bzImage's self-decompression, ~5 s of every boot under TCG.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from cube import artifacts
from cube.paths import CHECKOUT_DIR

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# L1's kernel, a lab candidate (issue 12): bookworm's own 6.1, or 6.12 from bookworm-backports.
# With QEMU 7.2's TCG, 6.1's nested KVM has livelocked delivering L2 timer interrupts and 6.12
# has oopsed on an int3 left by cross-CPU text patching; the soak compares them.
L1_KERNELS = {"6.1": SUITE, "6.12": f"{SUITE}-backports"}
L1_KERNEL_ENV = "CUBE_LAB_L1_KERNEL"
DEFAULT_L1_KERNEL = "6.1"
KERNEL_PACKAGE = "linux-image-amd64"
PACKAGES = (
    "python3",
    "iproute2",
    "kmod",
    # the initramfs generator needs udev; without it the initrd cannot find the root disk
    "udev",
    # lab tests boot the guest kernel with QEMU -M microvm inside L1 as a peer to our VMM
    "qemu-system-x86",
    "procps",
    "e2fsprogs",
    # sandbox networking (NAT, egress rules) is tested inside L1; the egress classifier is
    # compiled there by L1's own clang, as on any Cube host (cube/net/build.py)
    "nftables",
    "iptables",
    "clang",
    "libbpf-dev",
    # the E2B SDK's HTTP client (reqwest) refuses to start without system CA certificates
    "ca-certificates",
)
# Wheel tags L1 (glibc 2.36) can load, listed because older pips do not widen a --platform to
# the tags below it: the two that binary wheels on PyPI are built for in practice.
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")

INIT_SCRIPT = Path(__file__).with_name("l1-init.sh")
# Where things live inside L1 (the runner points the kernel and PYTHONPATH at them).
INIT_PATH = "/usr/local/sbin/cube-lab-init"
SITE_DIR = "/opt/cube/site"
CUBE_WRAPPER = "/usr/local/bin/cube"

# debootstrap copies these from the build machine; L1 gets its own.
SYSTEM_FILES = {
    "/etc/hostname": "cube-lab\n",
    "/etc/hosts": "127.0.0.1 localhost\n127.0.1.1 cube-lab\n::1 localhost ip6-localhost\n",
    # QEMU's user networking answers DNS here (L1 has a NIC only when ports are forwarded)
    "/etc/resolv.conf": "nameserver 10.0.2.3\n",
}

IMAGE_NAME = "rootfs.ext4"
KERNEL_NAME = "vmlinux"
INITRD_NAME = "initrd.img"
HEADROOM = 1 << 30
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SETUP_HEADER_END = 0x250  # through payload_length

# The initrd only has to find the virtio root disk. Debian's default (MODULES=most) packs ~35 MB
# of drivers that TCG then spends seconds unpacking and probing on every boot.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
# What L1's init loads from the root filesystem: the 9p shares, hardware-style KVM, and tun for
# sandbox taps (L1 has no udev, so nothing else would create /dev/net/tun).
ROOTFS_MODULES = ("9p", "9pnet_virtio", "kvm_amd", "tun")


class ImageError(RuntimeError):
    """The built root filesystem lacks something L1 needs."""


def python_requirements(pyproject: Path = CHECKOUT_DIR / "pyproject.toml") -> list[str]:
    """Cube's runtime and test requirements, as written in pyproject (lab tests run pytest)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *project.get("optional-dependencies", {}).get("test", [])]


def l1_kernel() -> str:
    """The L1 kernel chosen by CUBE_LAB_L1_KERNEL (a key of L1_KERNELS)."""
    version = os.environ.get(L1_KERNEL_ENV, DEFAULT_L1_KERNEL)
    if version not in L1_KERNELS:
        raise ImageError(f"{L1_KERNEL_ENV}={version!r}: choose one of {', '.join(L1_KERNELS)}")
    return version


def image_key(kernel: str = DEFAULT_L1_KERNEL) -> str:
    return artifacts.digest(
        [Path(__file__), INIT_SCRIPT, SUITE, L1_KERNELS[kernel], " ".join(PACKAGES),
         *python_requirements()]
    )  # fmt: skip


def build_image() -> Path:
    """The artifact folder holding IMAGE_NAME, KERNEL_NAME and INITRD_NAME, built if missing."""
    kernel = l1_kernel()
    return artifacts.ensure_built("lab-image", image_key(kernel), partial(_build, kernel=kernel))


def _build(out: Path, kernel: str) -> None:
    rootfs = out / "rootfs"
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(rootfs),
            MIRROR,
        ]
    )
    _install_kernel(rootfs, L1_KERNELS[kernel])
    drop_apt_caches(rootfs)
    _install_python_deps(rootfs)
    for path, text in SYSTEM_FILES.items():
        _install_file(rootfs, path, text, 0o644)
    _install_file(rootfs, INIT_PATH, INIT_SCRIPT.read_text(), 0o755)
    _install_file(rootfs, CUBE_WRAPPER, '#!/bin/sh\nexec python3 -m cube "$@"\n', 0o755)
    kernel, initrd = _boot_files(rootfs)
    version = kernel.name.removeprefix("vmlinuz-")
    _slim_initrd(rootfs, version)
    _check_modules(rootfs, version, initrd)
    (out / KERNEL_NAME).write_bytes(extract_vmlinux(kernel.read_bytes()))
    shutil.copy2(initrd, out / INITRD_NAME)
    _make_ext4(rootfs, out / IMAGE_NAME)
    shutil.rmtree(rootfs)


def _run(argv: list[str]) -> None:
    """Run a build step with its output streamed to ours, so a slow build shows progress."""
    print(f"cube lab build: {' '.join(argv)}", file=sys.stderr, flush=True)
    subprocess.run(argv, check=True)


def _install_kernel(rootfs: Path, suite: str) -> None:
    """KERNEL_PACKAGE from `suite`, by L1's own apt (its postinst builds the initrd)."""
    sources = rootfs / "etc/apt/sources.list.d/cube-lab-kernel.list"
    sources.write_text(f"deb {MIRROR} {suite} main\n")
    _run(["chroot", str(rootfs), "apt-get", "update", "-q"])
    _run(["chroot", str(rootfs), "apt-get", "install", "-q", "-y", "--no-install-recommends",
          "-t", suite, KERNEL_PACKAGE])  # fmt: skip
    sources.unlink()


def drop_apt_caches(rootfs: Path) -> None:
    """debootstrap leaves the .debs and package lists (~200 MB); L1 has no apt source anyway."""
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / folder).iterdir():
            if path.is_file():
                path.unlink()


def _install_python_deps(rootfs: Path) -> None:
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--target",
            str(rootfs / SITE_DIR.lstrip("/")),
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            *(arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)),
            "--only-binary=:all:",
            *python_requirements(),
        ]
    )


def _install_file(rootfs: Path, path: str, text: str, mode: int) -> None:
    target = rootfs / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    target.write_text(text)
    target.chmod(mode)


def _boot_files(rootfs: Path) -> tuple[Path, Path]:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"expected one kernel in {rootfs}/boot, found {kernels}")
    initrd = rootfs / "boot" / kernels[0].name.replace("vmlinuz-", "initrd.img-", 1)
    if not initrd.is_file():
        raise ImageError(f"no initrd {initrd} for {kernels[0].name}")
    return kernels[0], initrd


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The kernel ELF inside a bzImage: its compressed payload, found by the boot protocol's
    setup header (the kernel's Documentation/arch/x86/boot.rst: setup_sects, payload_offset,
    payload_length), in xz (Debian's 6.1) or zstd (its 6.12). The payload ends with the
    4-byte decompressed size, which is not part of the stream."""
    if len(bzimage) < SETUP_HEADER_END or bzimage[0x202:0x206] != b"HdrS":
        raise ImageError("not a bzImage (no setup header)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length - 4]
    if payload.startswith(XZ_MAGIC):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(ZSTD_MAGIC):
        elf = subprocess.run(["zstd", "-d", "-c", "-q"], input=payload, capture_output=True,
                             check=True).stdout  # fmt: skip
    else:
        raise ImageError(f"the bzImage's payload is neither xz nor zstd ({payload[:4].hex()})")
    if not elf.startswith(b"\x7fELF"):
        raise ImageError("the bzImage's payload is not an ELF kernel")
    return elf


def _slim_initrd(rootfs: Path, version: str) -> None:
    config = rootfs / "etc" / "initramfs-tools"
    (config / "conf.d" / "cube-lab.conf").write_text("MODULES=list\n")
    with open(config / "modules", "a") as modules:
        modules.write("".join(f"{name}\n" for name in INITRD_MODULES))
    _run(["chroot", str(rootfs), "update-initramfs", "-u", "-k", version])


def module_names(paths: Iterable[str]) -> set[str]:
    """Module names (dashes as underscores, as modprobe treats them) from paths to .ko files."""
    names = set()
    for path in paths:
        match = re.search(r"([^/\s:]+)\.ko(\.[a-z]+)?\b", path)
        if match:
            names.add(match.group(1).replace("-", "_"))
    return names


def _check_modules(rootfs: Path, version: str, initrd: Path) -> None:
    moddir = rootfs / "lib" / "modules" / version
    builtin = module_names((moddir / "modules.builtin").read_text().splitlines())
    available = builtin | module_names((moddir / "modules.dep").read_text().splitlines())
    listing = subprocess.run(
        ["chroot", str(rootfs), "lsinitramfs", f"/boot/{initrd.name}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    in_initrd = builtin | module_names(listing)
    missing = [m for m in INITRD_MODULES if m not in in_initrd]
    missing += [m for m in ROOTFS_MODULES if m not in available]
    if missing:
        raise ImageError(f"kernel {version} lacks modules L1 needs: {', '.join(missing)}")


def _make_ext4(rootfs: Path, image: Path) -> None:
    """An ext4 image of the tree, sized by its allocated blocks plus room for L1's own writes."""
    du = subprocess.run(
        ["du", "-s", "--block-size=1", str(rootfs)], check=True, capture_output=True, text=True
    )
    with open(image, "wb") as f:
        f.truncate(int(du.stdout.split()[0]) + HEADROOM)
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "cube-lab", "-d", str(rootfs), str(image)])

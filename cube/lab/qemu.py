"""The outer QEMU, which runs L1 under TCG: the host's own, or Debian 13's from a cached root.

Issue 12 suspects the host QEMU (Debian 12's 7.2) of part of the lab's trouble, and asks that
the candidates be compared on a soak. Debian 13's QEMU (10.x) cannot be installed beside
bookworm's libc, but it runs on a Debian 12 host from a Debian 13 root made with debootstrap,
through that root's own dynamic loader and libraries, with no chroot, so host paths (the image,
the shares, the run folder) mean the same to it (shared/docs/kvm-here.md). The root is built
once and cached like the lab image. On a Debian 13 host the host's own QEMU is that version.

`CUBE_LAB_QEMU` chooses: `host` (the host's `qemu-system-x86_64`) or `debian13`. Without it,
the lab runs QEMU 10 or newer: the host's if it is that new (Debian 13), else Debian 13's. The
soak chose it (README, "Lab candidates and the soak"): under the host's 7.2, L1 panicked with
a kernel stack overflow in its page-fault path while a vCPU of ours was in KVM_RUN; under 10
it did not, with the same L1 and the same work.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cube import artifacts
from cube.lab.image import drop_apt_caches

CHOICES = ("host", "debian13")
ENV = "CUBE_LAB_QEMU"
MIN_VERSION = 10
SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
BINARY = "qemu-system-x86_64"
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
FIRMWARE_DIRS = ("usr/share/qemu", "usr/share/seabios")  # -L: option ROMs, the BIOS


class QemuChoiceError(ValueError):
    """CUBE_LAB_QEMU names no known QEMU."""


@dataclass(frozen=True)
class OuterQemu:
    """How to start the outer QEMU: the argv before QEMU's own options."""

    name: str
    argv: tuple[str, ...] = (BINARY,)


def host_version() -> int:
    """The host QEMU's major version (0 when it cannot tell)."""
    try:
        out = subprocess.run([BINARY, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return 0
    match = re.search(r"version (\d+)\.", out.stdout)
    return int(match.group(1)) if match else 0


def chosen() -> str:
    default = "host" if host_version() >= MIN_VERSION else "debian13"
    choice = os.environ.get(ENV, default)
    if choice not in CHOICES:
        raise QemuChoiceError(f"{ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    return choice


def outer_qemu(choice: str | None = None) -> OuterQemu:
    """The QEMU to run L1 with (building Debian 13's root first if it is chosen and missing)."""
    choice = choice or chosen()
    if choice == "host":
        return OuterQemu("host")
    root = artifacts.ensure_built("lab-qemu", _key(), _build) / "root"
    return in_root(root)


def in_root(root: Path) -> OuterQemu:
    """QEMU from the Debian root at `root`, run by that root's loader with its libraries."""
    library_path = ":".join(str(root / d) for d in LIB_DIRS)
    argv = ["env", f"QEMU_MODULE_DIR={root / 'usr/lib/x86_64-linux-gnu/qemu'}",
            str(root / "lib64/ld-linux-x86-64.so.2"), "--library-path", library_path,
            str(root / "usr/bin" / BINARY)]  # fmt: skip
    for folder in FIRMWARE_DIRS:
        argv += ["-L", str(root / folder)]
    return OuterQemu(f"debian13 ({root})", tuple(argv))


def _key() -> str:
    return artifacts.digest([Path(__file__), SUITE, BINARY])


def _build(out: Path) -> None:
    argv = ["debootstrap", "--variant=minbase", "--include=qemu-system-x86", SUITE,
            str(out / "root"), MIRROR]  # fmt: skip
    print(f"cube lab: {' '.join(argv)}", file=sys.stderr, flush=True)
    subprocess.run(argv, check=True)
    drop_apt_caches(out / "root")

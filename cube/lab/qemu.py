"""The outer QEMU, which runs L1 under TCG: the host's own, or Debian 13's from a cached root.

Issue 12 suspects the host QEMU (Debian 12's 7.2) of part of the lab's trouble, and asks that
the candidates be compared on a soak. Debian 13's QEMU (10.x) cannot be installed beside
bookworm's libc, but it runs on a Debian 12 host from a Debian 13 root made with debootstrap,
through that root's own dynamic loader and libraries, with no chroot, so host paths (the image,
the shares, the run folder) mean the same to it (shared/docs/kvm-here.md). The root is built
once and cached like the lab image. On a Debian 13 host the host's own QEMU is that version.

`CUBE_LAB_QEMU` chooses: `host` (the host's `qemu-system-x86_64`) or `debian13`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cube import artifacts
from cube.lab.image import drop_apt_caches

CHOICES = ("host", "debian13")
DEFAULT = "host"
ENV = "CUBE_LAB_QEMU"
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


def chosen() -> str:
    choice = os.environ.get(ENV, DEFAULT)
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

"""Host-built artifacts for the lab tests: the guest kernel and a marker initramfs.

The lab's L1 guest has neither gcc nor the kernel source, so the host builds both before the lab
starts (`python -m tests.lab.artifacts`, run by `make test-lab`) and L1 finds them in the shared
cache by the same keys. The initramfs holds only /dev, /dev/console and the static marker init
(tests/guest/marker_init.c): enough to prove the kernel reaches user space and can end the VM.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cube.artifacts import artifact_dir, digest, ensure_built
from cube.guestkernel import build_kernel

MARKER = "CUBE-GUEST-INIT-OK"

# newc cpio mode bits (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst)
_DIR = 0o040000
_REG = 0o100000
_CHR = 0o020000


def _cpio_entry(
    ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
) -> bytes:
    """One newc record: header, NUL-terminated name and data, each padded to 4 bytes.

    Fields are fixed (uid/gid 0, mtime 0) so the archive depends only on its contents.
    """
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def make_cpio(init: bytes) -> bytes:
    """An uncompressed newc archive with /dev, /dev/console (char 5:1) and an executable /init.

    The kernel opens /dev/console on the initramfs before it runs /init; without the node, init
    starts with no stdin/stdout/stderr.
    """
    return b"".join(
        [
            _cpio_entry(1, "dev", _DIR | 0o755),
            _cpio_entry(2, "dev/console", _CHR | 0o600, rdev=(5, 1)),
            _cpio_entry(3, "init", _REG | 0o755, init),
            _cpio_entry(0, "TRAILER!!!", 0),
        ]
    )


GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
MARKER_INIT_SRC = GUEST_DIR / "marker_init.c"
VMM_TEST_INIT_SRC = GUEST_DIR / "vmm_test_init.c"


def _initramfs_key(source: Path) -> str:
    return digest([source, Path(__file__).resolve()])


def _build_initramfs(source: Path) -> Path:
    """Compile a static init (so the archive needs no libc) and pack it; cached by source."""

    def build(out: Path) -> None:
        binary = out / "init"
        subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary), str(source)], check=True)
        (out / "init.cpio").write_bytes(make_cpio(binary.read_bytes()))
        binary.unlink()

    return ensure_built("test-initramfs", _initramfs_key(source), build) / "init.cpio"


def _find_initramfs(source: Path) -> Path | None:
    """The cached initramfs, or None; needs no compiler, so it works inside L1."""
    cpio = artifact_dir("test-initramfs", _initramfs_key(source)) / "init.cpio"
    return cpio if cpio.is_file() else None


def build_test_initramfs() -> Path:
    """The marker init: proves the kernel reaches user space, then ends the VM."""
    return _build_initramfs(MARKER_INIT_SRC)


def find_test_initramfs() -> Path | None:
    return _find_initramfs(MARKER_INIT_SRC)


def build_vmm_test_initramfs() -> Path:
    """The VMM test init: checks the disk and serves commands over vsock."""
    return _build_initramfs(VMM_TEST_INIT_SRC)


def find_vmm_test_initramfs() -> Path | None:
    return _find_initramfs(VMM_TEST_INIT_SRC)


def main() -> None:
    print(f"guest kernel: {build_kernel()}")
    print(f"test initramfs: {build_test_initramfs()}")
    print(f"VMM test initramfs: {build_vmm_test_initramfs()}")


if __name__ == "__main__":
    main()

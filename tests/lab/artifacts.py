"""Host-built artifacts for the lab tests: the guest kernel and the VMM test initramfs.

The lab's L1 guest has neither gcc nor the kernel source, so the host builds both before the lab
starts (`python -m tests.lab.artifacts`, run by `make test-lab`) and L1 finds them in the shared
cache by the same keys. The initramfs holds /dev, /dev/console and the static init compiled from
tests/guest/vmm_test_init.c, packed by the product's cpio writer (cube.bench.initramfs, which also
makes the compiler-free marker initramfs of the boot test and `cube bench vmm --boot`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cube.artifacts import artifact_dir, digest, ensure_built
from cube.bench import initramfs
from cube.guestkernel import build_kernel

VMM_TEST_INIT_SRC = Path(__file__).resolve().parent.parent / "guest" / "vmm_test_init.c"


def _vmm_test_initramfs_key() -> str:
    """Follows the init's source, this file (the gcc flags) and the cpio writer."""
    return digest([VMM_TEST_INIT_SRC, Path(__file__).resolve(), Path(initramfs.__file__).resolve()])


def build_vmm_test_initramfs() -> Path:
    """The VMM test init (checks the disk, serves commands over vsock), compiled static (so the
    archive needs no libc) and packed; cached by its key."""

    def build(out: Path) -> None:
        binary = out / "init"
        subprocess.run(
            ["gcc", "-static", "-Os", "-s", "-o", str(binary), str(VMM_TEST_INIT_SRC)], check=True
        )
        (out / "init.cpio").write_bytes(initramfs.make_cpio(binary.read_bytes()))
        binary.unlink()

    return ensure_built("test-initramfs", _vmm_test_initramfs_key(), build) / "init.cpio"


def find_vmm_test_initramfs() -> Path | None:
    """The cached initramfs, or None; needs no compiler, so it works inside L1."""
    cpio = artifact_dir("test-initramfs", _vmm_test_initramfs_key()) / "init.cpio"
    return cpio if cpio.is_file() else None


def main() -> None:
    print(f"guest kernel: {build_kernel()}")
    print(f"VMM test initramfs: {build_vmm_test_initramfs()}")


if __name__ == "__main__":
    main()

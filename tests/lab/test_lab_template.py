"""A Debian template built, booted and snapshotted by our VMM, then restored (inside the lab).

The root filesystem needs debootstrap and the network, which L1 has neither of, and copying a
Debian tree through 9p under TCG takes over ten minutes, so the host builds the whole rootfs
first (`python -m tests.lab.test_lab_template`, or `cube template build-defaults --rootfs-only`:
the spec below makes the same rootfs as the default `base` template, whose key covers the guest
code: rebuild after changing it). L1 finds it in the shared cache by its key, boots it, waits
for the agent over vsock and snapshots it; the test then restores the snapshot and pings the
clone's agent.

The template store lives in the shared cache folder, beside the cached rootfs, so the template's
base disk is a hard link rather than a gigabyte copied through 9p.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import trio

from cube.guest import wire
from cube.guestkernel import build_kernel
from cube.net import tap
from cube.paths import cache_dir
from cube.pool.buildlog import BuildLog
from cube.pool.rootfs_cache import BuildSpec, build_rootfs
from cube.pool.template import TemplateStore
from cube.pool.template_build import agent_control, build_template, missing_in_lab
from cube.vmm.vm import MicroVm

pytestmark = pytest.mark.lab

SPEC = BuildSpec(name="lab-base", cpus=1, memory_mb=512)
RESTORE_TIMEOUT = 120


@pytest.fixture
def store() -> TemplateStore:
    missing = missing_in_lab(SPEC)
    if missing:
        pytest.fail(f"{missing} (`python -m tests.lab.test_lab_template` does it)")
    root = cache_dir() / "lab-template-test"
    shutil.rmtree(root, ignore_errors=True)
    yield TemplateStore(root)
    shutil.rmtree(root, ignore_errors=True)


def test_build_boot_snapshot_restore(store: TemplateStore, tmp_path: Path) -> None:
    started = time.monotonic()
    template = build_template(SPEC, store)
    assert template is not None
    print(f"\ntemplate boot + snapshot: {time.monotonic() - started:.1f} s (lab, TCG)")
    assert template.status == "ready"
    assert template.envd_version
    assert (Path(template.snapshot) / "state").is_file()
    assert store.get(template.id).status == "ready"

    replies: list[wire.Reply] = []
    with tap.unconnected() as net:  # the template has a network device: a clone needs a tap
        clone = MicroVm.restore(Path(template.snapshot), tmp_path, net_tap=net)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(clone.run)
                restored = time.monotonic()
                with trio.fail_after(RESTORE_TIMEOUT):
                    replies.append(await agent_control(clone, wire.Ping()))
                print(f"restore -> first agent answer: {time.monotonic() - restored:.3f} s")
                clone.request_stop()

        try:
            trio.run(main)
        finally:
            clone.close()
    assert replies[0].ok, clone.console_tail()
    assert replies[0].envd_version == template.envd_version


def main() -> None:
    """Host side: the guest kernel and the template rootfs L1 will look for."""
    print(f"guest kernel: {build_kernel()}")
    with BuildLog(None) as log:
        print(f"template rootfs: {build_rootfs(SPEC, log)}")


if __name__ == "__main__":
    main()

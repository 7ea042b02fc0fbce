"""What a crashed `cube serve` leaves in its data dir, and who may clean it up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

from cube import data_lock
from cube.pool.vmm_backend import VmmBackend


def test_a_data_dir_serves_one_daemon_at_a_time(tmp_path: Path) -> None:
    with data_lock.exclusive(tmp_path):
        holder = (tmp_path / data_lock.LOCK_FILE).read_text().strip()
        assert holder == str(os.getpid())
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from cube.data_lock import exclusive; "
             "exclusive(Path(sys.argv[1])).__enter__()", str(tmp_path)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert other.returncode != 0
        assert f"another cube serve (pid {holder}) uses {tmp_path}" in other.stderr
    with data_lock.exclusive(tmp_path):  # released on exit (and by the kernel on any death)
        pass


def test_vm_work_folders_of_a_crashed_daemon_go_and_fork_snapshots_stay(tmp_path: Path) -> None:
    work = tmp_path / "vms"
    for name in ("k3x9v0a1b2c3", "fork-q8w7e6r5t4y3"):
        (work / name).mkdir(parents=True)
        (work / name / "disk0.overlay").write_bytes(b"\0" * 4096)

    async def start_and_stop() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(VmmBackend(work).run)
            nursery.cancel_scope.cancel()

    trio.run(start_and_stop)
    assert sorted(p.name for p in work.iterdir()) == ["fork-q8w7e6r5t4y3"]

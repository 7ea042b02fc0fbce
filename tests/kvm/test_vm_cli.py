"""`cube vm snapshot` and `cube vm restore` by hand, with the tiny bench guest as the kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cube.bench.guest import FLAG_ADDR, make_vmlinux
from cube.cli import app
from cube.vmm import snapshot

pytestmark = pytest.mark.kvm


def test_snapshot_then_restore_continues_the_guest(tmp_path: Path) -> None:
    kernel, snap = tmp_path / "vmlinux", tmp_path / "snap"
    kernel.write_bytes(make_vmlinux())
    runner = CliRunner()
    took = runner.invoke(app, ["vm", "snapshot", "--kernel", str(kernel), "--to", str(snap),
                               "--when", "r"])  # fmt: skip
    assert took.exit_code == 0, took.output
    assert snapshot.read_state(snap).memory_size > FLAG_ADDR
    # The guest waits for its flag byte; set it in the saved memory, as a debugging user might.
    fd = os.open(snap / snapshot.MEMORY_FILE, os.O_WRONLY)
    try:
        os.pwrite(fd, b"!", FLAG_ADDR)
    finally:
        os.close(fd)
    restored = runner.invoke(app, ["vm", "restore", str(snap)])
    assert restored.exit_code == 0, restored.output
    assert "!" in restored.output  # printed by the restored guest, not the original
    assert "guest stopped (reset" in restored.output


def test_snapshot_refuses_an_existing_folder_and_needs_a_moment(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_vmlinux())
    runner = CliRunner()
    exists = runner.invoke(app, ["vm", "snapshot", "--kernel", str(kernel), "--to", str(tmp_path)])
    assert exists.exit_code == 2 and "already exists" in exists.output
    unsaid = runner.invoke(app, ["vm", "snapshot", "--kernel", str(kernel), "--to",
                                 str(tmp_path / "s")])  # fmt: skip
    assert unsaid.exit_code == 2 and "say when" in unsaid.output


def test_restore_of_a_damaged_snapshot_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "state").write_bytes(b"not a snapshot")
    result = CliRunner().invoke(app, ["vm", "restore", str(tmp_path / "snap")])
    assert result.exit_code == 2 and "cannot build the VM" in result.output

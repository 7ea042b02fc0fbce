"""`cube bench vmm --boot / --template` without KVM: refusals, the QEMU side against a stand-in
process, the rounds' order and warm-up, the template lookup and the tap the backend borrows.

The VMs themselves run in the lab (`cube bench vmm --boot` there, and tests/lab/test_lab_kernel);
nothing here asserts how long anything takes.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from typer.testing import CliRunner

from cube.bench import vmm_lab
from cube.bench.cli import bench_app
from cube.bench.initramfs import MARKER
from cube.pool.backend import BackendError, Image, Resources
from cube.pool.template import TemplateStore

FIELDS = {"source": "debian", "cpus": 1, "memory_mb": 512}


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `qemu-system-x86_64` first on PATH: a shell script the test writes the body of."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    return folder / vmm_lab.QEMU


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_qemu_boot_is_timed_to_the_marker_and_to_the_exit(fake_qemu: Path) -> None:
    _script(fake_qemu, f"echo booting; sleep 0.2; echo {MARKER}; sleep 0.2")
    boot = vmm_lab.boot_qemu(Path("/k/vmlinux"), Path("/i/marker.cpio"), 256)
    assert 150 < boot.marker_ms < boot.end_ms
    assert boot.end_ms - boot.marker_ms > 150


def test_a_qemu_boot_without_the_marker_fails_quoting_the_console(fake_qemu: Path) -> None:
    _script(fake_qemu, "echo 'Kernel panic - not syncing'; exit 0")
    with pytest.raises(vmm_lab.BootFailed, match=r"(?s)without the marker.*Kernel panic"):
        vmm_lab.boot_qemu(Path("/k/vmlinux"), Path("/i/marker.cpio"), 256)


def test_qemu_gets_the_same_kernel_initramfs_and_memory() -> None:
    argv = vmm_lab.qemu_argv(Path("/k/vmlinux"), Path("/i/marker.cpio"), 320)
    assert argv[:3] == [vmm_lab.QEMU, "-M", "microvm,acpi=off"]
    pairs = dict(itertools.pairwise(argv))
    assert pairs["-kernel"] == "/k/vmlinux" and pairs["-initrd"] == "/i/marker.cpio"
    assert pairs["-m"] == "320M" and pairs["-smp"] == "1"
    assert pairs["-append"].endswith(vmm_lab.BOOT_CMDLINE)
    assert "reboot=t" in pairs["-append"] and "-no-reboot" in argv


def test_boots_alternate_and_the_warm_up_pair_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake(name: str):  # type: ignore[no-untyped-def]
        def boot(kernel: Path, initramfs: Path, memory_mib: int) -> vmm_lab.Boot:
            calls.append(name)
            return vmm_lab.Boot(float(len(calls)), float(len(calls)) + 0.5)

        return boot

    monkeypatch.setattr(vmm_lab, "boot_cube", fake("cube"))
    monkeypatch.setattr(vmm_lab, "boot_qemu", fake("qemu"))
    cube, qemu = vmm_lab.boot_rounds(Path("k"), Path("i"), 256, 3)
    assert calls == ["cube", "qemu", "qemu", "cube", "cube", "qemu", "qemu", "cube"]
    assert [b.marker_ms for b in cube] == [4, 5, 8]
    assert [b.marker_ms for b in qemu] == [3, 6, 7]


def test_boot_refuses_without_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmm_lab.shutil, "which", lambda name: None)
    with pytest.raises(vmm_lab.BenchRefused, match="qemu-system-x86_64 is not installed"):
        vmm_lab.boot_kernel()


def test_boot_refuses_without_a_guest_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmm_lab.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(vmm_lab, "find_kernel", lambda: None)
    with pytest.raises(vmm_lab.BenchRefused, match="cube kernel build"):
        vmm_lab.boot_kernel()


def test_a_pvm_host_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmm_lab.probe, "measure_cpl0_rate", lambda: SimpleNamespace(rate=1.8e6))
    monkeypatch.setattr(vmm_lab.probe, "pvm_loaded", lambda: True)
    result = CliRunner().invoke(bench_app, ["vmm", "--boot", "3"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "cube bench vmm: --boot needs hardware-style KVM, and this host's is pvm (guest kernel "
        "code runs at 1.8 M instr/s): run it in the lab, `cube lab run -- python3 -m cube "
        "bench vmm ...`"
    ]


def _ready(store: TemplateStore, name: str, status: str = "ready") -> None:
    with store.building(name):
        template = store.begin(name, **FIELDS)
    store.update(template, status)  # type: ignore[arg-type]


def test_template_lookup_refuses_unknown_and_unready_ones(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    _ready(store, "base")
    _ready(store, "broken", "error")
    image = vmm_lab.template_image("base", tmp_path)
    assert image.folder == Path(store.get("base").snapshot)
    assert image.resources.memory_mb == 512
    with pytest.raises(vmm_lab.BenchRefused, match="'broken' is error, not ready"):
        vmm_lab.template_image("broken", tmp_path)
    with pytest.raises(vmm_lab.BenchRefused, match="no template named 'nope'"):
        vmm_lab.template_image("nope", tmp_path)


def test_an_unknown_template_is_refused_before_any_measurement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[str] = []
    monkeypatch.setattr(vmm_lab, "require_hardware_kvm", lambda what: None)
    monkeypatch.setattr(vmm_lab, "boot_kernel", lambda: Path("/k/vmlinux"))
    monkeypatch.setattr(vmm_lab, "run_boot", lambda *args: measured.append("boot") or "")
    result = CliRunner().invoke(
        bench_app, ["vmm", "--boot", "1", "--template", "nope", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    assert "cube bench vmm: no template named 'nope'" in result.output
    assert measured == []


IMAGE = Image(
    template_id="t1",
    resources=Resources(cpu_count=1, memory_mb=512, disk_mb=0),
    folder=Path("/t/base/build-1/snapshot"),
    envd_version="0.1.0",
)


def _devices(monkeypatch: pytest.MonkeyPatch, *kinds: str) -> None:
    state = SimpleNamespace(virtio=[SimpleNamespace(kind=kind) for kind in kinds])
    monkeypatch.setattr(vmm_lab.snapshot, "read_state", lambda folder: state)


def test_a_snapshot_without_a_network_device_needs_no_tap(monkeypatch: pytest.MonkeyPatch) -> None:
    _devices(monkeypatch, "blk", "vsock", "rng")
    monkeypatch.setattr(vmm_lab.tap, "unconnected", None)  # would fail if called
    with vmm_lab.tap_for(IMAGE) as taps:
        assert taps is None


def test_a_network_device_borrows_a_tap_per_restore_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _devices(monkeypatch, "blk", "vsock", "net")
    made: list[str] = []

    @contextlib.contextmanager
    def unconnected(index: int) -> Iterator[str]:
        made.append("made")
        yield "cubeb42"
        made.append("deleted")

    monkeypatch.setattr(vmm_lab.tap, "unconnected", unconnected)
    with vmm_lab.tap_for(IMAGE) as taps:
        assert taps is not None and taps.name == "cubeb42"

        async def borrow() -> None:
            lease = await taps.lease()
            assert lease.tap == "cubeb42"
            with pytest.raises(BackendError, match="all 1 of the bench's taps are lent"):
                await taps.lease()
            taps.release(lease)
            assert (await taps.lease()).tap == "cubeb42"

        trio.run(borrow)
    assert made == ["made", "deleted"]


def test_no_tap_without_root_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    _devices(monkeypatch, "net")

    def unconnected(index: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(vmm_lab.tap, "unconnected", unconnected)
    with (
        pytest.raises(vmm_lab.BenchRefused, match=r"needs a tap.*not permitted"),
        vmm_lab.tap_for(IMAGE),
    ):
        pass


class FakeBackend:
    """Starts that take no time; the `fail_at`-th start fails as an agent that never answers."""

    def __init__(self, fail_at: int) -> None:
        self.starts = 0
        self.killed = 0
        self.fail_at = fail_at

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def start(self, image: Image) -> object:
        self.starts += 1
        if self.starts == self.fail_at:
            raise BackendError("the guest agent did not answer: timeout")
        return object()

    async def kill(self, instance: object) -> None:
        self.killed += 1


def _fake_rounds(monkeypatch: pytest.MonkeyPatch, backend: FakeBackend) -> None:
    async def restore_alone(folder: Path, workdir: Path, net_tap: str | None) -> float:
        return 1.0

    monkeypatch.setattr(vmm_lab, "VmmBackend", lambda work, taps: backend)
    monkeypatch.setattr(vmm_lab, "_restore_alone", restore_alone)


def test_restore_rounds_drop_the_warm_up_and_kill_every_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = FakeBackend(fail_at=0)
    _fake_rounds(monkeypatch, backend)
    rounds = trio.run(vmm_lab.restore_rounds, IMAGE, tmp_path, 4, None)
    assert rounds.restore_ms == [1.0] * 4 and len(rounds.agent_ms) == 4
    assert backend.starts == backend.killed == 4 + vmm_lab.WARMUP


def test_an_agent_that_does_not_answer_stops_the_bench_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_rounds(monkeypatch, FakeBackend(fail_at=3))
    with pytest.raises(
        vmm_lab.BenchFailed,
        match=r"the guest agent did not answer: timeout \(1 timed rounds done\)",
    ):
        trio.run(vmm_lab.restore_rounds, IMAGE, tmp_path, 4, None)

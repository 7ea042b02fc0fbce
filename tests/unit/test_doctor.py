"""`cube doctor` without KVM: how checks add up to a verdict, the output formats, the exit code,
and the checks that only read the filesystem or a version string."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cube import doctor
from cube.doctor import Check, make_report

OK = Check("/dev/kvm", "ok", "present, open for read and write")
WARN = Check("templates", "warn", "no templates built yet", "they go in /x/templates")
FAIL = Check("KVM flavour", "fail", "PVM (kvm_pvm): guest CPL0 code is emulated", doctor.LAB_HINT)


@pytest.mark.parametrize(
    ("checks", "ok", "serving"),
    [([OK], True, True), ([OK, WARN], False, True), ([OK, WARN, FAIL], False, False)],
)
def test_verdict(checks: list[Check], ok: bool, serving: bool) -> None:
    report = make_report("hardware", checks)
    assert (report.ok, report.serving_possible) == (ok, serving)


def _invoke(monkeypatch: pytest.MonkeyPatch, report: doctor.Report, *args: str):
    monkeypatch.setattr(doctor, "run_checks", lambda: report)
    app = typer.Typer()
    app.command()(doctor.doctor_command)
    return CliRunner().invoke(app, list(args))


def test_json_shape_and_exit_code_when_serving_is_impossible(monkeypatch) -> None:
    result = _invoke(monkeypatch, make_report("pvm", [OK, WARN, FAIL]), "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out == {
        "ok": False,
        "serving_possible": False,
        "kvm": "pvm",
        "checks": [
            {"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix}
            for c in (OK, WARN, FAIL)
        ],
    }


def test_warnings_alone_exit_zero(monkeypatch) -> None:
    result = _invoke(monkeypatch, make_report("hardware", [OK, WARN]))
    assert result.exit_code == 0
    assert "cube serve can run here" in result.stdout


def test_table_marks_and_fix_hints() -> None:
    lines = doctor.render(make_report("pvm", [OK, WARN, FAIL])).splitlines()
    width = len("KVM flavour")
    assert lines[0] == f"✓ {OK.name:<{width}}  {OK.detail}"
    assert lines[1].startswith("! templates  ")
    assert lines[2].startswith("  ")  # WARN's fix, under the details column
    assert lines[3].startswith("✗ KVM flavour  PVM")
    assert lines[4] == " " * (width + 4) + "fix: " + doctor.LAB_HINT
    assert "nested lab (`cube lab serve`)" in lines[4]
    assert lines[-1] == "cube serve cannot run here (KVM: pvm; 1 failed, 1 warning)"


def test_missing_kvm_device_stops_the_kvm_checks(tmp_path: Path) -> None:
    flavour, checks = doctor.kvm_checks(str(tmp_path / "kvm"))
    assert flavour == "absent"
    assert [c.status for c in checks] == ["fail"]
    assert "kvm_amd" in checks[0].fix


def test_kvm_permission_hint() -> None:
    check = doctor.device_check("/dev/kvm", PermissionError(errno.EACCES, "Permission denied"))
    assert "kvm group" in check.fix


@pytest.mark.parametrize(
    ("release", "tc", "status", "mode"),
    [
        ("6.18.44-fc-v657", "/usr/sbin/tc", "ok", "TCX"),
        ("6.6.0", None, "warn", "TCX"),
        ("6.1.0-18-amd64", "/usr/sbin/tc", "ok", "clsact"),
        ("5.10.0", None, "fail", "no TCX"),
    ],
)
def test_tc_attach_mode(release: str, tc: str | None, status: str, mode: str) -> None:
    check = doctor.tc_check(release, tc)
    assert check.status == status
    assert mode in check.detail


def test_kernel_version() -> None:
    assert doctor.kernel_version("6.18.44-fc-v657") == (6, 18)
    assert doctor.kernel_version("6.6-rc1") == (6, 6)


def test_cgroup_v2(tmp_path: Path) -> None:
    assert doctor.cgroup_check(tmp_path).status == "warn"
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").touch()
    assert "hybrid" in doctor.cgroup_check(tmp_path).detail
    (tmp_path / "cgroup.controllers").write_text("cpu memory io\n")
    check = doctor.cgroup_check(tmp_path)
    assert (check.status, check.detail) == ("ok", "controllers: cpu memory io")


def test_disk_space_walks_up_to_an_existing_parent(tmp_path: Path, monkeypatch) -> None:
    missing = tmp_path / "not" / "yet" / "there"
    assert doctor.disk_check(missing).detail.endswith(f"free for {missing}")
    monkeypatch.setattr(doctor, "DISK_WARN", 1 << 62)
    assert doctor.disk_check(missing).status == "warn"
    monkeypatch.setattr(doctor, "DISK_FAIL", 1 << 62)
    check = doctor.disk_check(missing)
    assert check.status == "fail"
    assert str(tmp_path) in check.fix


def test_templates(tmp_path: Path) -> None:
    assert doctor.templates_check(tmp_path).detail == "no templates built yet"
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "stray-file").touch()
    assert doctor.templates_check(tmp_path).status == "warn"
    (tmp_path / "templates" / "base").mkdir()
    assert doctor.templates_check(tmp_path) == Check("templates", "ok", "base")


def test_tun_missing(tmp_path: Path) -> None:
    check = doctor.tun_check(str(tmp_path / "tun"))
    assert (check.status, check.fix) == ("fail", "`modprobe tun`")
